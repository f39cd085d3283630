"""A STOW the archive did not (wholly) store is never reported, or audited, as stored (pure logic).

Orthanc's DICOMweb plugin answers 200 with empty Referenced and Failed SOP Sequences when its
storage area refused the write (seen on the real stack: tests/integration/test_dicomweb_gateway.py
makes the storage directory refuse writes). The gateway checks the answer against what it sent.
"""

from __future__ import annotations

import io
import json

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from compliance.audit.atna import AuditSource
from compliance.audit.codes import Outcome
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.auth.interfaces import Principal
from compliance.dicomweb.audit_mapping import outcome_of
from compliance.dicomweb.interfaces import RequestContext
from compliance.dicomweb.routing import PERMISSIONS, Transaction, classify
from compliance.dicomweb.service import DicomwebService
from compliance.dicomweb.stow import multipart_related, split_parts
from compliance.policy.rbac import RbacPolicy

CT = "1.2.840.10008.5.1.4.1.1.2"


def instance() -> tuple[str, bytes]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ds.SOPInstanceUID, buf.getvalue()


def orthanc_answer(stored: list[str], failed: dict[str, int] | None = None) -> bytes:
    """The shape of Orthanc DICOMweb 1.7's STOW answer."""
    def seq(items):
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}

    return json.dumps({
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00081198": seq([{"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": [u]},
                          "00081197": {"vr": "US", "Value": [r]}} for u, r in (failed or {}).items()]),
        "00081199": seq([{"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": [u]}}
                         for u in stored]),
    }).encode()


class Archive:
    def __init__(self, status: int, answer: bytes, content_type: str = "application/dicom+json") -> None:
        self.status, self.answer, self.content_type = status, answer, content_type
        self.received = b""

    async def send(self, method, path, *, query=None, headers=None, content=None):
        self.content_type = headers["content-type"]
        async for chunk in content:
            self.received += chunk
        return httpx.Response(self.status, headers={"content-type": self.content_type,
                                                    "content-length": str(len(self.answer))}, content=self.answer)

    async def study_summary(self, study_uid):
        return None

    async def aclose(self):
        pass


async def stow(outbox: SqlAuditOutbox, archive: Archive, parts: list[bytes]):
    body, content_type = multipart_related(parts)
    policy = RbacPolicy.from_mapping({"version": 1, "roles": {"technologist": [PERMISSIONS[Transaction.STORE]]}})
    auditor = AuditRecorder(outbox, AuditSource(source_id="gw", enterprise_site_id="site"), fail_closed=True)
    svc = DicomwebService(archive, policy, auditor, gateway_id="gw")
    ctx = RequestContext(Principal("sub", "tom", frozenset({"technologist"}), client_id="viewer"), "127.0.0.1",
                         "POST", "/studies", [], "", {"content-type": content_type,
                                                      "content-length": str(len(body))})

    async def chunks():
        yield body

    response = await svc.store(ctx, classify("POST", "/studies"), chunks())
    # the archive gets the same parts, in a body the gateway built (its own boundary)
    boundary = archive.content_type.rsplit("boundary=", 1)[1].encode()
    assert [bytes(p) for _, p in split_parts(archive.received, boundary)] == parts
    events = [doc for _, _, doc in outbox.pending(10)]
    assert len(events) == 1 and events[0]["event.id"] == "110107", events
    return response, events[0]


def failed_items(body: bytes) -> dict[str, int]:
    doc = json.loads(body)
    return {i["00081155"]["Value"][0]: i["00081197"]["Value"][0] for i in doc["00081198"].get("Value", [])}


async def test_an_archive_that_stored_nothing_but_said_200_is_a_409_and_a_serious_failure(outbox):
    (uid1, data1), (uid2, data2) = instance(), instance()
    response, event = await stow(outbox, Archive(200, orthanc_answer([])), [data1, data2])
    assert response.status_code == 409
    assert failed_items(response.body) == {uid1: 0x0110, uid2: 0x0110}
    assert "content-length" not in {k.lower() for k in response.headers}
    assert response.headers["content-type"] == "application/dicom+json"
    assert event["event.outcome"] == Outcome.SERIOUS_FAILURE
    assert event["event.outcome_description"].startswith("the archive stored 0 of 2 instances; not stored: ")
    assert uid1 in event["event.outcome_description"] and "not acknowledged by the archive" in \
        event["event.outcome_description"]


