"""AuditRecorder: turns an AuditEvent into its outbox entry and waits until it is durable.

This is the only way request handlers record audit events. With ``fail_closed`` (the default,
docs/design.md "fail closed") a failure to record raises :class:`~compliance.errors.AuditFailure` and the
request is refused before any PHI leaves the gateway; otherwise the failure is logged loudly and the
request proceeds (a per-deployment choice, documented in docs/configuration.md).
"""

from __future__ import annotations

import logging

from compliance.audit.atna import AuditSource
from compliance.audit.documents import to_document
from compliance.audit.message import AuditEvent
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
from compliance.errors import AuditFailure

log = logging.getLogger(__name__)


class AuditRecorder:
    def __init__(self, outbox: SqlAuditOutbox, source: AuditSource, *, fail_closed: bool = True) -> None:
        self._outbox = outbox
        self.source = source
        self._fail_closed = fail_closed

    def entry(self, event: AuditEvent) -> OutboxEntry:
        return OutboxEntry(
            uuid=event.uuid,
            event_code=event.event_id.code.code,
            occurred_at=event.occurred_at,
            document=to_document(event, self.source),
        )

    async def record(self, event: AuditEvent) -> None:
        try:
            entry = self.entry(event)
            await self._outbox.record(entry)
        except Exception as exc:
            self._failed(event, exc)

    def record_now(self, event: AuditEvent) -> None:
        try:
            self._outbox.append_now([self.entry(event)])
        except Exception as exc:
            self._failed(event, exc)

    def record_many_now(self, events: list[AuditEvent]) -> None:
        """Append several events in one transaction (a batch job's page); all or none are recorded.

        Always fails closed: a batch job has nothing to let through, and its caller must not move on
        as if the events were recorded."""
        if not events:
            return
        try:
            self._outbox.append_now([self.entry(e) for e in events])
        except Exception as exc:
            log.critical("AUDIT EVENTS NOT RECORDED: %d events from %s (%s)", len(events), events[0].uuid, exc)
            if isinstance(exc, AuditFailure):
                raise
            raise AuditFailure("the audit events could not be recorded") from exc

    def _failed(self, event: AuditEvent, exc: Exception) -> None:
        log.critical("AUDIT EVENT NOT RECORDED: %s %s (%s)", event.event_id.code.code, event.uuid, exc)
        if self._fail_closed:
            if isinstance(exc, AuditFailure):
                raise exc
            raise AuditFailure("the audit event could not be recorded") from exc
