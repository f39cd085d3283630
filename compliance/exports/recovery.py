"""Recovery of export jobs: the dispatch of approved requests, job leases, and the sweep's decisions.

The SQL row of a request is the truth; the task queue (Dramatiq on Redis) only carries a hint that
says "look at this request now". So nothing a queue or a worker loses can lose an approval or leave
a job hanging:

**Dispatch (an outbox).** Approving commits ``state = 'approved'`` (the job is queued: the approval's
transaction is the outbox entry) and only *then* hands the id to the queue. ``dispatched_at`` is set
once the queue accepted it, never before. If the queue is unreachable the approval stands (the steward
gets 200 and ``dispatch.status = "pending"``) and the sweep dispatches the request later: an approved
request never dispatched, approved more than ``dispatch_grace_seconds`` ago, or one dispatched more than
``redispatch_after_seconds`` ago that no worker claimed (a message lost with a Redis that restarted
empty). A duplicate message is harmless: the claim is a guarded ``UPDATE ... WHERE state = 'approved'``.

**Leases.** Claiming a request (approved -> running) increments ``attempts`` and sets
``lease_expires_at = now + lease_seconds``; while the job runs, a heartbeat thread
(:class:`LeaseKeeper`) renews the lease every ``lease_seconds / 4``. ``attempts`` is the fencing
token: every write of a job (progress, each delivered batch, finish, fail) is guarded by
``state = 'running' AND attempts = <its attempt>``, so a job whose lease was taken away (its worker
froze, then woke up) can no longer change the request, and stops at its next checkpoint.

**The sweep** (at worker start, then every ``sweep_interval_seconds``: the in-process worker of a
gateway, and every Dramatiq worker process): a ``running`` request whose lease expired (its worker
was killed, lost the database, or its machine died) goes back to ``approved`` for another attempt, or,
after ``max_attempts`` attempts, to ``failed`` with the reason. A ``running`` row without a lease (a job
started before leases existed) counts as expired ``legacy_running_seconds`` after it started.

A re-run is idempotent: a bundle is written under a per-attempt temporary name and renamed when
complete (an interrupted attempt leaves no bundle, and the next attempt removes its leftovers); a
push skips the files an earlier attempt already stored at the destination (``export_delivery_file``),
so they are neither sent nor disclosed twice.

Tunables (settings, prefix ``COMPLIANCE_EXPORTS_``): ``LEASE_SECONDS`` (120), ``MAX_ATTEMPTS`` (3),
``SWEEP_INTERVAL_SECONDS`` (15), ``DISPATCH_GRACE_SECONDS`` (10), ``REDISPATCH_AFTER_SECONDS`` (600).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from compliance.config import Settings
from compliance.errors import ConfigurationError
from compliance.exports.rows import aware

log = logging.getLogger(__name__)

RunningDecision = Literal["keep", "requeue", "fail"]

@dataclass(frozen=True)
class RecoveryPolicy:
    lease_seconds: float = 120.0
    max_attempts: int = 3
    sweep_interval_seconds: float = 15.0
    dispatch_grace_seconds: float = 10.0
    redispatch_after_seconds: float = 600.0
    #: a running row without a lease (started by a worker that predates leases) is expired after this
    legacy_running_seconds: float = 6 * 3600.0

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0 or self.sweep_interval_seconds <= 0:
            raise ConfigurationError("export recovery: lease and sweep interval must be positive")
        if self.max_attempts < 1:
            raise ConfigurationError("export recovery: max_attempts must be at least 1")
        if self.dispatch_grace_seconds < 0 or self.redispatch_after_seconds <= 0:
            raise ConfigurationError("export recovery: dispatch delays must be positive")

    @property
    def heartbeat_seconds(self) -> float:
        """How often a running job renews its lease: four chances before it expires."""
        return self.lease_seconds / 4

    def lease_until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_seconds)

    @classmethod
    def from_settings(cls, settings: Settings) -> RecoveryPolicy:
        """From :class:`compliance.config.Settings` (``COMPLIANCE_EXPORTS_LEASE_SECONDS`` ...)."""
        return cls(lease_seconds=settings.exports_lease_seconds, max_attempts=settings.exports_max_attempts,
                   sweep_interval_seconds=settings.exports_sweep_interval_seconds,
                   dispatch_grace_seconds=settings.exports_dispatch_grace_seconds,
                   redispatch_after_seconds=settings.exports_redispatch_after_seconds)


def lease_expiry(*, lease_expires_at: datetime | None, started_at: datetime | None,
                 policy: RecoveryPolicy) -> datetime | None:
    """When a running job's lease ends; None when nothing tells (no lease, no start: never expires)."""
    lease = aware(lease_expires_at)
    if lease is not None:
        return lease
    started = aware(started_at)
    if started is not None:
        return started + timedelta(seconds=policy.legacy_running_seconds)
    return None


