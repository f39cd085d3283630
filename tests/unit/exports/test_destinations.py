"""Pushing an export to a DICOMweb research archive: the allow-list, the job, per-file outcomes, the audit.

The archive side is the in-memory archive of test_workflow; the destination side is either a
recording STOW client (the job's contract) or ``DicomwebStowClient`` over an httpx mock transport
(the STOW-RS answers it must read). The end-to-end push into a real second Orthanc is
tests/integration/test_exports.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from compliance.errors import ConfigurationError
from compliance.exports.destinations import (
    FAILED,
    STORED,
    UNCONFIRMED,
    DestinationRegistry,
    DicomwebDestination,
    DicomwebStowClient,
    load_destinations,
)
from compliance.exports.interfaces import ExportStateConflict, InvalidExportRequest
from compliance.exports.workers import run_claimed

from .test_workflow import DANA, FILES, ROB, _new, build_world

PACS = DicomwebDestination(name="research-pacs", url="http://research.example/dicom-web",
                           description="lab archive", projects=frozenset({"lung-study"}))
SOURCES = {str(pydicom.dcmread(get_testdata_file(f)).PatientID): f for f in FILES}


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "destinations.yaml"
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- the allow-list

def test_allow_list_loads_and_hides_credentials(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PACS_PW", "s3cret-value")
    reg = load_destinations(_write(tmp_path, """
destinations:
  research-pacs:
    kind: dicomweb
    description: lab archive
    url: https://pacs.example.org/dicom-web/
    auth: basic
    username: exporter
    password_env: PACS_PW
    projects: [lung-study]
"""), environment="production")
    dest = reg.get("research-pacs")
    assert dest.stow_url == "https://pacs.example.org/dicom-web/studies"
    public = json.dumps(reg.public())
    assert "s3cret-value" not in public and "PACS_PW" not in public and "exporter" not in public
    auth = dest.credentials()
    assert isinstance(auth, httpx.BasicAuth)
    assert load_destinations(tmp_path / "missing.yaml").names() == []  # no file: bundles only
    shipped = load_destinations(Path(__file__).resolve().parents[3] / "policies" / "export-destinations.yaml")
    assert shipped.names() == []  # the shipped list enables nothing


@pytest.mark.parametrize("spec, message", [
    ("kind: ftp\n    url: https://x.example/dw", "kind"),
    ("kind: dicomweb\n    url: https://user:pw@x.example/dw", "without credentials"),
    ("kind: dicomweb\n    url: https://x.example/dw?to=elsewhere", "without credentials or query"),
    ("kind: dicomweb\n    url: file:///etc/passwd", "http(s)"),
    ("kind: dicomweb\n    url: http://x.example/dw", "HTTPS only"),
    ("kind: dicomweb\n    url: https://x.example/dw\n    auth: basic\n    username: u", "password_env"),
    ("kind: dicomweb\n    url: https://x.example/dw\n    password: inline-secret", "unknown keys"),
])
def test_allow_list_refuses_bad_entries(tmp_path, spec, message):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_destinations(_write(tmp_path, f"destinations:\n  pacs:\n    {spec}\n"), environment="production")


def test_a_request_names_a_destination_never_a_url():
    reg = DestinationRegistry([PACS])
    assert reg.resolve("bundle", "lung-study") == {"kind": "bundle"}
    assert reg.resolve({"kind": "dicomweb", "name": "research-pacs"}, "lung-study") == \
        {"kind": "dicomweb", "name": "research-pacs"}
    for bad in ({"kind": "dicomweb", "name": "elsewhere"},
                {"kind": "dicomweb", "name": "research-pacs", "url": "http://evil.example/dicom-web"},
                {"kind": "dicomweb", "url": "http://evil.example/dicom-web"},
                "http://evil.example/dicom-web", "ftp"):
        with pytest.raises(InvalidExportRequest):
            reg.resolve(bad, "lung-study")
    with pytest.raises(InvalidExportRequest, match="may not export"):
        reg.resolve({"kind": "dicomweb", "name": "research-pacs"}, "another-project")


# --------------------------------------------------------------------------- the job

class RecordingStow:
    """The destination side of the job's contract: records every batch, fails the UIDs it is told to."""

    def __init__(self, fail: set[str] | None = None, unconfirmed: set[str] | None = None) -> None:
        self.batches: list[list[tuple[str, bytes]]] = []
        self.fail_patients = fail or set()
        self.unconfirmed_patients = unconfirmed or set()
        self.closed = False

    def store(self, instances):  # type: ignore[no-untyped-def]
        self.batches.append(list(instances))
        out = {}
        for uid, data in instances:
            source_pid = self._source(data)
            if source_pid in self.fail_patients:
                out[uid] = (FAILED, "destination refused the instance: out of resources")
            elif source_pid in self.unconfirmed_patients:
                out[uid] = (UNCONFIRMED, "no answer from the destination (ReadTimeout)")
            else:
                out[uid] = (STORED, None)
        return out

    @staticmethod
    def _source(data: bytes) -> str:
        ds = pydicom.dcmread(io.BytesIO(data))
        # which source file this pseudonymised instance came from (the modality tells CT from MR)
        return next(pid for pid, f in SOURCES.items() if f.startswith(str(ds.Modality)))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def pushworld(tmp_path):  # type: ignore[no-untyped-def]
    stow = RecordingStow()
    world, engine = build_world(tmp_path, destinations=DestinationRegistry([PACS]),
                                stow_client_factory=lambda dest: stow, stow_batch_instances=1)

    def approved() -> str:
        req = world.service.create(ROB, _new(destination={"kind": "dicomweb", "name": "research-pacs"}))
        world.service.decide(req["id"], DANA, approve=True, comment="IRB approved")
        return req["id"]

    world.stow = stow
    world.approved = approved
    yield world
    engine.dispose()


