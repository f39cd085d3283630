"""The fan-out to several sinks (e.g. Elasticsearch and syslog) on a real SQLite outbox."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from compliance.audit.fanout import FanOutAuditSink, sink_names
from compliance.audit.interfaces import AuditSinkUnavailable, ShipResult
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
from compliance.audit.shipper import AuditShipper
from compliance.config import Settings
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from compliance.errors import ConfigurationError


class CountingSink:
    def __init__(self) -> None:
        self.received: list[str] = []
        self.down = False

    def ensure_ready(self) -> None:
        if self.down:
            raise AuditSinkUnavailable("down")

    def ship(self, batch: Sequence[tuple[str, dict]]) -> ShipResult:
        if self.down:
            raise AuditSinkUnavailable("down")
        self.received.extend(u for u, _ in batch)
        return ShipResult(shipped=tuple(u for u, _ in batch))


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    upgrade(url)
    return make_engine(url)


def entries(n: int) -> list[OutboxEntry]:
    return [OutboxEntry(uuid=f"00000000-0000-0000-0000-{i:012d}", event_code="110112",
                        occurred_at=datetime(2026, 11, 28, tzinfo=UTC), document={"n": i}) for i in range(n)]


def test_an_event_is_shipped_only_when_every_sink_has_it_and_no_sink_gets_it_twice(engine):
    outbox = SqlAuditOutbox(engine)
    es, syslog = CountingSink(), CountingSink()
    shipper = AuditShipper(outbox, FanOutAuditSink({"elasticsearch": es, "syslog": syslog}, engine), batch_size=10)
    outbox.append_now(entries(25))
    syslog.down = True
    with pytest.raises(AuditSinkUnavailable, match="syslog"):
        shipper.ship_once()
    assert outbox.backlog() == 25  # nothing counts as shipped while syslog lacks it
    assert len(es.received) == 10
    with pytest.raises(AuditSinkUnavailable):
        shipper.ship_once()  # the same head batch again: Elasticsearch is not sent it twice
    assert len(es.received) == 10
    syslog.down = False
    while shipper.ship_once():
        pass
    assert outbox.backlog() == 0
    assert sorted(es.received) == sorted(set(es.received)) and len(es.received) == 25
    assert sorted(syslog.received) == sorted(set(syslog.received)) and len(syslog.received) == 25
    outbox.close()


def test_sink_list_comes_from_settings():
    assert sink_names(Settings(audit_sinks="elasticsearch, syslog")) == ["elasticsearch", "syslog"]
    with pytest.raises(ConfigurationError):
        sink_names(Settings(audit_sinks="elasticsearch,kafka"))
    with pytest.raises(ConfigurationError):
        sink_names(Settings(audit_sinks=""))
