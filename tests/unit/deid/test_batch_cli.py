from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from compliance.cli.deid import app
from compliance.deid.batch import run_batch

from .conftest import deid_data


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), d / "mr.dcm")
    (d / "notes.txt").write_text("not dicom at all")
    shutil.copy(get_testdata_file("rtplan_truncated.dcm"), d / "truncated.dcm")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), d / "mr_truncated.dcm")
    shutil.copy(get_testdata_file("nested_priv_SQ.dcm"), d / "no_uids.dcm")
    shutil.copy(deid_data("dicom-cookies/image1.dcm"), d / "sc.dcm")
    big = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    big.private_block(0x0043, "BLOBBY", create=True).add_new(0x10, "OB", b"\x01" * (8 << 20))
    big.SOPInstanceUID = "1.2.826.0.1.3680043.99.42"
    big.save_as(d / "blob.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 999"  # unknown character set
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.43"
    ds.save_as(d / "oddcharset.dcm")
    return d


def test_batch_reports_every_file_and_never_leaves_partial_files(engine_for, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_batch(engine_for("research"), [inputs], out)
    by_name = {Path(f["source"]).name: f for f in report.files}
    assert len(by_name) == 9
    for name in ("ct.dcm", "mr.dcm", "blob.dcm", "oddcharset.dcm"):
        assert by_name[name]["status"] == "released", by_name[name]
    assert by_name["notes.txt"]["status"] == "error"
    assert by_name["no_uids.dcm"]["status"] == "held_back"
    assert by_name["sc.dcm"]["status"] == "held_back" and by_name["sc.dcm"]["reasons"]
    # rtplan_truncated.dcm ends on an element boundary: pydicom reads a shorter, well-formed data set.
    assert by_name["truncated.dcm"]["status"] in ("error", "held_back", "released")
    assert by_name["mr_truncated.dcm"]["status"] == "held_back"
    assert "truncated" in by_name["mr_truncated.dcm"]["reasons"][0]
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == report.released
    assert not list(out.glob(".deid-*"))  # no temporary file left
    assert all(n.startswith("2.25.") and n.endswith(".dcm") for n in written)
    for p in out.iterdir():
        pydicom.dcmread(p)
    blob_out = pydicom.dcmread(by_name["blob.dcm"]["output"])
    assert not [t for t in blob_out.keys() if t.group & 1]


def test_cli_exit_codes_and_report(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPLIANCE_DEID_PROJECT_SECRET_ALPHA", "cli-secret-0123456789")
    runner = CliRunner()
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["--profile", "research", "--project", "alpha", "--report", str(report),
                              str(inputs), str(tmp_path / "o1")])
    assert res.exit_code == 1, res.output
    body = json.loads(report.read_text())
    assert body["summary"]["files"] == 9 and body["summary"]["released"] == 5
    res = runner.invoke(app, ["--profile", "research", "--project", "alpha", "--allow-held-back",
                              str(inputs), str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o2" / "deid-report.json").exists()
    # Same project, same pseudonyms across repeated exports.
    names1 = sorted(p.name for p in (tmp_path / "o1").glob("*.dcm"))
    names2 = sorted(p.name for p in (tmp_path / "o2").glob("*.dcm"))
    assert names1 == names2
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(inputs / "ct.dcm", clean)
    res = runner.invoke(app, ["--profile", "basic", "--project", "alpha", str(clean), str(tmp_path / "o3")])
    assert res.exit_code == 0, res.output


def test_cli_refuses_unknown_profile_and_missing_secret(inputs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPLIANCE_DEID_PROJECT_SECRET_NOPE", raising=False)
    monkeypatch.delenv("COMPLIANCE_ENV", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["--profile", "nope", "--project", "alpha", str(inputs), str(tmp_path / "o")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["--profile", "basic", "--project", "nope", str(inputs), str(tmp_path / "o")])
    assert res.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_group_commit_writer_renames_only_after_commit(tmp_path):
    from compliance.deid.batch import GroupCommitWriter

    w = GroupCommitWriter()
    w.write(tmp_path / "a.dcm", b"A" * 10)
    w.write(tmp_path / "sub" / "b.dcm", b"B")
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "sub" / "b.dcm").exists()
    w.commit()
    assert (tmp_path / "a.dcm").read_bytes() == b"A" * 10 and (tmp_path / "sub" / "b.dcm").read_bytes() == b"B"
    assert [p.name for p in tmp_path.rglob(".deid-*")] == []
    w.write(tmp_path / "c.dcm", b"C")
    w.abort()
    assert not (tmp_path / "c.dcm").exists() and [p.name for p in tmp_path.rglob(".deid-*")] == []
