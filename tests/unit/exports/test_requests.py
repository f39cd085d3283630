"""The request lifecycle (``compliance.exports.requests``): validation, the project registry's refusals
(audited, nothing stored), the two-person rule, and the dispatch of an approval to the task queue
(the approval stands when the queue is down; the sweep dispatches it)."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from compliance.exports.destinations import DestinationRegistry, DicomwebDestination
from compliance.exports.interfaces import (
    DestinationNotAllowed,
    ExportNotFound,
    ExportStateConflict,
    InvalidExportRequest,
    SelfApprovalRefused,
)
from compliance.exports.models import ExportProjectKey, ExportRequest
from compliance.exports.projects import ProjectAccessDenied, projects_from_mapping
from compliance.exports.workers import Sweeper, run_claimed

from .builders import DANA, ROB, SAM, new_export, status_of


def test_request_validation(world):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, new_export(profile="no-such-profile"))
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, new_export(study_uids=(), filters=None))
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, new_export(study_uids=("not a uid",)))
    with pytest.raises(InvalidExportRequest):
        world.service.create(ROB, new_export(destination="ftp"))


def test_self_approval_is_refused_and_audited(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    with pytest.raises(SelfApprovalRefused):
        world.service.decide(req["id"], ROB, approve=True, comment="mine")
    assert world.service.get(req["id"], reader_id="x", may_read_all=True)["state"] == "requested"
    alerts = world.events("110113")
    assert len(alerts) == 1 and "self-approval" in alerts[0]["event.outcome_description"]


def test_only_requested_can_be_decided_once(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=False, comment="no IRB letter")
    with pytest.raises(ExportStateConflict):
        world.service.decide(req["id"], SAM, approve=True, comment="override")
    assert world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)["state"] == "rejected"
    with pytest.raises(ExportNotFound):  # another researcher does not see it
        world.service.get(req["id"], reader_id="sub-other", may_read_all=False)


def _requests(world) -> list[ExportRequest]:  # type: ignore[no-untyped-def]
    with world.sessions() as s:
        return list(s.scalars(select(ExportRequest)))


@pytest.mark.parametrize("project", ["other-study", "no-such-study", "LUNG-STUDY"])
def test_a_non_member_is_refused_audited_and_nothing_is_stored(world, project):  # type: ignore[no-untyped-def]
    with pytest.raises(ProjectAccessDenied) as caught:
        world.service.create(ROB, new_export(project=project), groups=("research",))
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
    created = world.service.create(replace(ROB, username="robert"), new_export(), groups=("research",))
    assert created["requester"]["membership"] == "group /research"
    shown = world.service.get(created["id"], reader_id=DANA.user_id, may_read_all=True)
    assert shown["project_registration"]["members"] == {"groups": ["/research"], "users": []}
    assert shown["project_registration"]["title"] == "Lung study"
    (order,) = world.events("110109")
    # the order record's details carry how the requester belonged (base64, as every ATNA detail value)
    assert 'type="Membership" value="' + base64.b64encode(b"group /research").decode() + '"' in order["atna.xml"]


def test_a_member_must_cite_the_projects_protocol(world):  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidExportRequest, match="IRB-2026-001"):
        world.service.create(ROB, new_export(protocol="IRB-9999"))
    assert _requests(world) == []


def test_a_destination_for_another_project_is_refused_and_audited(world):  # type: ignore[no-untyped-def]
    world.service.requests.destinations = DestinationRegistry([DicomwebDestination(
        name="cardio-pacs", url="http://127.0.0.1:9/dw", projects=frozenset({"other-study"}))])
    with pytest.raises(DestinationNotAllowed):
        world.service.create(ROB, new_export(purpose="other-study",
                                             destination={"kind": "dicomweb", "name": "cardio-pacs"}))
    assert _requests(world) == []
    (alert,) = world.events("110113")
    assert "cardio-pacs" in alert["event.outcome_description"]


def test_an_approval_needs_the_membership_still_registered(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "members": {"users": ["someone-else"]}}}})
    with pytest.raises(ExportStateConflict, match=r"membership \(user rob\) is no longer registered"):
        world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert world.service.load(req["id"]).state == "requested"
    assert "no longer registered" in world.events("110113")[-1]["event.outcome_description"]
    world.service.decide(req["id"], DANA, approve=False, comment="not a member any more")  # rejecting works


def test_a_request_from_before_the_registry_cannot_be_approved(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    with world.sessions() as s, s.begin():
        s.execute(update(ExportRequest).where(ExportRequest.id == req["id"]).values(
            project="free-text", requester_membership=None))
    shown = world.service.get(req["id"], reader_id=DANA.user_id, may_read_all=True)
    assert shown["project_registration"] == {"id": "free-text", "registered": False}
    assert shown["requester"]["membership"] is None
    with pytest.raises(ExportStateConflict, match="not registered"):
        world.service.decide(req["id"], DANA, approve=True, comment="ok")


def test_a_closed_project_tells_its_member_so(world):  # type: ignore[no-untyped-def]
    world.service.requests.projects = projects_from_mapping({"version": 1, "projects": {
        "lung-study": {"title": "Lung study", "closed": True, "members": {"users": ["rob"]}}}})
    with pytest.raises(ProjectAccessDenied, match="is closed"):
        world.service.create(ROB, new_export())


def test_an_approval_stands_when_the_queue_is_down_and_the_sweep_dispatches_it(queued_world):  # type: ignore[no-untyped-def]
    rid = queued_world.service.create(ROB, new_export())["id"]
    queued_world.queue.down = True
    answer = queued_world.service.decide(rid, DANA, approve=True, comment="IRB approved")
    assert answer["state"] == "approved" and answer["approver"]["username"] == "dana"
    assert answer["dispatch"]["status"] == "pending" and "dispatched automatically" in answer["dispatch"]["detail"]
    assert answer["dispatched_at"] is None and queued_world.queue.sent == []
    assert [d["event.outcome_description"] for d in queued_world.events("110109")][-1] == "export request approved"

    queued_world.queue.down = False
    sweeper = Sweeper(queued_world.comps)
    assert sweeper.sweep()["dispatched"] == 0  # within the grace period the approving gateway has
    queued_world.clock.now += timedelta(seconds=11)
    assert sweeper.sweep()["dispatched"] == 1
    assert queued_world.queue.sent == [rid] and status_of(queued_world, rid)["dispatched_at"] is not None
    assert sweeper.sweep()["dispatched"] == 0  # dispatched once, not at every sweep
    queued_world.clock.now += timedelta(seconds=600)  # nobody claimed it: the message was lost
    assert sweeper.sweep()["dispatched"] == 1 and queued_world.queue.sent == [rid, rid]

    assert run_claimed(queued_world.comps, rid) == "ready"
    assert run_claimed(queued_world.comps, rid) is None  # the duplicate message is a no-op
    assert status_of(queued_world, rid)["attempts"] == 1


def test_an_approval_dispatched_at_once_when_the_queue_is_up(queued_world):  # type: ignore[no-untyped-def]
    rid = queued_world.service.create(ROB, new_export())["id"]
    answer = queued_world.service.decide(rid, DANA, approve=True, comment="ok")
    assert answer["dispatch"]["status"] == "dispatched" and answer["dispatched_at"] is not None
    assert queued_world.queue.sent == [rid]
    queued_world.clock.now += timedelta(seconds=60)
    assert Sweeper(queued_world.comps).sweep()["dispatched"] == 0


def test_a_failed_redispatch_is_retried(queued_world):  # type: ignore[no-untyped-def]
    rid = queued_world.service.create(ROB, new_export())["id"]
    queued_world.queue.down = True
    queued_world.service.decide(rid, DANA, approve=True, comment="ok")
    queued_world.clock.now += timedelta(seconds=11)
    assert Sweeper(queued_world.comps).sweep()["dispatched"] == 0  # still down
    assert status_of(queued_world, rid)["dispatched_at"] is None
    queued_world.queue.down = False
    assert Sweeper(queued_world.comps).sweep()["dispatched"] == 1
