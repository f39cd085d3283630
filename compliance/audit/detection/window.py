"""The window of a detection run: the events it examines, held back to the oldest unshipped event.

Why no event is skipped: see :mod:`compliance.audit.detection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import Engine, func, select

from compliance.audit.models import AuditOutboxRow
from compliance.db.base import table_of


@dataclass(frozen=True)
class Backlog:
    """Events recorded but not yet shipped to every sink: how many, and the time of the oldest."""

    pending: int = 0
    oldest: datetime | None = None


class ShippingBacklog(Protocol):
    def unshipped(self) -> Backlog:
        """The outbox's events still waiting to be shipped."""
        ...


_OUTBOX = table_of(AuditOutboxRow)


class OutboxBacklog:
    """The unshipped events of the SQL outbox (the one every gateway process and CLI records into)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def unshipped(self) -> Backlog:
        with self._engine.connect() as conn:
            count, oldest = conn.execute(select(func.count(), func.min(_OUTBOX.c.occurred_at))
                                         .where(_OUTBOX.c.shipped_at.is_(None))).one()
        if oldest is not None and oldest.tzinfo is None:  # SQLite: stored as UTC, returned naive
            oldest = oldest.replace(tzinfo=UTC)
        return Backlog(int(count or 0), oldest)


def _millis(moment: datetime) -> datetime:
    """``moment`` in UTC, cut to the millisecond: the precision of ``@timestamp`` and of the queries."""
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class DetectionWindow:
    start: datetime
    end: datetime
    #: The end asked for (``--until``, or now minus settle_seconds), before it was held back.
    requested_end: datetime
    #: The outbox backlog that held the end back (None: the end is the one asked for).
    held_back: Backlog | None = None

    @property
    def empty(self) -> bool:
        return self.start >= self.end


def detection_window(*, now: datetime, settle: timedelta, initial_lookback: timedelta, backlog: Backlog,
                     since: datetime | None = None, until: datetime | None = None,
                     last_end: datetime | None = None) -> DetectionWindow:
    """The events a run examines: ``[start, end)`` by event time.

    ``end`` is ``until`` (default ``now - settle``) but never later than the oldest event still waiting
    to be shipped: that event, and any shipped one after it, will be examined by a later run, which
    starts where this one ends. ``start`` is ``since``, else the previous run's end, else ``end`` minus
    the initial look-back. Both are cut to the millisecond (``@timestamp``'s precision), so the window
    a run reports is exactly the one it queried.
    """
    requested = _millis(until if until is not None else now - settle)
    end, held = requested, None
    if backlog.oldest is not None and _millis(backlog.oldest) < requested:
        end, held = _millis(backlog.oldest), backlog
    start = _millis(since if since is not None else last_end if last_end is not None else end - initial_lookback)
    return DetectionWindow(start, end, requested, held)
