"""The research project registry (policies/projects.yaml): strict loading, membership, and what the export
service does with it (refusals audited, nothing stored, the steward's view, approvals and jobs re-checked).

The same against the real stack (Keycloak groups in real tokens, Elasticsearch): tests/security/test_export_projects.py.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select, update

from compliance.config import PROJECT_ROOT
from compliance.crypto.interfaces import KeyStateConflict
from compliance.errors import ConfigurationError
from compliance.exports.destinations import DestinationRegistry, DicomwebDestination, load_destinations
from compliance.exports.interfaces import DestinationNotAllowed, ExportStateConflict, InvalidExportRequest
from compliance.exports.models import ExportProjectKey, ExportRequest
from compliance.exports.projects import (
    ProjectAccessDenied,
    ProjectRegistry,
    load_projects,
    projects_from_mapping,
)
from compliance.exports.workers import InProcessWorker

from .test_workflow import DANA, PROJECTS, ROB, _new, build_world

GOOD = """\
version: 1
projects:
  lung-ct:
    title: Lung nodules
    protocols: [IRB-1]
    members:
      groups: [/research]
      users: [dana]
"""


def _load(tmp_path: Path, text: str) -> ProjectRegistry:
    path = tmp_path / "projects.yaml"
    path.write_text(text)
    return load_projects(path)


# --------------------------------------------------------------------------- loading: every defect refuses

def test_the_shipped_registry_loads_and_rob_belongs_to_lung_ct_only():
    registry = load_projects(PROJECT_ROOT / "policies" / "projects.yaml")
    # rob's token carries the bare group name "research" (the demo realm's mapper has full.path off)
    assert [p.id for p in registry.of_member("rob", ["research"])] == ["lung-ct"]
    assert [p.id for p in registry.of_member("alice", ["cardiology"])] == ["cardiac-outcomes"]
    assert registry.of_member("tom", ["radiology"]) == []
    # and the shipped destinations name only registered projects
    load_destinations(PROJECT_ROOT / "policies" / "export-destinations.yaml", projects=registry)


def test_a_valid_registry(tmp_path):  # type: ignore[no-untyped-def]
    project = _load(tmp_path, GOOD).get("lung-ct")
    assert project is not None
    assert project.public() == {"id": "lung-ct", "registered": True, "title": "Lung nodules", "description": "",
                                "protocols": ["IRB-1"], "closed": False,
                                "members": {"groups": ["/research"], "users": ["dana"]}}


@pytest.mark.parametrize(("text", "says"), [
    (GOOD.replace("    members:", "    member:"), "unknown keys ['member']"),
    (GOOD.replace("      groups:", "      group:"), "unknown member keys ['group']"),
    (GOOD.replace("    protocols:", "    protocol:"), "unknown keys ['protocol']"),
    (GOOD.replace("version: 1", "version: 2"), "'version: 1'"),
    (GOOD + "owners: [x]\n", "'version: 1' and 'projects' only"),
    (GOOD.replace("      groups: [/research]", "      groups: [research]"), "not a Keycloak group path"),
    (GOOD.replace("      groups: [/research]", "      groups: ['/research ']"), "not a Keycloak group path"),
    (GOOD.replace("users: [dana]", "users: [Dana]"), "not a Keycloak username"),
    (GOOD.replace("users: [dana]", "users: dana"), "must be a list"),
    (GOOD.replace("users: [dana]", "users: [dana, dana]"), "twice"),
    (GOOD.replace("lung-ct:", "Lung-CT:"), "ids are"),
    (GOOD.replace("    title: Lung nodules\n", ""), "'title' is required"),
    (GOOD + "  lung-ct:\n    title: again\n    members: {users: [rob]}\n", "given twice"),
    (GOOD.replace("      groups: [/research]\n      users: [dana]\n", "      groups: []\n"), "at least one member"),
    (GOOD.replace("    protocols: [IRB-1]", "    closed: yes please"), "true or false"),
    (GOOD + "  other:\n    title: o\n    members: {groups: [/team/research]}\n", "share the name 'research'"),
    ("version: 1\nprojects: [lung-ct]\n", "must map project ids"),
    ("version: 1\nprojects:\n  lung-ct: [rob]\n", "must be a mapping"),
    ("version: 1\nprojects: {lung-ct: {title: x, members: {users: [rob]}\n", "not valid YAML"),
])
def test_a_defect_refuses_to_load_and_says_which(tmp_path, text, says):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError) as caught:
        _load(tmp_path, text)
    assert says in caught.value.message, caught.value.message


def test_a_missing_registry_refuses_to_load(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match="cannot read the research project registry"):
        load_projects(tmp_path / "nope.yaml")


def test_a_closed_project_may_keep_no_members(tmp_path):  # type: ignore[no-untyped-def]
    registry = _load(tmp_path, "version: 1\nprojects:\n  old:\n    title: done\n    closed: true\n    members: {}\n")
    assert registry.is_registered("old") and registry.of_member("rob", ["research"]) == []


def test_a_destination_restricted_to_an_unregistered_project_refuses_to_load(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "destinations.yaml"
    path.write_text("destinations:\n  pacs:\n    kind: dicomweb\n    url: http://127.0.0.1:9/dw\n"
                    "    projects: [lung-c]\n")
    with pytest.raises(ConfigurationError, match=r"not registered .*\['lung-c'\]"):
        load_destinations(path, projects=_load(tmp_path, GOOD))
    path.write_text(path.read_text().replace("lung-c]", "lung-ct]"))
    assert load_destinations(path, projects=_load(tmp_path, GOOD)).names() == ["pacs"]


# --------------------------------------------------------------------------- membership

def test_membership_by_group_path_name_or_username():
    registry = projects_from_mapping({"version": 1, "projects": {
        "c": {"title": "c", "members": {"groups": ["/departments/cardiology", "/research"], "users": ["sam"]}}}})
    project = registry.get("c")
    assert project is not None
    assert project.membership_of("rob", ["research"]) == "group /research"  # a name (full.path off)
    assert project.membership_of("rob", ["/research"]) == "group /research"  # a path (full.path on)
    assert project.membership_of("alice", ["cardiology"]) == "group /departments/cardiology"
    assert project.membership_of("alice", ["/departments/cardiology"]) == "group /departments/cardiology"
    assert project.membership_of("sam", []) == "user sam"
    # a full path must be equal: another parent's group of the same name is not a member
    assert project.membership_of("eve", ["/external/cardiology"]) is None
    assert project.membership_of("eve", ["/research/sub", "departments", "Research", "sam"]) is None
    assert project.membership_of("Sam", []) is None


def test_unknown_and_not_a_member_are_refused_with_the_same_public_answer():
    from compliance.exports.projects import ProjectRefused

    answers = {}
    for name in ("other-study", "no-such-study"):
        with pytest.raises(ProjectRefused) as caught:
            PROJECTS.authorize(name, "rob", ["research"])
        denial = caught.value.denial()
        answers[name] = (type(denial), denial.message.replace(name, "X"), denial.detail)
        assert name in caught.value.reason  # the audit's reason says which it was
    assert answers["other-study"][:2] == answers["no-such-study"][:2]
    assert "not a member" in answers["other-study"][1]


# --------------------------------------------------------------------------- the service

@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    built, engine = build_world(tmp_path)
    yield built
    engine.dispose()


def _requests(world) -> list[ExportRequest]:  # type: ignore[no-untyped-def]
    with world.sessions() as s:
        return list(s.scalars(select(ExportRequest)))


@pytest.mark.parametrize("project", ["other-study", "no-such-study", "LUNG-STUDY"])
def test_a_non_member_is_refused_audited_and_nothing_is_stored(world, project):  # type: ignore[no-untyped-def]
    with pytest.raises(ProjectAccessDenied) as caught:
        world.service.create(ROB, _new(project=project), groups=("research",))
    assert caught.value.detail == {"project": project}
    assert "cardiology" not in caught.value.message and "Another team" not in caught.value.message
    assert _requests(world) == []
    (alert,) = world.events("110113")
    assert alert["user.name"] == "rob" and alert["object.ids"] == [f"urn:compliance:research-project:{project}"]
    assert world.events("110109") == []
    with world.sessions() as s:  # and no key was made for the name
        assert s.scalars(select(ExportProjectKey).where(ExportProjectKey.project == project)).all() == []


def test_a_member_by_group_is_accepted_and_the_steward_sees_the_membership(world):  # type: ignore[no-untyped-def]
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "members": {"groups": ["/research"]}}}})
    created = world.service.create(replace(ROB, username="robert"), _new(), groups=("research",))
    assert created["requester"]["membership"] == "group /research"
    shown = world.service.get(created["id"], reader_id=DANA.user_id, may_read_all=True)
    assert shown["project_registration"]["members"] == {"groups": ["/research"], "users": []}
    assert shown["project_registration"]["title"] == "Lung study"
    (order,) = world.events("110109")
    # the order record's details carry how the requester belonged (base64, as every ATNA detail value)
    assert 'type="Membership" value="' + base64.b64encode(b"group /research").decode() + '"' in order["atna.xml"]


def test_a_member_must_cite_the_projects_protocol(world):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidExportRequest, match="IRB-2026-001"):
        world.service.create(ROB, _new(protocol="IRB-9999"))
    assert _requests(world) == []


def test_a_destination_for_another_project_is_refused_and_audited(world):  # type: ignore[no-untyped-def]
    world.service.requests.destinations = DestinationRegistry([DicomwebDestination(
        name="cardio-pacs", url="http://127.0.0.1:9/dw", projects=frozenset({"other-study"}))])
    with pytest.raises(DestinationNotAllowed):
        world.service.create(ROB, _new(purpose="other-study", destination={"kind": "dicomweb", "name": "cardio-pacs"}))
    assert _requests(world) == []
    (alert,) = world.events("110113")
    assert "cardio-pacs" in alert["event.outcome_description"]


def test_an_approval_needs_the_membership_still_registered(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "members": {"users": ["someone-else"]}}}})
    with pytest.raises(ExportStateConflict, match=r"membership \(user rob\) is no longer registered"):
        world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert world.service.load(req["id"]).state == "requested"
    assert "no longer registered" in world.events("110113")[-1]["event.outcome_description"]
    world.service.decide(req["id"], DANA, approve=False, comment="not a member any more")  # rejecting works


def test_a_request_from_before_the_registry_cannot_be_approved(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    with world.sessions() as s, s.begin():
        s.execute(update(ExportRequest).where(ExportRequest.id == req["id"]).values(
            project="free-text", requester_membership=None))
    shown = world.service.get(req["id"], reader_id=DANA.user_id, may_read_all=True)
    assert shown["project_registration"] == {"id": "free-text", "registered": False}
    assert shown["requester"]["membership"] is None
    with pytest.raises(ExportStateConflict, match="not registered"):
        world.service.decide(req["id"], DANA, approve=True, comment="ok")


def test_a_job_of_a_project_closed_since_the_approval_fails_without_running(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, _new())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "closed": True, "members": {"users": ["rob"]}}}})
    InProcessWorker(world.comps).run_once()
    row = world.service.load(req["id"])
    assert row.state == "failed" and "project 'lung-study' is closed" in (row.error or "")
    assert world.events("110104") == []  # nothing was read from the archive


def test_a_closed_project_tells_its_member_so(world):  # type: ignore[no-untyped-def]
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "closed": True, "members": {"users": ["rob"]}}}})
    with pytest.raises(ProjectAccessDenied, match="is closed"):
        world.service.create(ROB, _new())


def test_keys_are_made_for_registered_projects_only(world):  # type: ignore[no-untyped-def]
    with pytest.raises(KeyStateConflict, match="not registered"):
        world.keys.key("someone-elses", "pseudonym")
    assert len(world.keys.key("lung-study", "pseudonym")) == 32


def test_a_researcher_is_shown_only_the_destinations_of_his_projects():
    registry = DestinationRegistry([
        DicomwebDestination(name="open", url="http://127.0.0.1:9/a"),
        DicomwebDestination(name="cardio", url="http://127.0.0.1:9/b", projects=frozenset({"other-study"})),
        DicomwebDestination(name="shared", url="http://127.0.0.1:9/c",
                            projects=frozenset({"other-study", "lung-study"}))])
    shown = {d["name"]: d["projects"] for d in registry.public(["lung-study"])}
    assert shown == {"open": None, "shared": ["lung-study"]}
    assert {d["name"] for d in registry.public()} == {"open", "cardio", "shared"}  # a steward sees all