def lease_expired(*, lease_expires_at: datetime | None, started_at: datetime | None, now: datetime,
                  policy: RecoveryPolicy) -> bool:
    expiry = lease_expiry(lease_expires_at=lease_expires_at, started_at=started_at, policy=policy)
    return expiry is not None and expiry <= now


def running_decision(*, attempts: int, lease_expires_at: datetime | None, started_at: datetime | None,
                     now: datetime, policy: RecoveryPolicy) -> RunningDecision:
    """What the sweep does with a running request: keep it (lease alive), requeue it, or fail it."""
    if not lease_expired(lease_expires_at=lease_expires_at, started_at=started_at, now=now, policy=policy):
        return "keep"
    return "fail" if attempts >= policy.max_attempts else "requeue"


def dispatch_due(*, decided_at: datetime | None, dispatched_at: datetime | None, now: datetime,
                 policy: RecoveryPolicy) -> bool:
    """Whether the sweep hands an approved request to the queue (again).

    Never dispatched: once the approval is ``dispatch_grace_seconds`` old (the approving gateway
    dispatches it itself right after its commit; the grace keeps the sweep from racing it).
    Dispatched: when no worker claimed it within ``redispatch_after_seconds`` (the message was lost).
    """
    dispatched = aware(dispatched_at)
    if dispatched is None:
        decided = aware(decided_at)
        return decided is None or decided <= now - timedelta(seconds=policy.dispatch_grace_seconds)
    return dispatched <= now - timedelta(seconds=policy.redispatch_after_seconds)


def interrupted_reason(attempts: int) -> str:
    return (f"the export job was interrupted {attempts} time{'s' if attempts != 1 else ''} (its worker stopped "
            "renewing its lease: killed, crashed or cut off from the database); it is not retried again")


def bundle_file_name(request_id: str, attempt: int) -> str:
    """The bundle of one attempt: ``<id>.bundle``, then ``<id>.<n>.bundle`` for a re-run (attempt n >= 2).

    An attempt never writes the name of another, so a superseded attempt that wakes up cannot
    replace the bundle the request points to.
    """
    return f"{request_id}.bundle" if attempt <= 1 else f"{request_id}.{attempt}.bundle"


def partial_file_name(request_id: str, attempt: int) -> str:
    return f".{request_id}.{attempt}.bundle.part"


class LeaseLost(Exception):
    """The job's lease was taken away (the sweep gave the request to another attempt): stop, write nothing."""


class LeaseKeeper:
    """Renews a running job's lease from a daemon thread while the job runs (``with LeaseKeeper(...)``).

    ``renew()`` returns False when the request is no longer this attempt's: :attr:`lost` is set and the
    job stops at its next :meth:`check`. A renewal that fails (database unreachable) is retried at the
    next beat; if none succeeds before the lease ends, the sweep may hand the request on, and the
    fencing of every write keeps this attempt from changing it afterwards.
    """

    def __init__(self, renew: Callable[[], bool], *, interval_seconds: float, name: str = "export-lease") -> None:
        self._renew = renew
        self._interval = interval_seconds
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self._interval))

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost("the job's lease was lost; another attempt owns the request")

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._renew():
                    self.lost.set()
                    return
            except Exception:
                log.exception("export job: renewing the lease failed; retrying at the next beat")


class NoLease:
    """For a job run outside a worker (tests, the CLI): never lost."""

    def __init__(self) -> None:
        self.lost = threading.Event()

    def check(self) -> None:
        return None
