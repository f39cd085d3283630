"""The response models (compliance/api/models.py) describe the answers and change none of them: what
the services return, validated into the route's model and dumped again, is the same JSON, key for
key and in the same order, ``null`` values included."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel

from compliance.api import models
from compliance.archive.models import ShredRequest
from compliance.archive.shred import ShredRequests
from compliance.audit.review import ReviewItem
from compliance.exports.delivery_log import live_delivery
from compliance.exports.destinations import DicomwebDestination
from compliance.exports.models import ExportDeliveryFile, ExportReidentification, ExportRequest
from compliance.exports.projects import Project
from compliance.exports.reidentification import reidentification_status
from compliance.exports.requests import request_status

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
T1 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
CARDIAC = Project(id="cardiac-outcomes", title="Cardiac outcomes (é)", groups=("/research/cardiac",),
                  users=("rob",), protocols=("IRB-2026-042",), description="")


def assert_unchanged(model: type[BaseModel], body: object) -> None:
    """The body FastAPI sends for ``model`` is the one the service's dict made (compact JSON, UTF-8)."""
    expected = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    assert model.model_validate(body).model_dump_json() == expected


def export_row(**overrides: object) -> ExportRequest:
    values: dict[str, object] = dict(
        id="3f0c", state="requested", project="cardiac-outcomes", protocol="IRB-2026-042", purpose="nodules",
        profile="research", cohort=json.dumps({"study_uids": ["1.2.3"]}), destination=json.dumps({"kind": "bundle"}),
        requester_id="sub-rob", requester_name="rob", requester_membership="user rob", created_at=T0,
        total=0, processed=0, released=0, held_back=0, errors=0, attempts=0)
    values.update(overrides)
    return ExportRequest(**values)


def test_an_export_request_as_created_listed_and_approved():
    requested = {**request_status(export_row()), "project_registration": CARDIAC.public()}
    assert requested["approver"] is None and requested["delivery"] is None
    assert_unchanged(models.ExportRequestView, requested)
    assert_unchanged(models.ExportRequestList, {"items": [requested]})
    unregistered = {**request_status(export_row(project="gone")),
                    "project_registration": {"id": "gone", "registered": False}}
    assert_unchanged(models.ExportRequestView, unregistered)
    approved = request_status(export_row(state="ready", approver_id="sub-dana", approver_name="dana",
                                         decision_comment="ok", decided_at=T1, total=3, processed=3, released=2,
                                         held_back=1, bundle_size=1234, checksum_sha256="ab" * 32, attempts=1))
    dispatch = {"status": "dispatched", "detail": "handed to the dramatiq job queue"}
    assert_unchanged(models.ApprovedExport, {**approved, "project_registration": CARDIAC.public(),
                                             "dispatch": dispatch})


def test_a_push_export_with_its_live_delivery():
    row = export_row(state="running", destination=json.dumps({"kind": "dicomweb", "name": "research-a"}),
                     total=3, processed=1)
    files = [ExportDeliveryFile(request_id=row.id, sop_instance_uid=f"1.2.{i}", instance=i, batch=0, attempt=1,
                                status=status, reason=reason, updated_at=T1)
             for i, (status, reason) in enumerate([("stored", None), ("failed", "0xA700 out of resources")])]
    body = {**request_status(row), "project_registration": CARDIAC.public()}
    body["delivery"] = live_delivery(row, files)
    assert_unchanged(models.ExportRequestView, body)


def test_destinations_and_projects():
    bundle = {"name": "bundle", "kind": "bundle", "description": "encrypted zip, downloaded by the requester"}
    anywhere = DicomwebDestination(name="research-a", url="https://a.example/dicom-web", description="A")
    restricted = DicomwebDestination(name="research-b", url="https://b.example/dicom-web",
                                     projects=frozenset({"cardiac-outcomes"}))
    assert_unchanged(models.DestinationList, {"items": [bundle, anywhere.public(), restricted.public()]})
    assert_unchanged(models.ProjectList, {"items": [CARDIAC.public()]})


