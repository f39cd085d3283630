"""Volume passwords (compliance/archive/volume.py): data keys of the archive's key store, so rotation,
rewrap and KEK destruction govern the encrypted volume like every patient's key (local keyring and a
real SoftHSM2 token)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select, update

from compliance.archive.volume import VolumeKeys, volume_key_ref
from compliance.crypto.interfaces import KeyDestroyed, KeyProvider, KeyProviderError, KeyStateConflict
from compliance.crypto.keys import KeyService
from compliance.crypto.models import CryptoDataKey


def _row(session_factory: Any, name: str) -> CryptoDataKey:
    with session_factory() as session:
        return session.scalars(select(CryptoDataKey).where(CryptoDataKey.patient_key == volume_key_ref(name))).one()


def test_created_once_then_read_back(key_service: KeyService, session_factory: Any, provider: KeyProvider) -> None:
    volumes = VolumeKeys(session_factory, provider)
    password = volumes.password("phi", create=True)
    assert re.fullmatch(r"[0-9a-f]{64}", password)
    assert volumes.password("phi") == password
    assert volumes.password("phi", create=True) == password  # idempotent
    assert volumes.password("other", create=True) != password
    row = _row(session_factory, "phi")
    assert bytes.fromhex(password) not in (row.wrapped_key or b"")  # only the wrapped form is stored


def test_missing_volume_is_an_error_without_create(key_service: KeyService, session_factory: Any,
                                                    provider: KeyProvider) -> None:
    with pytest.raises(KeyProviderError):
        VolumeKeys(session_factory, provider).password("phi")


def test_rotate_rewrap_destroy_keep_the_password(key_service: KeyService, session_factory: Any,
                                                 provider: KeyProvider) -> None:
    volumes = VolumeKeys(session_factory, provider)
    password = volumes.password("phi", create=True)
    old = _row(session_factory, "phi").kek_id
    new = key_service.rotate()
    # a KEK that still wraps the volume's password cannot be destroyed
    with pytest.raises(KeyStateConflict):
        key_service.destroy_kek(old)
    result = key_service.rewrap()
    assert result.rewrapped == 1
    assert _row(session_factory, "phi").kek_id == new
    key_service.destroy_kek(old)
    assert old not in provider.kek_ids()
    assert volumes.password("phi") == password


def test_destroying_the_kek_makes_the_volume_unopenable(key_service: KeyService, session_factory: Any,
                                                       provider: KeyProvider) -> None:
    volumes = VolumeKeys(session_factory, provider)
    volumes.password("phi", create=True)
    provider.destroy_kek(_row(session_factory, "phi").kek_id)
    with pytest.raises(KeyProviderError):
        volumes.password("phi")


def test_a_destroyed_volume_key_is_refused_and_not_recreated_silently(key_service: KeyService,
                                                                      session_factory: Any,
                                                                      provider: KeyProvider) -> None:
    volumes = VolumeKeys(session_factory, provider)
    first = volumes.password("phi", create=True)
    with session_factory() as session, session.begin():
        session.execute(update(CryptoDataKey).where(CryptoDataKey.patient_key == volume_key_ref("phi"))
                        .values(wrapped_key=None, destroyed_at=key_service.status().keks[0].created_at))
    with pytest.raises(KeyDestroyed):
        volumes.password("phi")
    assert volumes.password("phi", create=True) != first  # only an explicit set-up makes a new one


def test_patient_operations_never_reach_a_volume_key(key_service: KeyService, session_factory: Any,
                                                     provider: KeyProvider) -> None:
    volumes = VolumeKeys(session_factory, provider)
    password = volumes.password("phi", create=True)
    # whatever a patient id is, its HMAC is 64 hex digits: never "volume:phi"
    for patient in ("volume:phi", "phi", "volume\x00phi"):
        assert key_service.patient_key(patient) != volume_key_ref("phi")
        assert key_service.shred_patient(patient) == 0
    assert volumes.password("phi") == password


@pytest.mark.parametrize("name", ["", "PHI", "a/b", "x" * 33, "-phi", "phi\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        volume_key_ref(name)
