"""Keyed pseudonyms (HMAC-SHA256 under the project's secret).

Every pseudonym is ``HMAC-SHA256(secret, domain || 0x00 || value)``: the same value gives the same
pseudonym in every file, series and repeated export of one project, and an unrelated one in another
project. Domains keep a patient ID from ever colliding with an accession number of the same text.

- UIDs become ``2.25.<decimal of the first 128 bits>`` (PS3.5 B.2: a UUID-derived UID, at most
  44 characters, well under the 64 of the UI VR).
- Patient ID, patient name and accession number become upper-case base-32 tokens that fit their VR.
- The date offset is per patient, a deterministic whole number of days in [-365, -1] U [1, 365]
  (never zero, so a shifted date never equals its source).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from functools import lru_cache

STANDARD_UID_ROOT = "1.2.840.10008."
MAX_SHIFT_DAYS = 365


class Pseudonymizer:
    #: The pseudonym of a UID, cached: a study repeats its UIDs in every instance.
    uid: Callable[[str], str]

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.uid = lru_cache(maxsize=65536)(self._uid)

    def _mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self._secret, domain.encode() + b"\x00" + value.encode("utf-8"),
                        hashlib.sha256).digest()

    def _token(self, domain: str, value: str, length: int) -> str:
        return base64.b32encode(self._mac(domain, value)).decode("ascii")[:length]

    def _uid(self, uid: str) -> str:
        return "2.25." + str(int.from_bytes(self._mac("uid", uid.strip())[:16], "big"))

    def patient_id(self, patient_key: str) -> str:
        return "PX" + self._token("patient-id", patient_key, 20)

    def patient_name(self, patient_key: str) -> str:
        # Derived from the patient key so every spelling of one patient's name maps alike.
        return "PSEUDONYM^" + self._token("patient-id", patient_key, 20)

    def accession_number(self, accession: str) -> str:
        return "AX" + self._token("accession", accession.strip(), 14)

    def date_offset_days(self, patient_key: str) -> int:
        n = int.from_bytes(self._mac("date-shift", patient_key)[:4], "big") % (2 * MAX_SHIFT_DAYS)
        return n - MAX_SHIFT_DAYS if n < MAX_SHIFT_DAYS else n - MAX_SHIFT_DAYS + 1


def is_standard_uid(uid: str) -> bool:
    """UIDs of the DICOM registry (SOP classes, transfer syntaxes, coding schemes) identify nothing."""
    return uid.startswith(STANDARD_UID_ROOT)


def shift_da(value: str, days: int) -> str | None:
    """Shift a DA value; None when it is not a full YYYYMMDD date (the caller then removes it)."""
    v = value.strip()
    if len(v) != 8 or not v.isdigit():
        return None
    try:
        d = dt.date(int(v[:4]), int(v[4:6]), int(v[6:8]))
    except ValueError:
        return None
    return (d + dt.timedelta(days=days)).strftime("%Y%m%d")


def shift_dt(value: str, days: int) -> str | None:
    v = value.strip()
    head = shift_da(v[:8], days)
    return None if head is None else head + v[8:]
