"""The KeyProvider contract, run against every implementation (local keyring, PKCS#11 on SoftHSM2),
and the key service's rotate / rewrap / shred lifecycle on top of each."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from compliance.crypto.interfaces import (
    DataKeyNotFound,
    DecryptionError,
    KeyDestroyed,
    KeyProvider,
    KeyProviderError,
    KeyStateConflict,
)
from compliance.crypto.keys import KeyService
from compliance.crypto.models import CryptoDataKey, CryptoKek
from compliance.crypto.streaming import Header, decrypt_stream, encrypt_stream, read_header

AD = b"file-uuid|application/dicom"

# --- the provider contract ------------------------------------------------------------------------


def test_provider_satisfies_protocol(provider: KeyProvider) -> None:
    assert isinstance(provider, KeyProvider)
    assert provider.name in {"local", "pkcs11"}


def test_create_list_destroy(provider: KeyProvider) -> None:
    assert provider.kek_ids() == []
    first = provider.create_kek()
    second = provider.create_kek()
    assert first != second
    assert provider.kek_ids() == sorted([first, second])
    provider.destroy_kek(first)
    assert provider.kek_ids() == [second]
    with pytest.raises(KeyProviderError):
        provider.destroy_kek(first)


def test_wrap_unwrap_round_trip(provider: KeyProvider) -> None:
    kek = provider.create_kek()
    data_key = os.urandom(32)
    wrapped = provider.wrap(kek, data_key, context=b"key-1")
    assert data_key not in wrapped
    assert provider.wrap(kek, data_key, context=b"key-1") != wrapped  # fresh nonce each time
    assert provider.unwrap(kek, wrapped, context=b"key-1") == data_key


def test_unwrap_is_bound_to_context_kek_and_bytes(provider: KeyProvider) -> None:
    kek, other = provider.create_kek(), provider.create_kek()
    wrapped = provider.wrap(kek, os.urandom(32), context=b"key-1")
    with pytest.raises(DecryptionError):
        provider.unwrap(kek, wrapped, context=b"key-2")
    with pytest.raises(DecryptionError):
        provider.unwrap(other, wrapped, context=b"key-1")
    for offset in (0, 5, len(wrapped) - 1):
        tampered = bytearray(wrapped)
        tampered[offset] ^= 1
        with pytest.raises(DecryptionError):
            provider.unwrap(kek, bytes(tampered), context=b"key-1")
    with pytest.raises(DecryptionError):
        provider.unwrap(kek, wrapped[:10], context=b"key-1")


def test_destroyed_kek_cannot_unwrap(provider: KeyProvider) -> None:
    kek = provider.create_kek()
    wrapped = provider.wrap(kek, os.urandom(32), context=b"k")
    provider.destroy_kek(kek)
    with pytest.raises(KeyProviderError):
        provider.unwrap(kek, wrapped, context=b"k")
    with pytest.raises(KeyProviderError):
        provider.wrap(kek, os.urandom(32), context=b"k")


def test_describe_names_provider_and_keks_without_secrets(provider: KeyProvider) -> None:
    kek = provider.create_kek()
    described = provider.describe()
    assert described["provider"] == provider.name
    assert kek in described["kek_ids"]


# --- the key service on every provider ------------------------------------------------------------


def _encrypt_for(service: KeyService, patient: str, plaintext: bytes) -> bytes:
    key = service.data_key_for_patient(patient)
    out = io.BytesIO()
    encrypt_stream(
        io.BytesIO(plaintext),
        out,
        data_key=key.data_key,
        key_id=key.key_id,
        associated_data=AD,
        segment_size=4096,
    )
    return out.getvalue()


def _decrypt_with(service: KeyService, ciphertext: bytes) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(ciphertext), out, unwrap=service.unwrap_for_header, associated_data=AD)
    return out.getvalue()


def _constant(key: bytes) -> Callable[[Header], bytes]:
    return lambda header: key


def _naive(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes even for timezone-aware columns; compare in UTC.
    return value.replace(tzinfo=None) if value is not None else None


def _active(service: KeyService) -> str:
    (active,) = [k.id for k in service.status().keks if k.state == "active"]
    return active


def test_data_key_per_patient_is_stable(key_service: KeyService) -> None:
    a1 = key_service.data_key_for_patient("MRN-1")
    a2 = key_service.data_key_for_patient("MRN-1")
    b = key_service.data_key_for_patient("MRN-2")
    assert (a1.key_id, a1.data_key) == (a2.key_id, a2.data_key)
    assert b.key_id != a1.key_id and b.data_key != a1.data_key
    assert key_service.data_key_by_id(a1.key_id) == a1.data_key
    assert "data_key" not in repr(a1) or a1.data_key.hex() not in repr(a1)
    with pytest.raises(DataKeyNotFound):
        key_service.data_key_by_id("no-such-key")


def test_patient_ids_are_not_stored_in_clear(key_service: KeyService, session_factory: Any) -> None:
    key_service.data_key_for_patient("MRN-SECRET-42")
    with session_factory() as session:
        (row,) = session.scalars(select(CryptoDataKey)).all()
    assert "MRN-SECRET-42" not in row.patient_key
    assert row.patient_key == key_service.patient_key("MRN-SECRET-42")
    assert len(row.patient_key) == 64


def test_rotate_new_writes_use_new_kek_old_objects_still_read(
    key_service: KeyService, provider: KeyProvider, clock: Any, session_factory: Any
) -> None:
    old_kek = _active(key_service)
    old_obj = _encrypt_for(key_service, "P-old", b"old study" * 1000)
    clock.advance(days=30)
    new_kek = key_service.rotate()
    assert new_kek != old_kek
    new_obj = _encrypt_for(key_service, "P-new", b"new study" * 1000)

    status = {k.id: k for k in key_service.status().keks}
    assert status[old_kek].state == "retired"
    assert _naive(status[old_kek].retired_at) == _naive(clock.now)
    assert status[new_kek].state == "active"
    assert (status[old_kek].data_keys, status[new_kek].data_keys) == (1, 1)
    assert status[old_kek].in_provider and status[new_kek].in_provider
    with session_factory() as session:
        kek_of = {kid: kek for kid, kek in session.execute(select(CryptoDataKey.id, CryptoDataKey.kek_id))}
    assert kek_of[read_header(new_obj).key_id] == new_kek
    assert kek_of[read_header(old_obj).key_id] == old_kek

    assert _decrypt_with(key_service, old_obj) == b"old study" * 1000
    assert _decrypt_with(key_service, new_obj) == b"new study" * 1000


def test_rewrap_then_destroy_old_kek_everything_still_reads(
    key_service: KeyService, provider: KeyProvider, session_factory: Any
) -> None:
    old_kek = _active(key_service)
    objects = {f"P-{i}": _encrypt_for(key_service, f"P-{i}", os.urandom(10_000)) for i in range(5)}
    plaintexts = {p: _decrypt_with(key_service, ct) for p, ct in objects.items()}
    before = {p: bytes(ct) for p, ct in objects.items()}
    new_kek = key_service.rotate()

    with pytest.raises(KeyStateConflict):
        key_service.destroy_kek(old_kek)  # still wraps 5 live keys
    with pytest.raises(KeyStateConflict):
        key_service.destroy_kek(new_kek)  # active

    result = key_service.rewrap()
    assert (result.rewrapped, result.already_current, result.active_kek_id) == (5, 0, new_kek)
    assert key_service.rewrap().rewrapped == 0
    with session_factory() as session:
        assert set(session.scalars(select(CryptoDataKey.kek_id))) == {new_kek}

    key_service.destroy_kek(old_kek)
    assert old_kek not in provider.kek_ids()
    status = {k.id: k for k in key_service.status().keks}
    assert status[old_kek].state == "destroyed" and not status[old_kek].in_provider
    assert status[new_kek].data_keys == 5

    for patient, ciphertext in objects.items():
        assert ciphertext == before[patient]  # payloads untouched
        assert _decrypt_with(key_service, ciphertext) == plaintexts[patient]


def test_shred_patient_makes_ciphertext_undecryptable(
    key_service: KeyService, provider: KeyProvider, session_factory: Any, clock: Any
) -> None:
    victim = _encrypt_for(key_service, "P-erase", b"phi" * 5000)
    survivor = _encrypt_for(key_service, "P-keep", b"keep" * 5000)
    key_id = read_header(victim).key_id
    clock.advance(hours=1)

    assert key_service.shred_patient("P-erase") == 1
    assert key_service.shred_patient("P-erase") == 0

    with pytest.raises(KeyDestroyed):
        key_service.data_key_by_id(key_id)
    with pytest.raises(KeyDestroyed):
        _decrypt_with(key_service, victim)
    assert _decrypt_with(key_service, survivor) == b"keep" * 5000

    with session_factory() as session:
        row = session.get(CryptoDataKey, key_id)
        assert row.wrapped_key is None and _naive(row.destroyed_at) == _naive(clock.now)
        leftovers = [(r.id, r.wrapped_key) for r in session.scalars(select(CryptoDataKey)) if r.wrapped_key]
        keks = list(session.scalars(select(CryptoKek.id)))
    # Nothing left in the database or the provider opens the shredded object: try every wrapped key
    # under every KEK, with the shredded key's id as context and with its own.
    candidate_keys = []
    for kek in keks:
        for row_id, wrapped in leftovers:
            for context in (b"data key " + key_id.encode(), b"data key " + row_id.encode(), b""):
                with contextlib.suppress(DecryptionError, KeyProviderError):
                    candidate_keys.append(provider.unwrap(kek, wrapped, context=context))
    assert candidate_keys  # the survivor's key does unwrap, so the search is real
    for candidate in candidate_keys:
        with pytest.raises(DecryptionError):
            decrypt_stream(io.BytesIO(victim), io.BytesIO(), unwrap=_constant(candidate), associated_data=AD)

    # New data for the same patient gets a fresh key; the old ciphertext stays dead.
    fresh = key_service.data_key_for_patient("P-erase")
    assert fresh.key_id != key_id
    with pytest.raises(KeyDestroyed):
        _decrypt_with(key_service, victim)
    assert key_service.status().shredded_data_keys == 1


def test_no_active_kek_refuses_new_data_keys(session_factory: Any, provider: KeyProvider, clock: Any) -> None:
    service = KeyService(session_factory, provider, clock, patient_index_key=os.urandom(32))
    with pytest.raises(KeyProviderError):
        service.data_key_for_patient("P")
    service.rotate()
    assert service.data_key_for_patient("P").key_id


def test_confirm_kek_retired_rules(key_service: KeyService) -> None:
    first = _active(key_service)
    with pytest.raises(KeyStateConflict):
        key_service.confirm_kek_retired(first)
    key_service.rotate()
    key_service.confirm_kek_retired(first)  # already retired by the rotation: a no-op
    key_service.destroy_kek(first)
    with pytest.raises(KeyStateConflict):
        key_service.confirm_kek_retired(first)
    with pytest.raises(DataKeyNotFound):
        key_service.confirm_kek_retired("no-such-kek")