def test_a_reidentification_before_and_after_it_is_revealed():
    row = ExportReidentification(id="r1", state="requested", project="cardiac-outcomes", kind="patient_id",
                                 pseudonym="PSN-1", reason="incidental finding", requester_id="sub-dana",
                                 requester_name="dana", created_at=T0)
    assert_unchanged(models.ReidentificationView, reidentification_status(row))
    row.state, row.approver_id, row.approver_name, row.decision_comment = "revealed", "sub-sam", "sam", "agreed"
    row.decided_at = row.revealed_at = T1
    assert_unchanged(models.RevealedReidentification, {**reidentification_status(row), "original": "PAT-7"})


def test_shred_requests():
    row = ShredRequest(id="s1", patient_id="PAT-7", reason="erasure request", state="requested",
                       requested_by="sub-ada", requested_by_name="ada", requested_at=T0)
    asked = ShredRequests.as_json(row)
    assert_unchanged(models.ShredRequestView, asked)
    assert_unchanged(models.ShredRequestList, {"requests": [asked]})
    row.state, row.decided_by, row.decided_by_name, row.decided_at, row.executed_at = \
        "shredded", "sub-bob", "bob", T1, T1
    for destroyed in (2, None):
        shred = {"patient_id": "PAT-7", "destroyed": destroyed, "state": "shredded", "studies": ["1.2.3"],
                 "index_removed": True}
        assert_unchanged(models.ExecutedShred, {**ShredRequests.as_json(row), "shred": shred})


def test_key_operations_as_the_archive_answers_them():
    status = {"provider": {"kind": "local", "path": "/keys/keyring.json"},
              "keks": [{"id": "kek-1", "provider": "local", "state": "retired",
                        "created_at": "2026-01-01 00:00:00+00:00", "retired_at": "2026-02-01 00:00:00+00:00",
                        "destroyed_at": None, "data_keys": 0, "in_provider": True}],
              "live_data_keys": 4, "shredded_data_keys": 1, "integrity_failures": 0}
    assert_unchanged(models.KeyStatus, status)
    assert_unchanged(models.KeyRotation, {"active_kek_id": "kek-2"})
    assert_unchanged(models.KeyRewrap, {"rewrapped": 3, "already_current": 1, "active_kek_id": "kek-2"})
    assert_unchanged(models.KekStateChange, {"kek_id": "kek-1", "state": "destroyed"})


@pytest.mark.parametrize("acknowledged", [False, True])
def test_the_review_queue(acknowledged):
    item = ReviewItem(id=7, rule="bulk-access", dedup_key="k", alert_uuid="u-1", detected_at=T0, user_name="alice",
                      patient_id=None, summary="alice read 120 patients in 10 minutes", evidence=("e1", "e2"),
                      status="acknowledged" if acknowledged else "open",
                      acknowledged_by="priya" if acknowledged else None, acknowledged_at=T1 if acknowledged else None,
                      note="known study" if acknowledged else None).to_json_obj()
    assert_unchanged(models.ReviewItem, item)
    assert_unchanged(models.ReviewQueuePage, {"alerts": [item], "count": 1, "next_after": None})


def test_an_audit_search_page_passes_the_documents_through():
    doc = {"@timestamp": "2026-03-01T09:30:00Z", "event": {"id": "110112", "outcome": "0"}, "score": 1.5,
           "patient.ids": ["PAT-7"], "flag": True, "nothing": None}
    assert_unchanged(models.AuditEventPage, {"events": [doc], "count": 1, "total": 1, "total_is_exact": True,
                                             "next_cursor": None})


def test_health():
    assert_unchanged(models.Liveness, {"status": "ok"})
    for shipper in (None, "ok", "degraded"):
        assert_unchanged(models.Readiness, {"status": "ok", "audit_shipper": shipper})