def test_push_stores_every_released_instance_and_audits_the_destination(pushworld):  # type: ignore[no-untyped-def]
    rid = pushworld.approved()
    assert pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)["destination"] == \
        {"kind": "dicomweb", "name": "research-pacs"}
    assert run_claimed(pushworld.comps, rid) == "ready"
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "ready" and status["error"] is None and status["bundle_size"] is None
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"], delivery["unconfirmed"], delivery["released"]) == (2, 0, 0, 2)
    assert delivery["destination"]["name"] == "research-pacs"
    assert delivery["stow_url"] == "http://research.example/dicom-web/studies"
    assert [f["status"] for f in delivery["files"]] == ["stored", "stored"]
    # What reached the destination is de-identified: no source patient ID, name or UID in any byte.
    pushed = [data for batch in pushworld.stow.batches for _, data in batch]
    assert len(pushworld.stow.batches) == 2 and pushworld.stow.closed  # batches of one, as configured
    for f in FILES:
        src = pydicom.dcmread(get_testdata_file(f))
        for data in pushed:
            for value in (str(src.PatientID), str(src.PatientName), src.StudyInstanceUID, src.SOPInstanceUID):
                assert value.encode() not in data
    for data, entry in zip(pushed, delivery["files"], strict=True):
        out = pydicom.dcmread(io.BytesIO(data))
        assert out.PatientIdentityRemoved == "YES" and out.SOPInstanceUID == entry["sop_instance_uid"]
        assert out.SOPInstanceUID.startswith("2.25.")
    # Nothing to download: the data went to the archive.
    with pytest.raises(ExportStateConflict, match="no bundle"):
        pushworld.service.open_bundle(rid, ROB, destination_uri="x")
    assert not list((pushworld.tmp / "bundles").glob("*.bundle"))
    # THE disclosure: one 110106 per batch to the destination, with the SOURCE patients of the batch.
    exports = pushworld.events("110106")
    assert len(exports) == 2
    for doc in exports:
        assert doc["recipient"] == "research-pacs" and doc["user.name"] == "rob" and doc["event.outcome"] == 0
        assert "http://research.example/dicom-web/studies" in doc["participant.ids"]
        assert "1 instances sent" in doc["event.outcome_description"]
    assert {pid for doc in exports for pid in doc["patient.ids"]} == set(SOURCES)
    steps = [d for d in pushworld.events("110109") if "delivered" in (d["event.outcome_description"] or "")]
    assert [d["event.outcome_description"] for d in steps] == \
        ["export delivered to research-pacs: 2 stored, 0 failed, 0 unconfirmed"]


def test_partial_failure_is_reported_per_file(pushworld):  # type: ignore[no-untyped-def]
    mr_patient = next(pid for pid, f in SOURCES.items() if f.startswith("MR"))
    ct_patient = next(pid for pid, f in SOURCES.items() if f.startswith("CT"))
    pushworld.stow.fail_patients = {mr_patient}
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "ready"
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    delivery = status["delivery"]
    assert (delivery["stored"], delivery["failed"]) == (1, 1)
    by_status = {f["status"]: f for f in delivery["files"]}
    assert by_status["failed"]["reason"] == "destination refused the instance: out of resources"
    assert "reason" not in by_status["stored"]
    assert status["error"].startswith("partial delivery: 1 of 2")
    # each batch was audited as it left; the refused one is followed by its failure
    docs = pushworld.events("110106")
    assert [(d["patient.ids"], d["event.outcome"]) for d in docs] == \
        [([ct_patient], 0), ([mr_patient], 0), ([mr_patient], 8)]
    assert "1 of 1 instances sent were not confirmed stored" in docs[2]["event.outcome_description"]


