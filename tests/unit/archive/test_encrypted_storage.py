"""EncryptedFilesystemStorage and KeyControl outside Orthanc, on a real keyring and SQLite key store."""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from compliance.archive.control import KeyControl
from compliance.archive.keystore import open_key_store
from compliance.archive.storage import NON_PATIENT_ID, EncryptedFilesystemStorage, patient_id_of
from compliance.config import Settings
from compliance.crypto.interfaces import DecryptionError, KeyDestroyed
from compliance.crypto.streaming import MAGIC, read_header


@pytest.fixture
def store(tmp_path: Path):
    settings = Settings(stack_dir=tmp_path / "stack", archive_patient_index_key="ab" * 32)
    s = open_key_store(settings, create=True)
    yield s
    s.close()


@pytest.fixture
def storage(tmp_path: Path, store) -> EncryptedFilesystemStorage:
    return EncryptedFilesystemStorage(tmp_path / "storage", store.keys, fsync=False)


def dicom(patient_id: str = "PAT-1") -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = patient_id
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_set_up_creates_a_private_keyring_and_one_active_kek(tmp_path: Path, store):
    keyring = tmp_path / "stack" / "archive-keys" / "keyring.json"
    assert keyring.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "stack" / "archive-keys").stat().st_mode & 0o777 == 0o700
    assert [k.state for k in store.keys.status().keks] == ["active"]


def test_round_trip_and_nothing_in_plaintext_on_disk(storage: EncryptedFilesystemStorage, store):
    data = dicom("PAT-XYZ-123")
    u = str(uuid.uuid4())
    storage.create(u, 1, data)
    raw = storage.path_of(u).read_bytes()
    assert raw[:4] == MAGIC and raw[128:132] != b"DICM" and b"PAT-XYZ-123" not in raw
    assert storage.read(u, 1) == data
    assert read_header(raw).key_id == store.keys.data_key_for_patient("PAT-XYZ-123").key_id


