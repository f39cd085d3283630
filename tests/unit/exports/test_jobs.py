"""The export job (``compliance.exports.jobs``): the project registry is checked again when the job runs."""

from __future__ import annotations

from compliance.exports.projects import projects_from_mapping
from compliance.exports.workers import InProcessWorker

from .builders import DANA, ROB, new_export


def test_a_job_of_a_project_closed_since_the_approval_fails_without_running(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "closed": True, "members": {"users": ["rob"]}}}})
    InProcessWorker(world.comps).run_once()
    row = world.service.load(req["id"])
    assert row.state == "failed" and "project 'lung-study' is closed" in (row.error or "")
    assert world.events("110104") == []  # nothing was read from the archive
