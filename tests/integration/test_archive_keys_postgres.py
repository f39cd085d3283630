"""The archive's key custodian on PostgreSQL (``COMPLIANCE_ARCHIVE_KEYS_DATABASE_URL``), on the stack's server.

The local stack keeps the archive's keys in SQLite; a deployment may keep them in PostgreSQL. The new
patient's key is inserted as driver SQL compiled for the dialect (``compliance/db/compiled.py``), so
this runs it against the real server: a key is durably committed and reads back through the ORM, and
when another custodian process committed the same patient's key first, both end up with that one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from compliance.archive.keystore import open_key_store
from compliance.config import Settings
from compliance.db.migrate import scratch_schema

from .conftest import Stack

pytestmark = pytest.mark.integration


def test_new_keys_commit_and_a_racing_custodian_wins_on_postgresql(stack: Stack, tmp_path: Path) -> None:
    if not stack.postgres_url:
        pytest.fail("the stack's PostgreSQL is not set up (COMPLIANCE_POSTGRES_URL): run deploy/local/up",
                    pytrace=False)
    with scratch_schema(stack.postgres_url, "archkeys") as url:
        # the local stack's custodian runs in development (gateway.env); production is the default
        settings = Settings(environment="development", stack_dir=tmp_path / "stack",
                            archive_keys_database_url=url, archive_patient_index_key="cd" * 32)
        store = open_key_store(settings, create=True)
        other = open_key_store(settings)  # another custodian process: its own engine, same database
        try:
            first = store.keys.data_key_for_patient("PG-ONE")
            # committed: another engine finds it, and the ORM reads the row the driver SQL wrote
            assert other.keys.data_key_for_patient("PG-ONE") == first
            assert store.keys.status().live_data_keys == 1

            # our committer is held before its INSERT while the other process commits the same patient
            release, started = threading.Event(), threading.Event()

            def hold(conn: Any) -> None:
                started.set()
                assert release.wait(30)

            event.listen(store.engine, "begin", hold)
            try:
                pending = store.keys.key_for_patient("PG-BOTH")
                assert started.wait(30)
                theirs = other.keys.data_key_for_patient("PG-BOTH")
                assert theirs.key_id != pending.key.key_id
                release.set()
                committed = pending.wait(timeout=30)
            finally:
                release.set()
                event.remove(store.engine, "begin", hold)
            assert committed == theirs, "the key another process committed first wins"
            assert store.keys.status().live_data_keys == 2
        finally:
            other.close()
            store.close()
