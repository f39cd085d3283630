"""The delivery log of a push: per file, what a DICOMweb destination was sent and what it answered
(``export_delivery_file``), recorded as each batch leaves and as it is answered. A request shows it
while its job runs and after a job that was killed (:func:`live_delivery`); a re-run reads it to skip
what an earlier attempt stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TypedDict

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.db.session import rows_matched
from compliance.exports.interfaces import InstanceReport
from compliance.exports.ledger import fence
from compliance.exports.models import ExportDeliveryFile, ExportRequest
from compliance.exports.recovery import RecoveryPolicy


class DestinationRef(TypedDict):
    name: str | None
    kind: str | None


class LiveDelivery(TypedDict):
    """A push's delivery as its log holds it, shown until the job ends (then its
    :class:`~compliance.exports.interfaces.DeliveryReport`)."""

    destination: DestinationRef
    recorded: str
    in_progress: bool
    stored: int
    failed: int
    unconfirmed: int
    sending: int
    files: list[InstanceReport]


def live_delivery(row: ExportRequest, files: list[ExportDeliveryFile]) -> LiveDelivery:
    """A push's delivery as recorded batch by batch (``export_delivery_file``), before (or without) its end.

    What a request shows while its job runs, and after a job that was killed: which files the
    destination stored, refused, or has not answered for (``sending``: the batch was on its way).
    """
    counts = {status: 0 for status in ("stored", "failed", "unconfirmed", "sending")}
    out_files = []
    for f in sorted(files, key=lambda f: (f.instance, f.sop_instance_uid)):
        counts[f.status] += 1
        entry = InstanceReport(instance=f.instance, sop_instance_uid=f.sop_instance_uid, status=f.status,
                               attempt=f.attempt)
        if f.reason:
            entry["reason"] = f.reason
        out_files.append(entry)
    dest = json.loads(row.destination)
    return LiveDelivery(destination=DestinationRef(name=dest.get("name"), kind=dest.get("kind")),
                        recorded="per batch", in_progress=row.state == "running", stored=counts["stored"],
                        failed=counts["failed"], unconfirmed=counts["unconfirmed"], sending=counts["sending"],
                        files=out_files)


class DeliveryLog:
    def __init__(self, sessions: sessionmaker[Session], *, recovery: RecoveryPolicy,
                 clock: Callable[[], datetime]) -> None:
        self._sessions = sessions
        self.recovery = recovery
        self._clock = clock

    def delivered_files(self, request_id: str) -> dict[str, ExportDeliveryFile]:
        with self._sessions() as session:
            return {f.sop_instance_uid: f for f in session.scalars(
                select(ExportDeliveryFile).where(ExportDeliveryFile.request_id == request_id))}

    def live(self, session: Session, row: ExportRequest) -> LiveDelivery | None:
        """The push's delivery as recorded so far (:func:`live_delivery`), read in ``session``; None
        when no file was recorded."""
        files = list(session.scalars(select(ExportDeliveryFile).where(ExportDeliveryFile.request_id == row.id)))
        return live_delivery(row, files) if files else None

    def record_sending(self, request_id: str, attempt: int, batch: int, files: list[tuple[str, int]]) -> bool:
        """Before a batch leaves: its files are ``sending``; False (nothing written) if the attempt lost the request.

        Renews the lease in the same transaction: the fencing check and the record are one commit.
        """
        now = self._clock()
        with self._sessions() as session, session.begin():
            if not rows_matched(session.execute(update(ExportRequest).where(*fence(request_id, attempt))
                                            .values(lease_expires_at=self.recovery.lease_until(now)))):
                return False
            uids = [uid for uid, _ in files]
            session.execute(delete(ExportDeliveryFile).where(ExportDeliveryFile.request_id == request_id,
                                                             ExportDeliveryFile.sop_instance_uid.in_(uids)))
            session.add_all(ExportDeliveryFile(request_id=request_id, sop_instance_uid=uid, instance=instance,
                                               batch=batch, attempt=attempt, status="sending", updated_at=now)
                            for uid, instance in files)
        return True

    def record_outcomes(self, request_id: str, attempt: int, outcomes: dict[str, tuple[str, str | None]]) -> bool:
        """After a batch: what the destination answered, per file (guarded like every write of the job)."""
        now = self._clock()
        with self._sessions() as session, session.begin():
            if session.scalar(select(ExportRequest.id).where(*fence(request_id, attempt))) is None:
                return False
            for uid, (status, reason) in outcomes.items():
                session.execute(update(ExportDeliveryFile).where(
                    ExportDeliveryFile.request_id == request_id, ExportDeliveryFile.sop_instance_uid == uid,
                    ExportDeliveryFile.attempt == attempt).values(status=status, reason=reason, updated_at=now))
        return True
