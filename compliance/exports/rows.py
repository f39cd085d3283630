"""Reading and writing the export domain's rows: the clock, timestamps as the databases return them,
the rows an UPDATE matched, and an export request by id."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from compliance.exports.interfaces import ExportNotFound
from compliance.exports.models import ExportRequest


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """``value`` with its time zone: SQLite returns naive datetimes for timezone-aware columns; they
    were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def iso(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat() if value is not None else None


def load_request(sessions: sessionmaker[Session], request_id: str) -> ExportRequest:
    """The export request ``request_id`` (detached), else :class:`ExportNotFound`."""
    with sessions() as session:
        row = session.get(ExportRequest, request_id)
        if row is None:
            raise ExportNotFound("no such export request")
        return row
