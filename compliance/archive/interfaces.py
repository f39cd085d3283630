"""The archive domain's errors (and the one limit its custodian and the gateway share).

    ComplianceError
    └── IntegrityError
        └── ArchiveIntegrityError    a stored archive file failed to authenticate (corrupted,
                                     truncated, swapped); never returned, always alerted    -> 500
    (erasure is :class:`compliance.crypto.interfaces.KeyDestroyed` -> 410)
"""

from __future__ import annotations

from compliance.errors import IntegrityError

__all__ = ["MAX_FAILURE_WINDOW", "ArchiveIntegrityError"]

#: The longest look back (seconds) the custodian's ``/compliance/archive/failures`` answers.
MAX_FAILURE_WINDOW = 3600


class ArchiveIntegrityError(IntegrityError):
    code = "archive_integrity_failure"
