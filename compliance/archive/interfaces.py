"""The archive domain's errors.

    ComplianceError
    └── IntegrityError
        └── ArchiveIntegrityError    a stored archive file failed to authenticate (corrupted,
                                     truncated, swapped); never returned, always alerted    -> 500
    (erasure is :class:`compliance.crypto.interfaces.KeyDestroyed` -> 410)
"""

from __future__ import annotations

from compliance.errors import IntegrityError

__all__ = ["ArchiveIntegrityError"]


class ArchiveIntegrityError(IntegrityError):
    code = "archive_integrity_failure"
