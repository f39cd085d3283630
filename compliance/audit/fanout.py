"""Several audit sinks at once, and the sink the settings ask for.

:class:`FanOutAuditSink` is itself an :class:`~compliance.audit.interfaces.AuditSink`: it ships every
batch to each configured sink and reports an event shipped only when every sink holds it, so the
outbox keeps an event pending until the last sink has it. What each sink already received is kept
in table ``audit_outbox_delivery`` (sink, uuid, delivered_at): while one sink is down, the batch
at the head of the outbox still reaches the others, and a sink that has an event never gets it again
from the retries (the syslog receiver has no idempotent ids, unlike Elasticsearch). The outbox
drains in order, so a sink that stays down holds the others back after that batch: they have it,
but nothing newer reaches them until the down sink is back. Visible as the outbox backlog in
``compliance audit status`` and ``/metrics``, and per sink as ``compliance_audit_sink_up{sink=...}``
in ``/metrics`` (from :attr:`FanOutAuditSink.errors`). A crash between a sink's delivery and its
row being written re-sends that batch to that sink: at least once.

The composition root (:attr:`compliance.wiring.Wiring.sink`) chooses from ``COMPLIANCE_AUDIT_SINKS``
(``elasticsearch``, ``syslog``, or both comma-separated); with one sink no fan-out (and no delivery rows)
is involved.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, insert, select

from compliance.audit.interfaces import AuditSink, AuditSinkUnavailable, ShipResult
from compliance.audit.models import AuditOutboxDelivery
from compliance.audit.transactions import audit_transaction
from compliance.db.base import table_of
from compliance.errors import ConfigurationError

if TYPE_CHECKING:

    from compliance.config import Settings

log = logging.getLogger(__name__)

__all__ = ["FanOutAuditSink", "SINK_NAMES", "sink_names"]

_DELIVERY = table_of(AuditOutboxDelivery)
SINK_NAMES = ("elasticsearch", "syslog")


class FanOutAuditSink:
    def __init__(self, sinks: Mapping[str, AuditSink], engine: Engine) -> None:
        if not sinks:
            raise ConfigurationError("at least one audit sink is needed")
        self.sinks = dict(sinks)
        self._engine = engine
        self._ready: set[str] = set()
        #: The last error per sink (None when its last attempt succeeded), for status and metrics.
        self.errors: dict[str, str | None] = {name: None for name in self.sinks}

    def ensure_ready(self) -> None:
        # Readiness is checked per sink inside ship(): one sink being down must not stop the others.
        return None

    def _delivered(self, name: str, uuids: Sequence[str]) -> set[str]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(_DELIVERY.c.uuid).where(_DELIVERY.c.sink == name,
                                                                _DELIVERY.c.uuid.in_(list(uuids))))
            return {r.uuid for r in rows}

    def _record(self, name: str, uuids: Sequence[str]) -> None:
        if uuids:
            now = datetime.now(UTC)
            with audit_transaction(self._engine, rows=len(uuids)) as conn:
                conn.execute(insert(_DELIVERY), [{"sink": name, "uuid": u, "delivered_at": now} for u in uuids])

    def ship(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> ShipResult:
        return self._ship(batch)

    def ship_serialized(self, batch: Sequence[tuple[str, str]]) -> ShipResult:
        """:meth:`ship` for the outbox's stored JSON text: a sink that takes text gets it unchanged,
        the others get it parsed (once per batch)."""
        return self._ship(batch)

    def _ship(self, batch: Sequence[tuple[str, str | dict[str, Any]]]) -> ShipResult:
        uuids = [u for u, _ in batch]
        parsed: dict[str, dict[str, Any]] = {}
        have_all = set(uuids)
        failed: dict[str, str] = {}
        retryable: list[str] = []
        unavailable: list[str] = []
        for name, sink in self.sinks.items():
            done = self._delivered(name, uuids)
            todo = [(u, d) for u, d in batch if u not in done]
            if todo:
                try:
                    if name not in self._ready:
                        sink.ensure_ready()
                        self._ready.add(name)
                    result = self._ship_to(sink, todo, parsed)
                except AuditSinkUnavailable as exc:
                    self._ready.discard(name)
                    self.errors[name] = str(exc)
                    unavailable.append(f"{name}: {exc}")
                    have_all -= {u for u, _ in todo}
                    continue
                self._record(name, result.shipped)
                self.errors[name] = None
                done |= set(result.shipped)
                for u, reason in result.failed.items():
                    failed[u] = f"{name}: {reason}"
                retryable.extend(result.retryable_ids)
            have_all &= done
        if unavailable and not have_all:
            raise AuditSinkUnavailable("; ".join(unavailable))
        if unavailable:
            log.warning("audit sinks unavailable, their events stay pending: %s", "; ".join(unavailable))
        return ShipResult(shipped=tuple(u for u in uuids if u in have_all), failed=failed,
                          retryable=bool(retryable), retryable_ids=tuple(retryable))

    @staticmethod
    def _ship_to(sink: AuditSink, todo: list[tuple[str, str | dict[str, Any]]],
                 parsed: dict[str, dict[str, Any]]) -> ShipResult:
        ship_serialized = getattr(sink, "ship_serialized", None)
        if ship_serialized is not None and all(isinstance(d, str) for _, d in todo):
            result: ShipResult = ship_serialized(todo)
            return result
        documents: list[tuple[str, dict[str, Any]]] = []
        unreadable: dict[str, str] = {}
        for u, d in todo:
            if isinstance(d, str):
                if u not in parsed:
                    try:
                        parsed[u] = orjson.loads(d)
                    except orjson.JSONDecodeError as exc:
                        unreadable[u] = f"invalid stored document: {exc}"
                        continue
                d = parsed[u]
            documents.append((u, d))
        result = sink.ship(documents) if documents else ShipResult()
        if unreadable:
            result = ShipResult(shipped=result.shipped, failed={**result.failed, **unreadable},
                                retryable=result.retryable, retryable_ids=result.retryable_ids)
        return result

    def close(self) -> None:
        for sink in self.sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                close()


def sink_names(settings: Settings) -> list[str]:
    names = [n.strip().lower() for n in settings.audit_sinks.split(",") if n.strip()]
    unknown = [n for n in names if n not in SINK_NAMES]
    if unknown or not names:
        raise ConfigurationError(f"COMPLIANCE_AUDIT_SINKS: unknown or empty sink list {settings.audit_sinks!r} "
                                 f"(choose from {', '.join(SINK_NAMES)})")
    return list(dict.fromkeys(names))