def test_non_dicom_attachments_get_the_non_patient_key():
    assert patient_id_of(b"not dicom", 1) == NON_PATIENT_ID
    assert patient_id_of(b'{"0010,0020": {"Value": "P9"}}', 2) == "P9"
    assert patient_id_of(b"anything", 9999) == NON_PATIENT_ID


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap_type"])
def test_damaged_files_are_integrity_failures(storage: EncryptedFilesystemStorage, damage: str):
    u = str(uuid.uuid4())
    storage.create(u, 1, dicom())
    path = storage.path_of(u)
    raw = bytearray(path.read_bytes())
    content_type = 1
    if damage == "flip":
        raw[len(raw) // 2] ^= 1
    elif damage == "truncate":
        raw = raw[:-20]
    else:
        content_type = 3  # same bytes presented as another attachment type: associated data differs
    path.write_bytes(bytes(raw))
    with pytest.raises(DecryptionError):
        storage.read(u, content_type)
    assert storage.integrity_failures == 1
    assert storage.check(u, content_type) == "decryption_failed"


def test_a_file_moved_to_another_uuid_does_not_decrypt(storage: EncryptedFilesystemStorage):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    storage.create(a, 1, dicom())
    storage.path_of(b).parent.mkdir(parents=True, exist_ok=True)
    storage.path_of(a).rename(storage.path_of(b))
    assert storage.check(b, 1) == "decryption_failed"


def test_uuids_cannot_escape_the_root(storage: EncryptedFilesystemStorage):
    for bad in ("../../etc/passwd", "ABCDEF01-0000-0000-0000-000000000000", ""):
        with pytest.raises(ValueError):
            storage.path_of(bad)


def test_shred_rotate_rewrap_destroy_through_the_control_routes(storage: EncryptedFilesystemStorage, store):
    u1, u2 = str(uuid.uuid4()), str(uuid.uuid4())
    storage.create(u1, 1, dicom("SHRED-ME"))
    storage.create(u2, 1, dicom("KEEP-ME"))
    control = KeyControl(store.keys, storage)
    old = control.handle("GET", "/compliance/keys/status", b"").body["keks"][0]["id"]
    new = control.handle("POST", "/compliance/keys/rotate", b"{}").body["active_kek_id"]
    assert control.handle("POST", "/compliance/keys/destroy", f'{{"kek_id": "{old}"}}'.encode()).status == 409
    assert control.handle("POST", "/compliance/keys/rewrap", b"{}").body["rewrapped"] == 2
    assert control.handle("POST", "/compliance/keys/destroy", f'{{"kek_id": "{old}"}}'.encode()).status == 200
    assert control.handle("POST", "/compliance/keys/destroy", f'{{"kek_id": "{new}"}}'.encode()).status == 409
    assert storage.read(u1, 1) and storage.read(u2, 1)

    assert control.handle("POST", "/compliance/keys/state", b'{"study_uid": "1.2.3.4"}').body == {
        "state": "unknown_study"}
    for bad in (b'{"patient_id": "SHRED-ME", "study_uids": "1.2.3.4"}',
                b'{"patient_id": "SHRED-ME", "study_uids": [""]}'):
        assert control.handle("POST", "/compliance/keys/shred", bad).status == 400
    assert storage.read(u1, 1), "a refused shred destroys nothing"
    r = control.handle("POST", "/compliance/keys/shred", b'{"patient_id": "SHRED-ME", "study_uids": ["1.2.3.4"]}')
    assert r.body == {"destroyed": 1, "state": "shredded"}
    # the tombstone answers for the study once it has left the archive's index; others are unknown
    assert control.handle("POST", "/compliance/keys/state", b'{"study_uid": "1.2.3.4"}').body == {"state": "shredded"}
    assert control.handle("POST", "/compliance/keys/state", b'{"study_uid": "1.2.3.5"}').body == {
        "state": "unknown_study"}
    again = control.handle("POST", "/compliance/keys/shred", b'{"patient_id": "SHRED-ME", "study_uids": ["1.2.3.4"]}')
    assert again.body == {"destroyed": 0, "state": "shredded"}, "a second shred is harmless"
    assert control.handle("POST", "/compliance/keys/state", b'{"patient_id": "SHRED-ME"}').body == {"state": "shredded"}
    assert control.handle("POST", "/compliance/keys/state", b'{"patient_id": "KEEP-ME"}').body == {"state": "live"}
    with pytest.raises(KeyDestroyed):
        storage.read(u1, 1)
    assert storage.read(u2, 1) == dicom("KEEP-ME")
    body = json.dumps({"attachments": [{"instance": "i1", "uuid": u1, "content_type": 1},
                                       {"instance": "i2", "uuid": u2, "content_type": 1},
                                       {"instance": "i3", "uuid": "../x", "content_type": 1}]}).encode()
    verify = control.handle("POST", "/compliance/archive/verify", body).body
    results = [(f["instance"], f["result"]) for f in verify["failures"]]
    assert results == [("i1", "key_destroyed"), ("i3", "invalid_uuid")]
    assert control.handle("POST", "/compliance/keys/shred", b"[]").status == 400
    assert control.handle("POST", "/compliance/keys/nope", b"{}").status == 404


def test_large_objects_are_segmented_and_read_by_the_stream_decryptor(storage: EncryptedFilesystemStorage, store):
    from compliance.archive.storage import associated_data
    from compliance.crypto.streaming import SEGMENT_SIZE, decrypt_stream

    for size in (0, 1, SEGMENT_SIZE, 2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 17):
        data = os.urandom(size)
        u = str(uuid.uuid4())
        storage.create(u, 7, data)  # a non-DICOM attachment type: the non-patient key
        out = io.BytesIO()
        with open(storage.path_of(u), "rb") as fh:
            decrypt_stream(fh, out, unwrap=store.keys.unwrap_for_header, associated_data=associated_data(u, 7))
        assert out.getvalue() == data
        assert storage.read(u, 7) == data


def test_range_reads_return_exactly_the_plaintext_range(storage: EncryptedFilesystemStorage):
    from compliance.crypto.interfaces import DecryptionError
    from compliance.crypto.streaming import SEGMENT_SIZE

    data = dicom("RANGE-ME") + os.urandom(2 * SEGMENT_SIZE + 1234)
    u = str(uuid.uuid4())
    storage.create(u, 1, data)
    for start, length in ((0, 0), (0, 132), (0, len(data)), (10, SEGMENT_SIZE), (SEGMENT_SIZE - 5, 10),
                          (2 * SEGMENT_SIZE, 100), (len(data) - 1, 1)):
        assert storage.read_range(u, 1, start, length) == data[start:start + length], (start, length)
    with pytest.raises(ValueError):
        storage.read_range(u, 1, len(data) - 10, 11)  # past the end
    raw = bytearray(storage.path_of(u).read_bytes())
    raw[-40] ^= 1  # the last segment: a read of the first bytes does not need it, a read of it fails
    storage.path_of(u).write_bytes(bytes(raw))
    assert storage.read_range(u, 1, 0, 132) == data[:132]
    with pytest.raises(DecryptionError):
        storage.read_range(u, 1, len(data) - 50, 50)


def test_objects_written_by_the_previous_writer_still_read(storage: EncryptedFilesystemStorage, store):
    # The envelope the storage wrote before (encrypt_stream into the file): same format.
    from compliance.archive.storage import associated_data
    from compliance.crypto.streaming import encrypt_stream

    data = dicom("OLD-FORMAT") + os.urandom(3 << 20)
    u = str(uuid.uuid4())
    key = store.keys.data_key_for_patient("OLD-FORMAT")
    path = storage.path_of(u)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        encrypt_stream(io.BytesIO(data), fh, data_key=key.data_key, key_id=key.key_id,
                       associated_data=associated_data(u, 1))
    assert storage.read(u, 1) == data


def test_an_existing_object_is_never_overwritten(storage: EncryptedFilesystemStorage):
    u = str(uuid.uuid4())
    storage.create(u, 1, dicom("FIRST"))
    before = storage.path_of(u).read_bytes()
    with pytest.raises(FileExistsError):
        storage.create(u, 1, dicom("SECOND"))
    assert storage.path_of(u).read_bytes() == before
    assert storage.read(u, 1) == dicom("FIRST")


def test_files_are_private_and_leave_no_temporary_files(storage: EncryptedFilesystemStorage):
    u = str(uuid.uuid4())
    storage.create(u, 1, dicom())
    assert storage.path_of(u).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in storage.path_of(u).parent.iterdir()] == [u]


