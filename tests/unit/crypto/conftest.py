"""Fixtures for the crypto domain: key providers (a real SoftHSM2 token, no mock) and a key service
on a temporary SQLite database."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from compliance.crypto.interfaces import KeyProvider
from compliance.crypto.keys import KeyService
from compliance.crypto.models import CryptoDataKey, CryptoKek
from compliance.crypto.providers.local import LocalKeyProvider
from compliance.db.base import Base, table_of
from compliance.db.session import make_engine, make_session_factory

SO_PIN = "87654321"
USER_PIN = "12345678"

#: The SoftHSM2 configuration and token of the test session. SoftHSM2 reads ``SOFTHSM2_CONF`` once per
#: process, so the session fixtures below make them once even where another conftest registers them too.
_SOFTHSM2_DIR: dict[str, Path] = {}
_SOFTHSM2_TOKEN: dict[str, str] = {}


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture(scope="session")
def softhsm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SoftHSM2 configuration per test session.

    SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is first initialised in the process, so
    every test shares the configuration and gets its own token instead.
    """
    from compliance.crypto.providers.pkcs11 import find_softhsm2_module

    if shutil.which("softhsm2-util") is None or find_softhsm2_module() is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2)")
    if "dir" not in _SOFTHSM2_DIR:  # once, though tests/unit/archive/conftest.py registers this fixture too
        base = tmp_path_factory.mktemp("softhsm2")
        (base / "tokens").mkdir()
        conf = base / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        _SOFTHSM2_DIR["dir"] = base
    return _SOFTHSM2_DIR["dir"]


@pytest.fixture(scope="session")
def _softhsm2_session_token(softhsm2_dir: Path) -> str:
    if "token" not in _SOFTHSM2_TOKEN:
        label = f"t-{uuid.uuid4().hex[:12]}"
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", USER_PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(softhsm2_dir / "softhsm2.conf")},
        )
        _SOFTHSM2_TOKEN["token"] = label
    return _SOFTHSM2_TOKEN["token"]


@pytest.fixture
def softhsm2_token(_softhsm2_session_token: str) -> str:
    """A token with no keys on it.

    SoftHSM2 only discovers tokens when the module is initialised, once per process, so the
    session shares one token and each test starts by destroying every object on it.
    """
    import pkcs11

    from compliance.crypto.providers.pkcs11 import find_softhsm2_module

    token = pkcs11.lib(find_softhsm2_module() or "").get_token(token_label=_softhsm2_session_token)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        for obj in list(session.get_objects()):
            obj.destroy()
    return _softhsm2_session_token


def make_local_provider(tmp_path: Path) -> LocalKeyProvider:
    return LocalKeyProvider(
        tmp_path / "keys" / "keyring.json",
        environment="development",
        explicit_path=False,
        create_if_missing=True,
    )


@pytest.fixture(params=["local", "pkcs11"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyProvider]:
    if request.param == "local":
        yield make_local_provider(tmp_path)
        return
    from compliance.crypto.providers.pkcs11 import Pkcs11KeyProvider, find_softhsm2_module

    label = request.getfixturevalue("softhsm2_token")
    module = find_softhsm2_module()
    assert module is not None
    p11 = Pkcs11KeyProvider(module, label, USER_PIN)
    yield p11
    p11.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    Base.metadata.create_all(engine, tables=[table_of(CryptoKek), table_of(CryptoDataKey)])
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def key_service(
    session_factory: sessionmaker[Session], provider: KeyProvider, clock: FakeClock
) -> KeyService:
    service = KeyService(session_factory, provider, clock, patient_index_key=b"i" * 32)
    service.rotate()  # set-up: the first active KEK
    return service


@pytest.fixture
def random_bytes() -> Callable[[int], bytes]:
    return os.urandom