async def test_a_partly_stored_request_is_a_202_naming_what_was_not_stored(outbox):
    (uid1, data1), (uid2, data2) = instance(), instance()
    response, event = await stow(outbox, Archive(200, orthanc_answer([uid1])), [data1, data2])
    assert response.status_code == 202
    assert failed_items(response.body) == {uid2: 0x0110}
    assert json.loads(response.body)["00081199"]["Value"][0]["00081155"]["Value"] == [uid1]
    assert event["event.outcome"] == Outcome.MINOR_FAILURE
    assert event["event.outcome_description"] == \
        f"the archive stored 1 of 2 instances; not stored: {uid2}: not acknowledged by the archive"


async def test_the_archives_own_failure_reason_is_kept(outbox):
    (uid1, data1), (uid2, data2) = instance(), instance()
    response, event = await stow(outbox, Archive(200, orthanc_answer([uid1], {uid2: 0xA700})), [data1, data2])
    assert response.status_code == 202
    assert failed_items(response.body) == {uid2: 0xA700}  # not listed twice
    assert event["event.outcome_description"].endswith(f"not stored: {uid2}: out of resources")


async def test_a_fully_stored_request_is_passed_on_unchanged(outbox):
    (uid1, data1), (uid2, data2) = instance(), instance()
    answer = orthanc_answer([uid1, uid2])
    response, event = await stow(outbox, Archive(200, answer), [data1, data2])
    assert response.status_code == 200 and response.body == answer
    assert response.headers["content-length"] == str(len(answer))
    assert event["event.outcome"] == Outcome.SUCCESS and event["event.outcome_description"] is None


async def test_an_answer_that_is_not_dicom_json_is_passed_on_as_it_came(outbox):
    _, data = instance()
    response, event = await stow(outbox, Archive(200, b"<html>ok</html>", "text/html"), [data])
    assert response.status_code == 200 and response.body == b"<html>ok</html>"
    assert event["event.outcome"] == Outcome.SUCCESS


async def test_an_archive_error_status_is_audited_as_it_came(outbox):
    _, data = instance()
    response, event = await stow(outbox, Archive(400, orthanc_answer([])), [data])
    assert response.status_code == 400
    assert event["event.outcome"] == Outcome.MINOR_FAILURE
    assert event["event.outcome_description"] == "archive status 400"


def test_202_is_a_minor_failure_not_a_success():
    assert outcome_of(202) == Outcome.MINOR_FAILURE
    assert outcome_of(200) == Outcome.SUCCESS and outcome_of(204) == Outcome.SUCCESS
    assert outcome_of(404) == Outcome.MINOR_FAILURE and outcome_of(502) == Outcome.SERIOUS_FAILURE


async def test_an_answer_in_a_one_element_array_is_checked_the_same(outbox):
    (uid1, data1), (uid2, data2) = instance(), instance()
    answer = b"[" + orthanc_answer([uid1]) + b"]"
    response, event = await stow(outbox, Archive(200, answer), [data1, data2])
    assert response.status_code == 202
    assert failed_items(response.body) == {uid2: 0x0110}
    assert event["event.outcome"] == Outcome.MINOR_FAILURE


async def test_the_application_log_names_no_instance(outbox, caplog):
    # the UIDs identify a patient's images: they are in the audit event, not in the application log
    (uid1, data1), (uid2, data2) = instance(), instance()
    with caplog.at_level("WARNING", logger="compliance.dicomweb.service"):
        _, event = await stow(outbox, Archive(200, orthanc_answer([uid1])), [data1, data2])
    assert uid2 in event["event.outcome_description"]
    assert "stored 1 of 2 instances" in caplog.text
    assert uid1 not in caplog.text and uid2 not in caplog.text
