"""The detection policy: which rules run, with which settings (``policies/detections.yaml``, restricted
patients in ``policies/vip-patients.yaml``). See :mod:`compliance.audit.detection` for the rules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from compliance.audit.codes import Code, EventTypeCode, Outcome
from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError

DEFAULT_POLICY_FILE = PROJECT_ROOT / "policies" / "detections.yaml"
RULES = ("after_hours", "volume_spike", "same_family_name", "vip_access", "disabled_account", "failed_auth_burst")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class RuleSettings:
    enabled: bool
    alert_type: Code
    outcome: Outcome
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectionPolicy:
    timezone: ZoneInfo
    initial_lookback: timedelta
    settle: timedelta
    access_event_ids: tuple[str, ...]
    rules: Mapping[str, RuleSettings]
    vip_patients: frozenset[str] = frozenset()
    vip_exempt_users: frozenset[str] = frozenset()
    business_start: time = time(7, 0)
    business_end: time = time(19, 0)
    business_days: frozenset[int] = frozenset(range(5))

    def rule(self, name: str) -> RuleSettings | None:
        settings = self.rules.get(name)
        return settings if settings is not None and settings.enabled else None

    @classmethod
    def from_file(cls, path: Path = DEFAULT_POLICY_FILE) -> DetectionPolicy:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"cannot read detection policy {path}: {exc}") from exc
        vip: object = {}
        vip_file = ((data or {}).get("rules") or {}).get("vip_access", {}).get("patients_file")
        if vip_file:
            vip_path = (path.parent / str(vip_file)).resolve()
            try:
                vip = yaml.safe_load(vip_path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigurationError(f"cannot read restricted patients {vip_path}: {exc}") from exc
        return cls.from_mapping(data, vip=vip, source=str(path))

    @classmethod
    def from_mapping(cls, data: object, *, vip: object = None, source: str = "<policy>") -> DetectionPolicy:
        def fail(msg: str) -> ConfigurationError:
            return ConfigurationError(f"{source}: {msg}")

        if not isinstance(data, dict) or data.get("version") != 1:
            raise fail("expected a mapping with 'version: 1'")
        known = {"version", "timezone", "initial_lookback_hours", "settle_seconds", "access_event_ids", "rules"}
        if set(data) - known:
            raise fail(f"unknown keys {sorted(set(data) - known)}")
        try:
            tz = ZoneInfo(str(data.get("timezone", "UTC")))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise fail(f"unknown timezone {data.get('timezone')!r}") from exc
        codes = {c.code: c for c in EventTypeCode.all()}
        rules: dict[str, RuleSettings] = {}
        raw_rules = data.get("rules") or {}
        if not isinstance(raw_rules, dict) or set(raw_rules) - set(RULES):
            raise fail(f"'rules' must map rule names ({', '.join(RULES)}) to settings")
        for name, raw in raw_rules.items():
            if not isinstance(raw, dict):
                raise fail(f"rule {name!r} must be a mapping")
            alert = codes.get(str(raw.get("alert_type", "110132")))
            if alert is None:
                raise fail(f"rule {name!r}: alert_type must be a CID 403 code")
            try:
                outcome = Outcome(int(raw.get("outcome", 4)))
            except ValueError as exc:
                raise fail(f"rule {name!r}: outcome must be 0, 4, 8 or 12") from exc
            options = {k: v for k, v in raw.items() if k not in ("enabled", "alert_type", "outcome")}
            rules[name] = RuleSettings(bool(raw.get("enabled", True)), alert, outcome, options)
        after = rules.get("after_hours")
        start, end, days = time(7, 0), time(19, 0), frozenset(range(5))
        if after is not None:
            hours = after.options.get("business_hours") or {}
            try:
                start = time.fromisoformat(str(hours.get("start", "07:00")))
                end = time.fromisoformat(str(hours.get("end", "19:00")))
                days = frozenset(_DAYS.index(str(d).lower()[:3])
                                 for d in after.options.get("business_days", _DAYS[:5]))
            except ValueError as exc:
                raise fail(f"after_hours: {exc}") from exc
        for name, key in (("volume_spike", "baseline_days"), ("volume_spike", "min_events"),
                          ("failed_auth_burst", "threshold"), ("failed_auth_burst", "window_seconds")):
            if name in rules and not (isinstance(rules[name].options.get(key), int) and rules[name].options[key] > 0):
                raise fail(f"{name}: {key} must be a positive integer")
        patients: set[str] = set()
        exempt: set[str] = set()
        if vip:
            if not isinstance(vip, dict) or vip.get("version") != 1:
                raise fail("restricted patients: expected 'version: 1' and 'patients'")
            for entry in vip.get("patients") or []:
                pid = entry.get("id") if isinstance(entry, dict) else entry
                if not pid:
                    raise fail("restricted patients: every entry needs an id")
                patients.add(str(pid))
            exempt = {str(u) for u in vip.get("exempt_users") or []}
        return cls(
            timezone=tz,
            initial_lookback=timedelta(hours=float(data.get("initial_lookback_hours", 24))),
            settle=timedelta(seconds=float(data.get("settle_seconds", 60))),
            access_event_ids=tuple(str(e) for e in data.get("access_event_ids")
                                   or ("110103", "110104", "110105", "110106", "110107", "110112")),
            rules=rules, vip_patients=frozenset(patients), vip_exempt_users=frozenset(exempt),
            business_start=start, business_end=end, business_days=days,
        )
