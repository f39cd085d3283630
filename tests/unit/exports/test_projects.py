"""The research project registry (policies/projects.yaml, ``compliance.exports.projects``): strict loading
and membership. What the export service does with it (refusals audited, nothing stored, the steward's
view, approvals and jobs re-checked): test_requests and test_jobs.

The same against the real stack (Keycloak groups in real tokens, Elasticsearch): tests/security/test_export_projects.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compliance.config import PROJECT_ROOT
from compliance.errors import ConfigurationError
from compliance.exports.destinations import load_destinations
from compliance.exports.projects import ProjectRegistry, load_projects, projects_from_mapping

from .builders import PROJECTS

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