def test_unconfirmed_counts_as_disclosed(pushworld):  # type: ignore[no-untyped-def]
    pushworld.stow.unconfirmed_patients = set(SOURCES)
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "failed"  # nothing confirmed stored
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    assert status["delivery"]["unconfirmed"] == 2 and "ReadTimeout" in status["error"]
    # it may have arrived: the audit never under-reports (sent, then not confirmed)
    docs = pushworld.events("110106")
    assert [d["event.outcome"] for d in docs] == [0, 8, 0, 8]
    assert {pid for d in docs for pid in d["patient.ids"]} == set(SOURCES)


def test_nothing_stored_fails_and_each_attempt_is_audited_with_its_failure(pushworld):  # type: ignore[no-untyped-def]
    pushworld.stow.fail_patients = set(SOURCES)
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "failed"
    status = pushworld.service.get(rid, reader_id=ROB.user_id, may_read_all=False)
    assert status["state"] == "failed" and "no instance was stored at research-pacs" in status["error"]
    assert [f["status"] for f in status["delivery"]["files"]] == ["failed", "failed"]
    assert [d["event.outcome"] for d in pushworld.events("110106")] == [0, 8, 0, 8]


def test_the_disclosure_is_durable_before_the_batch_leaves(pushworld):  # type: ignore[no-untyped-def]
    """A job killed mid-push must not leave a disclosure unaudited: the event precedes the STOW."""
    seen: list[int] = []
    store = pushworld.stow.store

    def store_after_checking(items):  # type: ignore[no-untyped-def]
        seen.append(len(pushworld.events("110106")))
        return store(items)

    pushworld.stow.store = store_after_checking
    rid = pushworld.approved()
    assert run_claimed(pushworld.comps, rid) == "ready"
    assert seen == [1, 2]  # batch n's event was in the outbox when batch n was sent


def test_a_destination_removed_from_the_list_is_not_used(pushworld):  # type: ignore[no-untyped-def]
    rid = pushworld.approved()
    pushworld.comps.job._push._destinations = DestinationRegistry()  # the list changed after approval
    assert run_claimed(pushworld.comps, rid) == "failed"
    assert "no longer configured" in pushworld.service.get(rid, reader_id="x", may_read_all=True)["error"]
    assert pushworld.stow.batches == []


# --------------------------------------------------------------------------- reading STOW-RS answers

def _client(handler, **kw) -> DicomwebStowClient:  # type: ignore[no-untyped-def]
    client = DicomwebStowClient(PACS, backoff_seconds=0, **kw)
    client._client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=False)
    return client


def _sop_seq(tag: str, uids: list[str], reason: int | None = None) -> dict:
    items = []
    for uid in uids:
        item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {tag: {"vr": "SQ", "Value": items}}


def test_stow_answer_is_read_per_instance():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {**_sop_seq("00081199", ["2.25.1"]), **_sop_seq("00081198", ["2.25.2"], 0xA700)}
        return httpx.Response(409, json=body)

    out = _client(handler).store([("2.25.1", b"A"), ("2.25.2", b"B"), ("2.25.3", b"C")])
    assert out["2.25.1"] == (STORED, None)
    assert out["2.25.2"] == (FAILED, "destination refused the instance: out of resources")
    assert out["2.25.3"][0] == UNCONFIRMED
    req = seen[0]
    assert str(req.url) == "http://research.example/dicom-web/studies" and req.method == "POST"
    assert req.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert req.content.count(b"Content-Type: application/dicom\r\n\r\n") == 3


def test_stow_never_follows_a_redirect_and_retries_only_busy_answers():
    calls: list[str] = []

    def redirect(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(307, headers={"Location": "http://evil.example/dicom-web/studies"})

    out = _client(redirect).store([("2.25.1", b"A")])
    assert out["2.25.1"][0] == FAILED and "redirects are not followed" in out["2.25.1"][1]
    assert calls == ["http://research.example/dicom-web/studies"]

    answers = iter([httpx.Response(503), httpx.Response(200, json=_sop_seq("00081199", ["2.25.1"]))])
    assert _client(lambda r: next(answers)).store([("2.25.1", b"A")]) == {"2.25.1": (STORED, None)}

    def refused(request: httpx.Request) -> httpx.Response:
        calls.append("refused")
        return httpx.Response(401)

    calls.clear()
    out = _client(refused).store([("2.25.1", b"A")])
    assert out["2.25.1"][0] == FAILED and "credentials" in out["2.25.1"][1] and calls == ["refused"]

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert _client(down).store([("2.25.1", b"A")])["2.25.1"] == \
        (FAILED, "destination unreachable (ConnectError)")


def test_missing_credential_is_a_configuration_error(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    dest = DicomwebDestination(name="p", url="https://x.example/dw", auth="basic", username="u",
                               password_env="NO_SUCH_PW")
    with pytest.raises(ConfigurationError, match="NO_SUCH_PW"):
        DicomwebStowClient(dest)
