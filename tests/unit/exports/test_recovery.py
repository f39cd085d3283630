"""Recovery's pure decisions (``compliance.exports.recovery``): the policy, lease expiry, what the sweep
does with a running request, when an approval is dispatched again, bundle names, the lease keeper.

The workflow around them: test_requests (dispatch), test_ledger (leases and the sweep), test_bundle_delivery
and test_push_delivery (re-runs)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from compliance.errors import ConfigurationError
from compliance.exports.recovery import (
    LeaseKeeper,
    LeaseLost,
    RecoveryPolicy,
    bundle_file_name,
    dispatch_due,
    lease_expired,
    running_decision,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = RecoveryPolicy(lease_seconds=120, max_attempts=3, dispatch_grace_seconds=10, redispatch_after_seconds=600)


def test_policy_from_settings(monkeypatch):
    from compliance.config import Settings

    monkeypatch.setenv("COMPLIANCE_EXPORTS_LEASE_SECONDS", "30")
    monkeypatch.setenv("COMPLIANCE_EXPORTS_MAX_ATTEMPTS", "5")
    policy = RecoveryPolicy.from_settings(Settings(exports_sweep_interval_seconds=2))
    assert (policy.lease_seconds, policy.max_attempts, policy.sweep_interval_seconds) == (30.0, 5, 2.0)
    assert policy.heartbeat_seconds == 7.5
    monkeypatch.delenv("COMPLIANCE_EXPORTS_LEASE_SECONDS")
    monkeypatch.delenv("COMPLIANCE_EXPORTS_MAX_ATTEMPTS")
    assert RecoveryPolicy.from_settings(Settings()) == RecoveryPolicy()
    with pytest.raises(ConfigurationError):
        RecoveryPolicy.from_settings(Settings(exports_max_attempts=0))
    with pytest.raises(ConfigurationError):
        RecoveryPolicy(lease_seconds=0)


def test_lease_expiry():
    def expired(lease, started=None, now=T0):  # type: ignore[no-untyped-def]
        return lease_expired(lease_expires_at=lease, started_at=started, now=now, policy=POLICY)

    assert not expired(T0 + timedelta(seconds=1))
    assert expired(T0)  # the end of the lease is the end
    assert expired(T0 - timedelta(seconds=1))
    assert expired((T0 - timedelta(seconds=1)).replace(tzinfo=None))  # SQLite gives naive UTC back
    # a row running since before leases existed: expired a long while after it started, not at once
    assert not expired(None, started=T0 - timedelta(hours=1))
    assert expired(None, started=T0 - timedelta(seconds=POLICY.legacy_running_seconds))
    assert not expired(None, started=None)


@pytest.mark.parametrize(("attempts", "lease", "decision"), [
    (1, T0 + timedelta(seconds=5), "keep"),
    (1, T0 - timedelta(seconds=5), "requeue"),
    (2, T0 - timedelta(seconds=5), "requeue"),
    (3, T0 - timedelta(seconds=5), "fail"),  # max_attempts = 3: the third interrupted attempt is the last
    (3, T0 + timedelta(seconds=5), "keep"),
    (7, T0 - timedelta(seconds=5), "fail"),
])
def test_running_decision(attempts, lease, decision):  # type: ignore[no-untyped-def]
    assert running_decision(attempts=attempts, lease_expires_at=lease, started_at=T0 - timedelta(minutes=5), now=T0,
                            policy=POLICY) == decision


def test_dispatch_decision():
    def due(decided, dispatched):  # type: ignore[no-untyped-def]
        return dispatch_due(decided_at=decided, dispatched_at=dispatched, now=T0, policy=POLICY)

    # never dispatched: the approving gateway's own attempt gets the grace period, then the sweep takes over
    assert not due(T0 - timedelta(seconds=9), None)
    assert due(T0 - timedelta(seconds=10), None)
    assert due(None, None)
    # dispatched: again only when nobody claimed it for a long time (a lost message)
    assert not due(T0 - timedelta(hours=1), T0 - timedelta(seconds=599))
    assert due(T0 - timedelta(hours=1), T0 - timedelta(seconds=600))


def test_bundle_names_never_collide_across_attempts():
    names = {bundle_file_name("r", n) for n in (1, 2, 3)}
    assert names == {"r.bundle", "r.2.bundle", "r.3.bundle"}


def test_lease_keeper_flags_a_lost_lease():
    calls = []
    renewed = threading.Event()

    def renew() -> bool:
        calls.append(1)
        renewed.set()
        return len(calls) < 2  # the second renewal finds the request handed on

    with LeaseKeeper(renew, interval_seconds=0.01) as lease:
        assert lease.lost.wait(10), "the keeper never noticed"
        with pytest.raises(LeaseLost):
            lease.check()
    assert len(calls) == 2  # it stops renewing once lost
