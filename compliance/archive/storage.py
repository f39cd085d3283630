"""Encrypted filesystem storage for Orthanc's attachments: what the storage-area plugin does.

Orthanc hands every file it writes (the DICOM file and every other attachment) to
:meth:`EncryptedFilesystemStorage.create`, and asks for it back with ``read``; nothing of Orthanc's
reaches the storage directory in plaintext. Layout and format:

- path: ``{root}/{uuid[0:2]}/{uuid[2:4]}/{uuid}`` (Orthanc's own layout), created exclusively
  (``O_EXCL``: an existing object is never overwritten) and written in place, then synced with
  ``fdatasync`` before ``create`` returns: what Orthanc's own filesystem storage does with
  ``SyncStorageArea`` (on by default; seen with strace on Orthanc 1.10.1: open at the final path,
  write, ``fdatasync``). No temporary file and rename: the rename would need a second sync, of the
  directory, to be durable. A crash during ``create`` can leave a partial file that Orthanc never
  recorded (it records an attachment only after ``create`` returned), and a partial object never
  authenticates, so it can never be read as data;
- content: one object in the envelope format of :mod:`compliance.crypto.streaming` (magic
  ``CGSE``), whose header carries the data key's id, so a read needs no lookup table;
- associated data: ``b"orthanc attachment v1\\x00" || uuid || b"\\x00" || content type``: a file
  copied or renamed to another attachment (or another content type) does not decrypt.

Which data key (the patient's): Orthanc's storage callback sees only ``(uuid, content type,
bytes)``. For DICOM content (``1`` DICOM, ``3`` DICOM until pixel data) the PatientID (0010,0020)
is parsed from the bytes (:mod:`compliance.archive.dicom_header`, falling back to pydicom, header
only, whenever that walk is not certain to give pydicom's answer); for ``2`` DICOM-as-JSON it is
read from the JSON.
Other attachment types (user-defined attachments, and DICOM without a readable PatientID) are
encrypted under the reserved non-patient key :data:`NON_PATIENT_ID`, so shredding a patient does
not reach them. Orthanc 1.10 with this plugin writes types 1 and 3 for each instance with pixel
data: a plugin storage area without range reads (orthanc-python 4.0's ``RegisterStorageArea``)
makes Orthanc keep the header apart as ``dicom-until-pixel-data``.

Keys and durability (:class:`compliance.archive.key_service.ArchiveKeyService`): the data key of a new
patient is committed to the key database while the object is encrypted and written; ``create``
returns only after both the object's ``fdatasync`` and the key's commit, so Orthanc never records an
object whose data key could be lost. If another process committed the patient's key first, the
object is rewritten under that key before ``create`` returns.

Failures on read: a missing file is :class:`FileNotFoundError`; a shredded patient's file raises
:class:`KeyDestroyed`; anything that fails to authenticate (a corrupted, truncated, swapped file)
raises :class:`DecryptionError` and is counted in :attr:`integrity_failures`, so the plugin can
report it and the gateway can raise a security alert. Bytes are never returned unless every
segment authenticated.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom

from compliance import dicom_json
from compliance.archive import dicom_header
from compliance.archive.key_service import ArchiveKeyService, PendingKey
from compliance.crypto.interfaces import DecryptionError, KeyDestroyed
from compliance.crypto.keys import DataKey, KeyService
from compliance.crypto.streaming import SEGMENT_SIZE, TAG_SIZE, StreamEncryptor, iter_decrypt

__all__ = ["NON_PATIENT_ID", "EncryptedFilesystemStorage", "IntegrityFailure", "patient_id_of"]

log = logging.getLogger(__name__)

#: The reserved "patient" of attachments that belong to no identifiable patient. The NUL byte makes
#: it impossible as a DICOM PatientID (LO values cannot contain control characters).
NON_PATIENT_ID = "\x00orthanc-non-patient-attachments"

CONTENT_DICOM = 1
CONTENT_DICOM_AS_JSON = 2
CONTENT_DICOM_UNTIL_PIXEL_DATA = 3

#: The storage serving Orthanc through the C shim (deploy/orthanc/compliance_storage_shim.c), set by
#: the Python plugin when the shim registered the storage area; None otherwise.
ACTIVE_STORAGE: EncryptedFilesystemStorage | None = None

_AD_LABEL = b"orthanc attachment v1\x00"
#: What ``str(uuid.UUID(x))`` gives back unchanged: lowercase hex in 8-4-4-4-12 groups.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def associated_data(uuid: str, content_type: int) -> bytes:
    return _AD_LABEL + uuid.encode("ascii") + b"\x00" + str(int(content_type)).encode("ascii")


def patient_id_of(data: bytes, content_type: int) -> str:
    """The PatientID an attachment belongs to, or :data:`NON_PATIENT_ID`."""
    try:
        if content_type in (CONTENT_DICOM, CONTENT_DICOM_UNTIL_PIXEL_DATA):
            try:
                fast = dicom_header.patient_id(data)
            except dicom_header.Unsupported:
                pass
            else:
                return NON_PATIENT_ID if fast is None else fast
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID"])
            value = ds.get("PatientID")
            if value is not None:
                return str(value)
        elif content_type == CONTENT_DICOM_AS_JSON:
            found = dicom_json.orthanc_string(json.loads(data), "0010,0020")
            if found is not None:
                return found
    except Exception:  # noqa: BLE001 - an unparseable attachment still gets stored, under the non-patient key
        log.warning("attachment content type %s: no PatientID found; using the non-patient key", content_type)
    return NON_PATIENT_ID


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view):]


@dataclass(frozen=True)
class IntegrityFailure:
    uuid: str
    content_type: int
    at: datetime


@dataclass
class _Journal:
    count: int = 0
    recent: deque[IntegrityFailure] = field(default_factory=lambda: deque(maxlen=1000))


class EncryptedFilesystemStorage:
    def __init__(self, root: Path | str, keys: KeyService, *, fsync: bool = True,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self._keys = keys
        self._fsync = fsync
        self._clock = clock
        self._journal = _Journal()
        self._journal_lock = threading.Lock()

    def path_of(self, uuid: str) -> Path:
        return Path(self._file(uuid))

    def _file(self, uuid: str) -> str:
        # Orthanc's uuids are canonical (lowercase hex and dashes); refuse anything else so a uuid can
        # never escape the root.
        if not isinstance(uuid, str) or _CANONICAL_UUID.fullmatch(uuid) is None:
            raise ValueError("not an attachment uuid")
        return f"{self._root}/{uuid[0:2]}/{uuid[2:4]}/{uuid}"

    # --- the three storage-area callbacks ------------------------------------------------------

    def create(self, uuid: str, content_type: int, data: bytes) -> None:
        content_type = int(content_type)
        path = self._file(uuid)
        pending = self._key_for(patient_id_of(data, content_type))
        ad = associated_data(uuid, content_type)
        fd = self._open(path, os.O_EXCL)  # never an existing object
        try:
            try:
                self._encrypt_into(fd, data, pending.key, ad)
            finally:
                os.close(fd)
            # Acknowledge (return) only once the data key is durably committed too.
            committed = pending.wait()
            if committed.key_id != pending.key.key_id:
                # Another process committed the patient's key first: the object must use that one.
                fd = self._open(path, os.O_TRUNC)
                try:
                    self._encrypt_into(fd, data, committed, ad)
                finally:
                    os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    def _key_for(self, patient_id: str) -> PendingKey:
        if isinstance(self._keys, ArchiveKeyService):  # group-committed new keys (the plugin's)
            return self._keys.key_for_patient(patient_id)
        return PendingKey.committed(self._keys.data_key_for_patient(patient_id))

    @staticmethod
    def _open(path: str, mode: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | mode
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            # Usually only the last directory level is missing: one mkdir, not makedirs' walk.
            parent = os.path.dirname(path)
            try:
                os.mkdir(parent)
            except FileExistsError:
                pass  # created meanwhile by another thread
            except FileNotFoundError:
                os.makedirs(parent, exist_ok=True)
            return os.open(path, flags, 0o600)

    def _encrypt_into(self, fd: int, data: bytes, key: DataKey, ad: bytes) -> None:
        encryptor = StreamEncryptor(data_key=key.data_key, key_id=key.key_id, associated_data=ad)
        if len(data) <= SEGMENT_SIZE:
            # The common case, one segment: the header and the segment in one write.
            done = encryptor.update(data)  # buffered: at most one segment, so nothing is complete yet
            _write_all(fd, b"".join([encryptor.header.raw, *done, encryptor.finalize()]))
        else:
            _write_all(fd, encryptor.header.raw)
            # Segment by segment: the encryptor holds at most two segments of plaintext.
            for start in range(0, len(data), SEGMENT_SIZE):
                for segment in encryptor.update(data[start : start + SEGMENT_SIZE]):
                    _write_all(fd, segment)
            _write_all(fd, encryptor.finalize())
        if self._fsync:
            os.fdatasync(fd)  # the data and the size: what Orthanc's own storage syncs

    def read(self, uuid: str, content_type: int) -> bytes:
        content_type = int(content_type)
        with open(self._file(uuid), "rb", buffering=0) as fh:
            chunks = iter(lambda: fh.read(SEGMENT_SIZE + TAG_SIZE), b"")
            try:
                # Every segment is authenticated before the bytes are returned.
                return b"".join(iter_decrypt(chunks, unwrap=self._keys.unwrap_for_header,
                                             associated_data=associated_data(uuid, content_type)))
            except DecryptionError:
                self._record_failure(uuid, content_type)
                raise

    def read_range(self, uuid: str, content_type: int, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` of the plaintext (Orthanc's range reads, through the C
        shim): segments are decrypted and authenticated in order and reading stops once the range is
        covered, so a header read does not decrypt a whole multi-frame file."""
        content_type = int(content_type)
        if start < 0 or length < 0:
            raise ValueError("a range needs a non-negative start and length")
        end = start + length
        out: list[bytes] = []
        position = 0
        with open(self._file(uuid), "rb", buffering=0) as fh:
            chunks = iter(lambda: fh.read(SEGMENT_SIZE + TAG_SIZE), b"")
            try:
                for plain in iter_decrypt(chunks, unwrap=self._keys.unwrap_for_header,
                                          associated_data=associated_data(uuid, content_type)):
                    if position + len(plain) > start:
                        out.append(plain[max(0, start - position) : end - position])
                    position += len(plain)
                    if position >= end:
                        break
            except DecryptionError:
                self._record_failure(uuid, content_type)
                raise
        data = b"".join(out)
        if len(data) != length:
            raise ValueError(f"range {start}+{length} is beyond the end of attachment {uuid}")
        return data

    def remove(self, uuid: str, content_type: int) -> None:
        path = self.path_of(uuid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break

    # --- verification --------------------------------------------------------------------------

    def check(self, uuid: str, content_type: int) -> str:
        """``ok``, ``missing``, ``key_destroyed`` or ``decryption_failed`` for one stored file."""
        try:
            self.read(uuid, content_type)
        except FileNotFoundError:
            return "missing"
        except KeyDestroyed:
            return "key_destroyed"
        except DecryptionError:
            return "decryption_failed"
        return "ok"

    def _record_failure(self, uuid: str, content_type: int) -> None:
        log.error("integrity failure: attachment %s (content type %s) does not authenticate", uuid, content_type)
        with self._journal_lock:
            self._journal.count += 1
            self._journal.recent.append(IntegrityFailure(uuid, content_type, self._clock()))

    @property
    def integrity_failures(self) -> int:
        with self._journal_lock:
            return self._journal.count

    def recent_failures(self, within: timedelta | None = None) -> list[IntegrityFailure]:
        """The journal's failures (the last 1000), oldest first; ``within``: only those recorded in
        that much time before now (by this process's clock, so a caller's clock never matters)."""
        with self._journal_lock:
            recent = list(self._journal.recent)
        if within is None:
            return recent
        since = self._clock() - within
        return [f for f in recent if f.at >= since]
