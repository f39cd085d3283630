"""Several writers extend one audit chain; the PostgreSQL outbox compresses its documents.

The outage tests (Elasticsearch down, the gateway killed mid-shipping) are in tests/security/."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from sqlalchemy import text

from compliance.config import PROJECT_ROOT
from compliance.db.migrate import scratch_schema

from .conftest import Stack

pytestmark = pytest.mark.integration


WRITER = r"""
import sys, uuid
from datetime import UTC, datetime
from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
from compliance.db.session import make_engine
outbox = SqlAuditOutbox(make_engine(sys.argv[1]))
def entry(i):
    u = str(uuid.uuid4())
    return OutboxEntry(uuid=u, event_code="110112", occurred_at=datetime.now(UTC),
                       document={"event.uuid": u, "writer": sys.argv[2], "n": i})
futures = [outbox.submit(entry(i)) for i in range(150)]     # group commits
for f in futures:
    f.result(timeout=120)
for i in range(150, 200):                                    # and single transactions
    outbox.append_now([entry(i)])
outbox.close()
"""


def test_several_processes_extend_one_chain_without_forks(stack: Stack, tmp_path):
    """Gateway processes sharing one database (SQLite file or PostgreSQL) never fork the chain."""
    import sys

    from compliance.audit.chain import GENESIS, verify_chain
    from compliance.audit.outbox import SqlAuditOutbox
    from compliance.db.migrate import upgrade
    from compliance.db.session import make_engine

    with contextlib.ExitStack() as scope:
        if os.environ.get("COMPLIANCE_TEST_DATABASE") == "postgres":
            assert stack.postgres_url
            db = scope.enter_context(scratch_schema(stack.postgres_url, "chain"))
        else:
            db = f"sqlite:///{tmp_path / 'shared.db'}"
            upgrade(db)
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, db, f"w{k}"], cwd=PROJECT_ROOT)
                 for k in range(3)]
        assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
        engine = make_engine(db)
        outbox = SqlAuditOutbox(engine)
        docs = [d for _, _, d in outbox.pending(10_000)]
        assert len(docs) == 600
        assert [d["chain.seq"] for d in docs] == list(range(1, 601))
        v = verify_chain(docs, start_prev=GENESIS, expected_first_seq=1, expected_last_seq=600)
        assert v.intact, v.findings[:3]
        assert outbox.chain_head() == (600, docs[-1]["chain.hash"])
        assert {d["writer"] for d in docs} == {"w0", "w1", "w2"}
        engine.dispose()


def test_postgres_outbox_documents_are_compressed_with_lz4_and_read_back_unchanged(stack: Stack):
    """PostgreSQL only: the writer asks for lz4 (cheaper than pglz) for the documents it inserts."""
    if os.environ.get("COMPLIANCE_TEST_DATABASE") != "postgres":
        pytest.skip("PostgreSQL only (COMPLIANCE_TEST_DATABASE=postgres)")
    from datetime import UTC, datetime

    from compliance.audit.outbox import OutboxEntry, SqlAuditOutbox
    from compliance.db.session import make_engine

    assert stack.postgres_url
    with scratch_schema(stack.postgres_url, "lz4") as db:
        engine = make_engine(db)
        outbox = SqlAuditOutbox(engine)
        big = {"event.uuid": "u-lz4", "atna.xml": "<AuditMessage>" + "<x a='1'/>" * 600 + "</AuditMessage>"}
        outbox.append_now([OutboxEntry(uuid="u-lz4", event_code="110112", occurred_at=datetime.now(UTC),
                                       document=big)])
        with engine.connect() as c:
            method = c.execute(text("select pg_column_compression(document) from audit_outbox")).scalar()
        assert method == "lz4"
        (doc,) = [d for _, _, d in outbox.pending(10)]
        assert doc["atna.xml"] == big["atna.xml"]
        engine.dispose()
