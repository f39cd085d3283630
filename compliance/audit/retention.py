"""Retention of the audit trail: which monthly indices ``compliance audit prune`` may delete.

Policy (``policies/retention.yaml``): ``audit_events_years`` (at least 6, HIPAA 45 CFR
164.316(b)(2)(i)) and ``legal_holds`` (by patient ID or by month). An index ``{prefix}-YYYY.MM`` may
be deleted only when the whole month lies before ``now - years`` (its last instant is older than
the retention) and no hold covers it: a hold on the month, or any event in it naming a held patient.
Everything else is refused with the reason. Deletion is whole indices only: documents are never
deleted one by one, so the hash chain of what is kept stays verifiable from its first kept event
(``compliance audit verify --from N``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from compliance.errors import ConfigurationError

__all__ = ["LegalHold", "PruneDecision", "RetentionPolicy", "plan_prune", "retention_cutoff"]

MIN_YEARS = 6
_MONTH = re.compile(r"^(\d{4})\.(\d{2})$")


@dataclass(frozen=True)
class LegalHold:
    id: str
    reason: str = ""
    patient_ids: tuple[str, ...] = ()
    months: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionPolicy:
    years: int
    holds: tuple[LegalHold, ...] = ()

    @classmethod
    def from_file(cls, path: Path) -> RetentionPolicy:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read the retention policy {path}: {exc}") from exc
        years = data.get("audit_events_years")
        if not isinstance(years, int) or years < MIN_YEARS:
            raise ConfigurationError(f"{path}: audit_events_years must be an integer >= {MIN_YEARS} "
                                     f"(HIPAA 45 CFR 164.316(b)(2)(i)), got {years!r}")
        holds = []
        for raw in data.get("legal_holds") or []:
            if not isinstance(raw, dict) or not raw.get("id"):
                raise ConfigurationError(f"{path}: every legal hold needs an id")
            months = tuple(str(m) for m in raw.get("months") or [])
            bad = [m for m in months if not _MONTH.match(m)]
            if bad:
                raise ConfigurationError(f"{path}: hold {raw['id']}: months are YYYY.MM, got {bad}")
            holds.append(LegalHold(id=str(raw["id"]), reason=str(raw.get("reason") or ""),
                                   patient_ids=tuple(str(p) for p in raw.get("patient_ids") or []),
                                   months=months))
        return cls(years=years, holds=tuple(holds))


def retention_cutoff(now: datetime, years: int) -> datetime:
    """The instant before which an event is out of retention."""
    now = now.astimezone(UTC)
    try:
        return now.replace(year=now.year - years)
    except ValueError:  # 29 February
        return now.replace(year=now.year - years, day=28)


def month_end(month: str) -> datetime:
    """The first instant after month ``YYYY.MM``."""
    m = _MONTH.match(month)
    if not m:
        raise ValueError(f"not a month YYYY.MM: {month!r}")
    year, mon = int(m.group(1)), int(m.group(2))
    return datetime(year + (mon == 12), 1 if mon == 12 else mon + 1, 1, tzinfo=UTC)


@dataclass
class PruneDecision:
    deletable: list[str] = field(default_factory=list)
    #: index -> why it is kept although it was asked for
    refused: dict[str, str] = field(default_factory=dict)


def plan_prune(indices: list[str], prefix: str, policy: RetentionPolicy, *, now: datetime,
               before: str | None, patients_in: Callable[[str, list[str]], int]) -> PruneDecision:
    """Decide for each monthly index of ``prefix`` (``before``: only months before YYYY.MM).

    ``patients_in(index, patient_ids) -> int`` counts the index's events naming any of those patients
    (negative: it cannot tell, and the index is kept).
    """
    cutoff = retention_cutoff(now, policy.years)
    if before is not None:
        if not _MONTH.match(before):
            raise ValueError(f"not a month YYYY.MM: {before!r}")
        start = datetime(int(before[:4]), int(before[5:]), 1, tzinfo=UTC)
        if start > cutoff:
            # Every month before `before` would be asked for; the last of them is still kept by law.
            decision = PruneDecision()
            decision.refused[f"{prefix}-*"] = (
                f"within retention: --before {before} reaches months that must be kept {policy.years} years "
                f"(only months ending before {cutoff:%Y-%m-%d} may go)")
            return decision
    held_patients = sorted({p for h in policy.holds for p in h.patient_ids})
    decision = PruneDecision()
    for index in sorted(indices):
        month = index.removeprefix(f"{prefix}-")
        if index == month or not _MONTH.match(month):
            continue
        if before is not None and month >= before:
            continue
        if month_end(month) > cutoff:
            if before is not None:
                until = month_end(month).replace(year=month_end(month).year + policy.years)
                decision.refused[index] = (f"within retention: events of {month} must be kept until "
                                           f"{until:%Y-%m-%d} ({policy.years} years)")
            continue
        month_holds = [h.id for h in policy.holds if month in h.months]
        if month_holds:
            decision.refused[index] = f"under legal hold {', '.join(month_holds)} (month {month})"
            continue
        if held_patients:
            n = patients_in(index, held_patients)
            if n < 0:
                decision.refused[index] = "legal holds cannot be checked: patient.ids is not a keyword field here"
                continue
            if n:
                holds = [h.id for h in policy.holds if h.patient_ids]
                decision.refused[index] = f"under legal hold {', '.join(holds)}: {n} event(s) about held patients"
                continue
        decision.deletable.append(index)
    return decision
