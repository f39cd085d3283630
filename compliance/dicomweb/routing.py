"""Which DICOMweb transaction a request path is (PS3.18 10.4 WADO-RS, 10.5 STOW-RS, 10.6 QIDO-RS).

Only the shapes listed here are proxied; anything else is answered 404 by the gateway and never
reaches the archive, so an unlisted archive endpoint cannot be reached through a crafted path.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass


class Transaction(enum.Enum):
    SEARCH = "search"  # QIDO-RS
    RETRIEVE = "retrieve"  # WADO-RS of whole instances (DICOM PS3.10 objects leave the archive)
    ACCESS = "access"  # WADO-RS metadata, frames, bulk data, rendered, thumbnails
    STORE = "store"  # STOW-RS


PERMISSIONS = {
    Transaction.SEARCH: "dicomweb:study:search",
    Transaction.RETRIEVE: "dicomweb:study:read",
    Transaction.ACCESS: "dicomweb:study:read",
    Transaction.STORE: "dicomweb:study:store",
}


@dataclass(frozen=True)
class Route:
    transaction: Transaction
    study_uid: str | None = None
    series_uid: str | None = None
    instance_uid: str | None = None

    @property
    def permission(self) -> str:
        return PERMISSIONS[self.transaction]


#: A UID component (PS3.5 9.1): digits, no leading zero; a UID is components joined by dots.
_U = r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*"
#: PS3.5 9.1: "the total length of a UID shall not exceed 64 characters".
UID_MAX_LENGTH = 64
_UID = re.compile(_U)
_ST = rf"/studies/(?P<study>{_U})"
_SE = rf"{_ST}/series/(?P<series>{_U})"
_IN = rf"{_SE}/instances/(?P<instance>{_U})"
_FRAMES = r"/frames/[1-9][0-9]*(?:,[1-9][0-9]*)*"

# Every pattern is matched against the whole path (``fullmatch``): ``$`` would also match before a
# trailing newline, so ``/studies/<uid>%0A`` would pass as a retrieve of ``<uid>``. ``[0-9]`` rather
# than ``\d``, which matches other scripts' digits too.
_GET_ROUTES: list[tuple[re.Pattern[str], Transaction]] = [
    (re.compile(p + r"/?"), t)
    for p, t in [
        (r"/studies", Transaction.SEARCH),
        (r"/series", Transaction.SEARCH),
        (r"/instances", Transaction.SEARCH),
        (rf"{_ST}/series", Transaction.SEARCH),
        (rf"{_ST}/instances", Transaction.SEARCH),
        (rf"{_SE}/instances", Transaction.SEARCH),
        (rf"{_ST}", Transaction.RETRIEVE),
        (rf"{_SE}", Transaction.RETRIEVE),
        (rf"{_IN}", Transaction.RETRIEVE),
        (rf"{_ST}/(?:metadata|rendered|thumbnail)", Transaction.ACCESS),
        (rf"{_SE}/(?:metadata|rendered|thumbnail)", Transaction.ACCESS),
        (rf"{_IN}/(?:metadata|rendered|thumbnail)", Transaction.ACCESS),
        (rf"{_IN}{_FRAMES}", Transaction.ACCESS),
        (rf"{_IN}{_FRAMES}/(?:rendered|thumbnail)", Transaction.ACCESS),
        # Bulk data URIs as Orthanc's DICOMweb plugin writes them into metadata.
        (rf"{_IN}/bulk/[0-9A-Fa-f]{{8}}(?:/[0-9]+/[0-9A-Fa-f]{{8}})*", Transaction.ACCESS),
    ]
]
_POST_ROUTES = [
    (re.compile(r"/studies/?"), Transaction.STORE),
    (re.compile(rf"{_ST}/?"), Transaction.STORE),
]


def is_uid(value: str) -> bool:
    """Whether ``value`` is a DICOM UID (PS3.5 9.1): digit components without leading zeros, joined by
    dots, at most 64 characters. The whole string is matched: no trailing newline, no NUL."""
    return len(value) <= UID_MAX_LENGTH and _UID.fullmatch(value) is not None


@functools.lru_cache(maxsize=8192)
def classify(method: str, path: str) -> Route | None:
    """The transaction of ``path`` (relative to the DICOMweb root), or None when not proxied.

    The path must match a shape whole, and each UID in it must be a UID (:func:`is_uid`).
    Cached: viewers ask for the same resources again and again, and a :class:`Route` is immutable."""
    routes = _GET_ROUTES if method in ("GET", "HEAD") else _POST_ROUTES if method == "POST" else []
    for pattern, transaction in routes:
        m = pattern.fullmatch(path)
        if m:
            groups = m.groupdict()
            uids = [groups.get("study"), groups.get("series"), groups.get("instance")]
            if any(uid is not None and len(uid) > UID_MAX_LENGTH for uid in uids):
                return None
            return Route(transaction, *uids)
    return None
