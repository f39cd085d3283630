"""Fixtures shared by the unit tests of pure logic."""

from __future__ import annotations

import pytest

from compliance.audit.outbox import SqlAuditOutbox
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine


@pytest.fixture(autouse=True)
def _development(monkeypatch):
    """Settings default to production (compliance/config.py); the unit tests describe the local stack,
    which says development explicitly (its gateway.env), as they do. A test of production says so."""
    monkeypatch.setenv("COMPLIANCE_ENVIRONMENT", "development")


@pytest.fixture
def outbox(tmp_path):
    """A real audit outbox on a migrated SQLite file of the test's own (``tmp_path / "outbox.db"``)."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    upgrade(url)
    box = SqlAuditOutbox(make_engine(url))
    yield box
    box.close()
