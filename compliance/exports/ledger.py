"""The job ledger of export requests: claims, leases and attempts, the fenced writes of a running job,
and the sweep's recovery of the jobs whose lease expired.

A claim (approved -> running) is a guarded ``UPDATE ... WHERE state = 'approved'``, so two workers
never both succeed; it increments ``attempts``, the fencing token, and takes a lease. Every write of
the job (progress, finish, fail, and the delivery log's batches) is guarded by :func:`fence`: still
running, and still this attempt's. See :mod:`compliance.exports.recovery` for the policy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit.codes import Action, Outcome
from compliance.db.session import rows_matched
from compliance.exports.audit import ExportAudit
from compliance.exports.interfaces import DeliveryReport, DisclosedPatient, DisclosedStudy
from compliance.exports.keys import ProjectKeyStore, seal_disclosure
from compliance.exports.models import ExportDeliveryFile, ExportRequest
from compliance.exports.recovery import RecoveryPolicy, interrupted_reason, running_decision
from compliance.exports.rows import iso, load_request


def fence(request_id: str, attempt: int | None) -> list[ColumnElement[bool]]:
    """The guard of every write of a running job: still running, and still this attempt's."""
    guard = [ExportRequest.id == request_id, ExportRequest.state == "running"]
    if attempt is not None:
        guard.append(ExportRequest.attempts == attempt)
    return guard