def test_directories_are_created_whatever_is_missing(tmp_path: Path, store):
    # No storage root yet, then only the second level missing, then nothing missing: Orthanc's
    # {uuid[0:2]}/{uuid[2:4]}/{uuid} layout, each object readable back.
    storage = EncryptedFilesystemStorage(tmp_path / "not-yet" / "storage", store.keys, fsync=False)
    first = "ab" + str(uuid.uuid4())[2:]
    second = "abcd" + first[4:-1] + ("0" if first[-1] != "0" else "1")
    same_dir = first[:-1] + ("2" if first[-1] != "2" else "3")
    created = []
    for u in (first, second, same_dir):
        storage.create(u, 1, dicom(f"P-{u[:8]}"))
        created.append(u)
        assert storage.path_of(u) == tmp_path / "not-yet" / "storage" / u[0:2] / u[2:4] / u
        assert storage.read(u, 1) == dicom(f"P-{u[:8]}")
    assert sorted(p.name for p in (tmp_path / "not-yet" / "storage" / "ab").iterdir()) == sorted({first[2:4], "cd"})


def test_the_failures_route_answers_the_reads_that_failed_in_the_window(tmp_path: Path, store):
    from datetime import UTC, datetime, timedelta

    now = [datetime(2026, 11, 30, 8, 0, tzinfo=UTC)]
    storage = EncryptedFilesystemStorage(tmp_path / "storage", store.keys, fsync=False, clock=lambda: now[0])
    control = KeyControl(store.keys, storage)
    old, new, good = (str(uuid.uuid4()) for _ in range(3))
    for u in (old, new, good):
        storage.create(u, 1, dicom())
    for u in (old, new):
        raw = bytearray(storage.path_of(u).read_bytes())
        raw[len(raw) // 2] ^= 1
        storage.path_of(u).write_bytes(bytes(raw))
    with pytest.raises(DecryptionError):
        storage.read(old, 1)
    now[0] += timedelta(seconds=30)
    with pytest.raises(DecryptionError):
        storage.read_range(new, 1, 0, 10)
    assert storage.read(good, 1)
    now[0] += timedelta(seconds=5)

    body = control.handle("POST", "/compliance/archive/failures", b'{"within_seconds": 10}').body
    assert body == {"failures": [{"uuid": new, "content_type": 1, "at": "2026-11-30T08:00:30+00:00"}], "count": 2}
    wide = control.handle("POST", "/compliance/archive/failures", b'{"within_seconds": 60.5}').body
    assert [f["uuid"] for f in wide["failures"]] == [old, new]
    for bad in (b"{}", b'{"within_seconds": 0}', b'{"within_seconds": -1}', b'{"within_seconds": "10"}',
                b'{"within_seconds": true}', b'{"within_seconds": 3601}'):
        refused = control.handle("POST", "/compliance/archive/failures", bad)
        assert refused.status == 400 and refused.body["error"] == "invalid_request", bad
    assert control.handle("GET", "/compliance/archive/failures", b"").status == 405
