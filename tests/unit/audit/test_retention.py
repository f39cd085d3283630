"""Retention and legal holds decide which monthly indices may be pruned (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from compliance.audit.retention import RetentionPolicy, plan_prune, retention_cutoff
from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
INDICES = ["a-2019.01", "a-2020.10", "a-2020.11", "a-2020.12", "a-2026.11", "a-checkpoints", "b-2010.01"]


def policy(tmp_path, text: str) -> RetentionPolicy:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return RetentionPolicy.from_file(p)


def test_the_shipped_policy_keeps_six_years():
    # (any policy that loads keeps at least six: the shipped one keeps exactly the HIPAA minimum)
    assert RetentionPolicy.from_file(PROJECT_ROOT / "policies" / "retention.yaml").years == 6


@pytest.mark.parametrize("years", ["5", "0", "six", "-1"])
def test_less_than_six_years_is_refused(tmp_path, years):
    with pytest.raises(ConfigurationError, match=">= 6"):
        policy(tmp_path, f"audit_events_years: {years}\n")


def test_only_whole_months_older_than_retention_are_deletable(tmp_path):
    pol = policy(tmp_path, "audit_events_years: 6\n")
    assert retention_cutoff(NOW, 6) == datetime(2020, 11, 28, 12, tzinfo=UTC)
    plan = plan_prune(INDICES, "a", pol, now=NOW, before=None, patients_in=lambda i, p: 0)
    # 2020.11 ends after the cutoff (Nov 28, 2020), so it is still within retention
    assert plan.deletable == ["a-2019.01", "a-2020.10"]
    assert plan.refused == {}


def test_before_within_retention_is_refused(tmp_path):
    pol = policy(tmp_path, "audit_events_years: 6\n")
    for before in ("2021.01", "2020.12", "2026.11"):
        plan = plan_prune(INDICES, "a", pol, now=NOW, before=before, patients_in=lambda i, p: 0)
        assert plan.deletable == [] and list(plan.refused) == ["a-*"], before
        assert all(r.startswith("within retention") for r in plan.refused.values())
    # the first month starting before the cutoff (Nov 28, 2020) is the latest allowed --before
    plan = plan_prune(INDICES, "a", pol, now=NOW, before="2020.11", patients_in=lambda i, p: 0)
    assert plan.deletable == ["a-2019.01", "a-2020.10"] and plan.refused == {}


def test_an_index_whose_holds_cannot_be_checked_is_kept(tmp_path):
    pol = policy(tmp_path, "audit_events_years: 6\nlegal_holds:\n  - {id: LH-2, patient_ids: [P9]}\n")
    plan = plan_prune(["a-2019.01"], "a", pol, now=NOW, before=None, patients_in=lambda i, p: -1)
    assert plan.deletable == [] and "cannot be checked" in plan.refused["a-2019.01"]


def test_holds_by_month_and_by_patient_keep_indices(tmp_path):
    pol = policy(tmp_path, "audit_events_years: 6\nlegal_holds:\n"
                           "  - {id: LH-1, months: ['2019.01']}\n  - {id: LH-2, patient_ids: [P9]}\n")
    counts = {"a-2020.10": 3}
    plan = plan_prune(INDICES, "a", pol, now=NOW, before=None, patients_in=lambda i, p: counts.get(i, 0))
    assert plan.deletable == []
    assert "LH-1" in plan.refused["a-2019.01"] and "LH-2" in plan.refused["a-2020.10"]


def test_a_hold_without_id_or_with_a_bad_month_is_refused(tmp_path):
    with pytest.raises(ConfigurationError):
        policy(tmp_path, "audit_events_years: 6\nlegal_holds:\n  - {months: ['2019.01']}\n")
    with pytest.raises(ConfigurationError):
        policy(tmp_path, "audit_events_years: 6\nlegal_holds:\n  - {id: X, months: ['2019-01']}\n")
