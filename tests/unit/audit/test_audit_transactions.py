"""Audit write transactions on SQLite: one writer at a time in-process, WAL checkpoints off the commit."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from compliance.audit import transactions
from compliance.audit.transactions import SAFETY_PAGES, audit_transaction
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_the_commit_itself_never_copies_the_log_below_the_safety_net(engine):
    with audit_transaction(engine) as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == SAFETY_PAGES


def test_a_background_checkpoint_follows_enough_written_rows(engine, monkeypatch):
    monkeypatch.setattr(transactions, "CHECKPOINT_EVERY_ROWS", 10)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x TEXT)")
    state = transactions.sqlite_writes(engine)
    before = state.checkpoints
    for _ in range(3):
        with audit_transaction(engine, rows=4) as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES ('" + "x" * 3000 + "')")
    deadline = time.monotonic() + 5
    while state.checkpoints == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.checkpoints > before
    with engine.connect() as conn:  # everything committed is in the database, log copied or not
        assert conn.execute(text("select count(*) from t")).scalar() == 3


def test_transactions_of_one_process_take_turns(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE c (n INTEGER)")
        conn.exec_driver_sql("INSERT INTO c VALUES (0)")
    inside = []
    overlap = []

    def work():
        for _ in range(20):
            with audit_transaction(engine) as conn:
                inside.append(1)
                overlap.append(len(inside))
                n = conn.exec_driver_sql("SELECT n FROM c").scalar()
                time.sleep(0.001)
                conn.exec_driver_sql("UPDATE c SET n = ?", (n + 1,))
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlap) == 1
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT n FROM c").scalar() == 80


def test_an_exception_rolls_back(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE r (n INTEGER)")
    with pytest.raises(RuntimeError), audit_transaction(engine) as conn:
        conn.exec_driver_sql("INSERT INTO r VALUES (1)")
        raise RuntimeError("boom")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM r").scalar() == 0
    with audit_transaction(engine) as conn:  # the lock was released
        conn.exec_driver_sql("INSERT INTO r VALUES (2)")


def _entry(n: int):
    import uuid
    from datetime import UTC, datetime

    from compliance.audit.outbox import OutboxEntry

    return OutboxEntry(uuid=str(uuid.uuid4()), event_code="110112", occurred_at=datetime.now(UTC),
                       document={"event": {"id": "110112"}, "n": n})


def test_the_group_commit_writer_keeps_one_connection_and_gives_it_back_when_it_stops(tmp_path):
    from compliance.audit.outbox import SqlAuditOutbox

    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    upgrade(url)
    engine = make_engine(url)
    box = SqlAuditOutbox(engine)
    for n in range(5):
        box.submit(_entry(n)).result(timeout=10)
        assert engine.pool.checkedout() == 1, "the writer holds its one connection between commits"
    kept = box._writer_conn
    box.submit(_entry(5)).result(timeout=10)
    assert box._writer_conn is kept
    box.append_now([_entry(6)])  # another thread borrows from the pool and gives back
    assert engine.pool.checkedout() == 1
    box.close()
    assert engine.pool.checkedout() == 0 and box._writer_conn is None
    assert box.total() == 7 and [d["n"] for _, _, d in box.pending(10)] == list(range(7))
    engine.dispose()


def test_a_writer_connection_that_failed_a_commit_is_not_kept(tmp_path):
    from compliance.audit.outbox import SqlAuditOutbox
    from compliance.errors import AuditFailure

    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    upgrade(url)
    engine = make_engine(url)
    box = SqlAuditOutbox(engine)
    box.submit(_entry(0)).result(timeout=10)
    kept = box._writer_conn
    with engine.begin() as conn:  # the next insert fails: the table is gone
        conn.execute(text("ALTER TABLE audit_outbox RENAME TO audit_outbox_away"))
    with pytest.raises(AuditFailure):
        box.submit(_entry(1)).result(timeout=10)
    assert box._writer_conn is None and engine.pool.checkedout() == 0
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_outbox_away RENAME TO audit_outbox"))
    box.submit(_entry(2)).result(timeout=10)
    assert box._writer_conn is not None and box._writer_conn is not kept
    box.close()
    assert [d["n"] for _, _, d in box.pending(10)] == [0, 2]
    engine.dispose()