class JobLedger:
    def __init__(self, sessions: sessionmaker[Session], audit: ExportAudit, keys: ProjectKeyStore, *,
                 recovery: RecoveryPolicy, bundle_ttl: timedelta, clock: Callable[[], datetime]) -> None:
        self._sessions = sessions
        self._audit = audit
        self._keys = keys
        self.recovery = recovery
        self._bundle_ttl = bundle_ttl
        self._clock = clock

    def load(self, request_id: str) -> ExportRequest:
        return load_request(self._sessions, request_id)

    # -- claims and leases ---------------------------------------------------------------------
    def claimable(self, limit: int = 10) -> list[str]:
        with self._sessions() as session, session.begin():
            q = select(ExportRequest.id).where(ExportRequest.state == "approved").order_by(
                ExportRequest.decided_at).limit(limit)
            if session.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            return list(session.scalars(q))

    def claim(self, request_id: str, worker: str) -> int | None:
        """approved -> running, for exactly one worker (a guarded UPDATE on every database).

        Returns the attempt number (the fencing token of this run, 1 for the first), or None when
        another worker has the request (or it is no longer approved).
        """
        now = self._clock()
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(
                update(ExportRequest).where(ExportRequest.id == request_id, ExportRequest.state == "approved")
                .values(state="running", worker=worker[:128], started_at=now, attempts=ExportRequest.attempts + 1,
                        lease_expires_at=self.recovery.lease_until(now))))
        if not done:
            return None
        row = self.load(request_id)
        attempt = row.attempts
        suffix = f" (attempt {attempt} of {self.recovery.max_attempts})" if attempt > 1 else ""
        self._audit.step(None, row, Action.UPDATE, "running", description=f"export job started on {worker}{suffix}")
        return attempt

    def renew_lease(self, request_id: str, attempt: int) -> bool:
        """Extend the running attempt's lease; False when the request is no longer this attempt's."""
        with self._sessions() as session, session.begin():
            return bool(rows_matched(session.execute(update(ExportRequest).where(*fence(request_id, attempt))
                                                 .values(lease_expires_at=self.recovery.lease_until(self._clock())))))

    def owns(self, request_id: str, attempt: int) -> bool:
        with self._sessions() as session:
            return session.scalar(select(ExportRequest.id).where(*fence(request_id, attempt))) is not None

    # -- the job's writes ----------------------------------------------------------------------
    def progress(self, request_id: str, *, attempt: int | None = None, **counters: int) -> bool:
        with self._sessions() as session, session.begin():
            return bool(rows_matched(session.execute(update(ExportRequest).where(*fence(request_id, attempt))
                                                 .values(**counters))))

    def finish(self, request_id: str, *, bundle_path: Path, bundle_size: int, checksum: str,
               patients: list[DisclosedPatient], studies: list[DisclosedStudy],
               counters: dict[str, int], attempt: int | None = None) -> bool:
        """running -> ready with the bundle; False (nothing changed) if the attempt no longer owns the request."""
        row = self.load(request_id)
        sealed = seal_disclosure(self._keys, row.project, request_id, patients, studies)
        now = self._clock()
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(update(ExportRequest).where(*fence(request_id, attempt)).values(
                state="ready", finished_at=now, expires_at=now + self._bundle_ttl, bundle_path=str(bundle_path),
                bundle_size=bundle_size, checksum_sha256=checksum, disclosure_sealed=sealed, lease_expires_at=None,
                **counters)))
        if done:
            self._audit.step(None, self.load(request_id), Action.UPDATE, "ready")
        return bool(done)

    def finish_delivery(self, request_id: str, *, delivery: DeliveryReport,
                        patients: list[DisclosedPatient], studies: list[DisclosedStudy],
                        counters: dict[str, int], attempt: int | None = None) -> bool:
        """A push to a DICOMweb destination ended with at least one instance stored: ready, no bundle."""
        row = self.load(request_id)
        sealed = seal_disclosure(self._keys, row.project, request_id, patients, studies)
        partial = delivery["stored"] < delivery["released"]
        error = (f"partial delivery: {delivery['stored']} of {delivery['released']} released instances stored at "
                 f"{delivery['destination']['name']} (see delivery.files)") if partial else None
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(update(ExportRequest).where(*fence(request_id, attempt)).values(
                state="ready", finished_at=self._clock(), disclosure_sealed=sealed, error=error,
                delivery=json.dumps(delivery, sort_keys=True), lease_expires_at=None, **counters)))
        if done:
            self._audit.step(None, self.load(request_id), Action.UPDATE, "ready",
                             outcome=Outcome.MINOR_FAILURE if partial else Outcome.SUCCESS,
                             description=f"export delivered to {delivery['destination']['name']}: "
                                         f"{delivery['stored']} stored, {delivery['failed']} failed, "
                                         f"{delivery['unconfirmed']} unconfirmed")
        return bool(done)

    def fail(self, request_id: str, error: str, counters: dict[str, int] | None = None,
             delivery: DeliveryReport | None = None, *, attempt: int | None = None) -> bool:
        extra = {"delivery": json.dumps(delivery, sort_keys=True)} if delivery is not None else {}
        with self._sessions() as session, session.begin():
            done = rows_matched(session.execute(update(ExportRequest).where(*fence(request_id, attempt)).values(
                state="failed", finished_at=self._clock(), error=error[:2000], lease_expires_at=None,
                **(counters or {}), **extra)))
        if done:
            self._audit.step(None, self.load(request_id), Action.UPDATE, "failed", outcome=Outcome.SERIOUS_FAILURE,
                             description=f"export job failed: {error[:500]}")
        return bool(done)

    # -- recovery (the sweep) ------------------------------------------------------------------
    def recover_expired(self) -> dict[str, list[str]]:
        """Running requests whose lease expired: back to approved (requeued), or failed after max attempts."""
        now = self._clock()
        policy = self.recovery
        with self._sessions() as session:
            rows = session.execute(select(ExportRequest.id, ExportRequest.attempts, ExportRequest.lease_expires_at,
                                          ExportRequest.started_at, ExportRequest.worker)
                                   .where(ExportRequest.state == "running")).all()
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for request_id, attempts, lease, started, worker in rows:
            decision = running_decision(attempts=attempts, lease_expires_at=lease, started_at=started, now=now,
                                        policy=policy)
            if decision == "keep":
                continue
            # guarded: still running, still that attempt, and its lease not renewed meanwhile
            unrenewed = (ExportRequest.lease_expires_at.is_(None) if lease is None
                         else ExportRequest.lease_expires_at <= now)
            guard = [*fence(request_id, attempts), unrenewed]
            lost = (f"export job attempt {attempts} on {worker or 'an unknown worker'} stopped renewing its lease "
                    f"(expired {iso(lease) or 'unknown'})")
            if decision == "requeue":
                with self._sessions() as session, session.begin():
                    done = rows_matched(session.execute(update(ExportRequest).where(*guard).values(
                        state="approved", lease_expires_at=None, dispatched_at=None)))
                if done:
                    out["requeued"].append(request_id)
                    self._audit.step(None, self.load(request_id), Action.UPDATE, "requeued",
                                     outcome=Outcome.MINOR_FAILURE,
                                     description=f"{lost}; queued again for attempt {attempts + 1} of "
                                                 f"{policy.max_attempts}")
                continue
            reason = interrupted_reason(attempts)
            with self._sessions() as session, session.begin():
                done = rows_matched(session.execute(update(ExportRequest).where(*guard).values(
                    state="failed", finished_at=now, lease_expires_at=None, error=reason)))
                if done:
                    # a batch on its way when the last attempt died: its outcome is unknown (it may be stored)
                    session.execute(update(ExportDeliveryFile).where(
                        ExportDeliveryFile.request_id == request_id, ExportDeliveryFile.status == "sending").values(
                        status="unconfirmed", updated_at=now,
                        reason="the job was interrupted while this batch was being sent; the destination's answer "
                               "is unknown"))
            if done:
                out["failed"].append(request_id)
                self._audit.step(None, self.load(request_id), Action.UPDATE, "failed",
                                 outcome=Outcome.SERIOUS_FAILURE, description=f"{lost}; {reason}")
        return out
