"""Fixtures shared by the unit tests of pure logic."""

from __future__ import annotations

import pytest

from compliance.audit.outbox import SqlAuditOutbox
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine


@pytest.fixture
def outbox(tmp_path):
    """A real audit outbox on a migrated SQLite file of the test's own (``tmp_path / "outbox.db"``)."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    upgrade(url)
    box = SqlAuditOutbox(make_engine(url))
    yield box
    box.close()
