"""Audit contracts: where audit events go, and the audit domain's errors.

An :class:`AuditSink` receives batches of already-rendered documents (``(uuid, document)`` pairs,
see :func:`compliance.audit.documents.to_document`) from the outbox shipper. Shipping is
at-least-once: the same uuid may arrive twice, and a sink must make the second arrival a no-op
that never overwrites the first (tamper evidence).

    ComplianceError
    ├── AuditFailure
    │   └── AuditSinkUnavailable     the sink could not be reached (retry later)
    └── IntegrityError
        └── AuditMessageInvalid      an ATNA message failed schema validation (a bug, not retryable)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from compliance.errors import AuditFailure, IntegrityError

__all__ = ["AuditMessageInvalid", "AuditSink", "AuditSinkUnavailable", "ShipResult"]


class AuditSinkUnavailable(AuditFailure):
    """The audit repository could not be reached; the batch stays in the outbox."""

    code = "audit_sink_unavailable"


class AuditMessageInvalid(IntegrityError):
    """An audit message does not validate against the DICOM PS3.15 A.5.1 schema."""

    code = "audit_message_invalid"

    def __init__(self, message: str, *, errors: Sequence[str] = ()) -> None:
        super().__init__(message, detail={"errors": list(errors)})
        self.errors = tuple(errors)


@dataclass(frozen=True)
class ShipResult:
    """What happened to one batch.

    ``shipped`` holds every uuid now durably in the sink, including those that were already there
    (a duplicate delivery). ``failed`` maps uuid to reason for documents the sink refused; when
    ``retryable`` is false, sending them again will fail the same way (e.g. a mapping error).
    """

    shipped: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)
    retryable: bool = False
    #: The failed uuids worth sending again (refused for load, not for content).
    retryable_ids: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed


@runtime_checkable
class AuditSink(Protocol):
    def ensure_ready(self) -> None:
        """Prepare the sink (templates, indices); raise :class:`AuditSinkUnavailable` if unreachable."""
        ...

    def ship(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> ShipResult:
        """Store each ``(uuid, document)`` idempotently; raise :class:`AuditSinkUnavailable`."""
        ...
