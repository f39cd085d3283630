"""The export workflow's audit messages: participants, objects, and schema validity (pure logic)."""

from __future__ import annotations

from compliance.audit.atna import AuditSource, to_atna_xml, validate_atna_xml
from compliance.audit.codes import Action
from compliance.audit.documents import to_document
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.exports.audit import export_request_event, reidentification_event

SOURCE = AuditSource(source_id="gw-1")
DANA = UserRef(user_id="u-dana", username="dana", client_id="compliance-cli", roles=("data-steward",),
               source_address="127.0.0.1")


def test_a_steward_step_names_the_steward_their_client_and_the_gateway():
    event = export_request_event(user=DANA, gateway_id="gw-1", request_id="r1", action=Action.UPDATE,
                                 step="approved", details={"Project": "P1", "Purpose": None},
                                 studies=(StudyRef(study_uid="1.2.3"),))
    validate_atna_xml(to_atna_xml(event, SOURCE))
    people = [(p.user_id, p.is_requestor, p.kind.value) for p in event.participants]
    assert people == [("u-dana", True, "person"), ("compliance-cli", False, "client"), ("gw-1", False, "gateway")]
    doc = to_document(event, SOURCE)
    assert doc["event.id"] == "110109" and doc["user.name"] == "dana" and doc["study.uids"] == ["1.2.3"]
    details = dict(event.objects[0].details)
    assert details == {"Step": b"approved", "Project": b"P1"}, "empty details are left out"


def test_a_job_step_has_the_gateway_as_its_requestor():
    event = export_request_event(user=None, gateway_id="gw-1", request_id="r1", action=Action.UPDATE,
                                 step="running", details={})
    validate_atna_xml(to_atna_xml(event, SOURCE))
    assert [(p.user_id, p.is_requestor) for p in event.participants] == [("gw-1", True)]


def test_a_reveal_names_the_revealed_patient():
    event = reidentification_event(user=DANA, gateway_id="gw-1", request_id="q1", action=Action.READ,
                                   step="revealed", details={"Kind": "patient_id"},
                                   patients=(PatientRef(patient_id="PID-9", name="Doe^Jo"),))
    validate_atna_xml(to_atna_xml(event, SOURCE))
    doc = to_document(event, SOURCE)
    assert doc["event.id"] == "110110" and doc["event.action"] == "R" and doc["patient.ids"] == ["PID-9"]
