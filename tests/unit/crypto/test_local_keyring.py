"""The local keyring file: permissions, production refusal, atomic persistence."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from compliance.crypto.interfaces import KeyProviderError
from compliance.crypto.providers.local import LocalKeyProvider
from compliance.errors import ConfigurationError


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keyring_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "keyring.json"
    provider = LocalKeyProvider(path, environment="development", explicit_path=False, create_if_missing=True)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    provider.create_kek()
    assert _mode(path) == 0o600  # still, after an atomic rewrite
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_keyring_with_broader_permissions_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyProvider(path, environment="development", explicit_path=True, create_if_missing=True)
    os.chmod(path, mode)
    with pytest.raises(ConfigurationError, match="0600"):
        LocalKeyProvider(path, environment="development", explicit_path=True)


def test_existing_provider_refuses_after_chmod(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    provider = LocalKeyProvider(path, environment="development", explicit_path=True, create_if_missing=True)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError):
        provider.kek_ids()


def test_production_refuses_the_default_path(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    with pytest.raises(ConfigurationError):
        LocalKeyProvider(path, environment="production", explicit_path=False, create_if_missing=True)
    assert not path.exists()


def test_production_accepts_an_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    provider = LocalKeyProvider(path, environment="production", explicit_path=True, create_if_missing=True)
    assert provider.kek_ids() == []


def test_missing_keyring_is_not_silently_created(tmp_path: Path) -> None:
    path = tmp_path / "typo.json"
    with pytest.raises(ConfigurationError, match="set-up"):
        LocalKeyProvider(path, environment="development", explicit_path=True)
    assert not path.exists()


def test_keks_persist_and_other_processes_see_rotation(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    gateway = LocalKeyProvider(path, environment="development", explicit_path=True, create_if_missing=True)
    cli = LocalKeyProvider(path, environment="development", explicit_path=True)
    kek = cli.create_kek()  # e.g. the CLI rotating while a gateway runs
    wrapped = cli.wrap(kek, b"k" * 32, context=b"id")
    assert gateway.unwrap(kek, wrapped, context=b"id") == b"k" * 32  # reloads on an unknown KEK
    document = json.loads(path.read_text())
    assert list(document["keks"]) == [kek]
    cli.destroy_kek(kek)
    assert kek not in json.loads(path.read_text())["keks"]


def test_corrupt_keyring_is_a_provider_error(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(KeyProviderError):
        LocalKeyProvider(path, environment="development", explicit_path=True)
