"""Re-identification under dual control (``compliance.exports.reidentification``)."""

from __future__ import annotations

import io
import zipfile

import pydicom
import pytest
from pydicom.data import get_testdata_file

from compliance.exports.interfaces import ExportNotFound, ExportStateConflict, SelfApprovalRefused
from compliance.exports.workers import run_claimed

from .builders import DANA, FILES, ROB, SAM, new_export


def _exported_patient_pseudonym(world) -> str:  # type: ignore[no-untyped-def]
    """The PatientID pseudonym of the first file of an export run and downloaded in ``world``."""
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    run_claimed(world.comps, req["id"])
    data = b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)
    zf = zipfile.ZipFile(io.BytesIO(data))
    first = next(n for n in zf.namelist() if n.endswith(".dcm"))
    return str(pydicom.dcmread(io.BytesIO(zf.read(first))).PatientID)


def test_reidentification_needs_a_second_steward(world):  # type: ignore[no-untyped-def]
    pseudonym = _exported_patient_pseudonym(world)
    with pytest.raises(ExportNotFound):
        world.reid.request(DANA, project="lung-study", kind="patient_id", pseudonym="PXNOPE", reason="finding")
    r = world.reid.request(DANA, project="lung-study", kind="patient_id", pseudonym=pseudonym,
                           reason="incidental finding")
    with pytest.raises(ExportStateConflict):
        world.reid.reveal(r["id"], DANA)  # not approved yet
    with pytest.raises(SelfApprovalRefused):
        world.reid.decide(r["id"], DANA, approve=True, comment="me")
    world.reid.decide(r["id"], SAM, approve=True, comment="second approver")
    with pytest.raises(ExportNotFound):
        world.reid.reveal(r["id"], SAM)  # only the one who asked
    revealed = world.reid.reveal(r["id"], DANA)
    sources = {str(pydicom.dcmread(get_testdata_file(f)).PatientID) for f in FILES}
    assert revealed["original"] in sources and revealed["state"] == "revealed"
    with pytest.raises(ExportStateConflict):
        world.reid.reveal(r["id"], DANA)  # once
    records = world.events("110110")
    assert [d["event.action"] for d in records] == ["C", "U", "R"]
    assert records[-1]["patient.ids"] == [revealed["original"]]


def test_a_reveal_that_cannot_look_up_the_pseudonym_does_not_use_the_request_up(world):  # type: ignore[no-untyped-def]
    pseudonym = _exported_patient_pseudonym(world)
    r = world.reid.request(DANA, project="lung-study", kind="patient_id", pseudonym=pseudonym, reason="finding")
    world.reid.decide(r["id"], SAM, approve=True, comment="second approver")
    lookup = world.pmap.lookup
    world.pmap.lookup = lambda *args: None  # the map cannot answer (e.g. a key being restored)
    with pytest.raises(ExportNotFound):
        world.reid.reveal(r["id"], DANA)
    assert [d["event.action"] for d in world.events("110110")] == ["C", "U"]  # nothing revealed, nothing recorded
    world.pmap.lookup = lookup
    assert world.reid.reveal(r["id"], DANA)["original"]  # still approved: it reveals once it can
