"""Encrypted filesystem storage for Orthanc's attachments: what the storage-area plugin does.

Orthanc hands every file it writes (the DICOM file and every other attachment) to
:meth:`EncryptedFilesystemStorage.create`, and asks for it back with ``read``; nothing of Orthanc's
reaches the storage directory in plaintext. Layout and format:

- path: ``{root}/{uuid[0:2]}/{uuid[2:4]}/{uuid}`` (Orthanc's own layout), written to a temporary
  file in the same directory, fsynced, then renamed, so a crash never leaves a half-written object;
- content: one object in the envelope format of :mod:`compliance.crypto.streaming` (magic
  ``CGSE``), whose header carries the data key's id, so a read needs no lookup table;
- associated data: ``b"orthanc attachment v1\\x00" || uuid || b"\\x00" || content type``: a file
  copied or renamed to another attachment (or another content type) does not decrypt.

Which data key (the patient's): Orthanc's storage callback sees only ``(uuid, content type,
bytes)``. For DICOM content (``1`` DICOM, ``3`` DICOM until pixel data) the PatientID (0010,0020)
is parsed from the bytes (pydicom, header only); for ``2`` DICOM-as-JSON it is read from the JSON.
Other attachment types (user-defined attachments, and DICOM without a readable PatientID) are
encrypted under the reserved non-patient key :data:`NON_PATIENT_ID`, so shredding a patient does
not reach them; Orthanc 1.10 with this configuration writes only type 1.

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
import threading
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from compliance.crypto.interfaces import DecryptionError, KeyDestroyed
from compliance.crypto.keys import KeyService
from compliance.crypto.streaming import decrypt_stream, encrypt_stream

__all__ = ["NON_PATIENT_ID", "EncryptedFilesystemStorage", "IntegrityFailure", "patient_id_of"]

log = logging.getLogger(__name__)

#: The reserved "patient" of attachments that belong to no identifiable patient. The NUL byte makes
#: it impossible as a DICOM PatientID (LO values cannot contain control characters).
NON_PATIENT_ID = "\x00orthanc-non-patient-attachments"

CONTENT_DICOM = 1
CONTENT_DICOM_AS_JSON = 2
CONTENT_DICOM_UNTIL_PIXEL_DATA = 3

_AD_LABEL = b"orthanc attachment v1\x00"


def associated_data(uuid: str, content_type: int) -> bytes:
    return _AD_LABEL + uuid.encode("ascii") + b"\x00" + str(int(content_type)).encode("ascii")


def patient_id_of(data: bytes, content_type: int) -> str:
    """The PatientID an attachment belongs to, or :data:`NON_PATIENT_ID`."""
    try:
        if content_type in (CONTENT_DICOM, CONTENT_DICOM_UNTIL_PIXEL_DATA):
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID"])
            value = ds.get("PatientID")
            if value is not None:
                return str(value)
        elif content_type == CONTENT_DICOM_AS_JSON:
            doc = json.loads(data)
            value = (doc.get("0010,0020") or {}).get("Value")
            if isinstance(value, str):
                return value
    except Exception:  # noqa: BLE001 - an unparseable attachment still gets stored, under the non-patient key
        log.warning("attachment content type %s: no PatientID found; using the non-patient key", content_type)
    return NON_PATIENT_ID


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
        self._keys = keys
        self._fsync = fsync
        self._clock = clock
        self._journal = _Journal()
        self._journal_lock = threading.Lock()

    def path_of(self, uuid: str) -> Path:
        # Orthanc's uuids are hex and dashes; refuse anything else so a uuid can never escape the root.
        try:
            canonical = str(uuid_mod.UUID(uuid))
        except ValueError:
            raise ValueError("not an attachment uuid") from None
        if canonical != uuid:
            raise ValueError("not an attachment uuid")
        return self.root / uuid[0:2] / uuid[2:4] / uuid

    # --- the three storage-area callbacks ------------------------------------------------------

    def create(self, uuid: str, content_type: int, data: bytes) -> None:
        content_type = int(content_type)
        path = self.path_of(uuid)
        key = self._keys.data_key_for_patient(patient_id_of(data, content_type))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{uuid}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                encrypt_stream(io.BytesIO(data), fh, data_key=key.data_key, key_id=key.key_id,
                               associated_data=associated_data(uuid, content_type))
                fh.flush()
                if self._fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read(self, uuid: str, content_type: int) -> bytes:
        content_type = int(content_type)
        out = io.BytesIO()
        with open(self.path_of(uuid), "rb") as fh:
            try:
                decrypt_stream(fh, out, unwrap=self._keys.unwrap_for_header,
                               associated_data=associated_data(uuid, content_type))
            except DecryptionError:
                self._record_failure(uuid, content_type)
                raise
        return out.getvalue()

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

    def recent_failures(self) -> list[IntegrityFailure]:
        with self._journal_lock:
            return list(self._journal.recent)
