"""The engine on real sample files nobody here wrote, with identifying values injected everywhere."""

from __future__ import annotations

import datetime as dt
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from compliance.deid.pixels import PixelPolicy, load_pixel_policy
from compliance.deid.profiles import load_table

from .conftest import deid_data, pynetdicom_file

INJECTABLE_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "UI", "AE"}


def _write(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _all_uids(ds: Dataset) -> list[str]:
    out = []
    for el in ds.iterall():
        if el.VR == "UI" and el.value:
            values = el.value if isinstance(el.value, list | pydicom.multival.MultiValue) else [el.value]
            out.extend(str(v) for v in values)
    return out


def inject(ds: Dataset) -> list[str]:
    """Put a unique identifying value into every Table E.1-1 attribute we can set, plus nested,
    private, SR and unknown elements. Returns the secrets that must not survive."""
    secrets: list[str] = []
    start = dt.date(1931, 1, 1)
    for n, (tag, _row) in enumerate(sorted(load_table().rows.items())):
        if tag >> 16 == 0x0002:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        vr = vr.split(" or ")[0]
        if vr not in INJECTABLE_VRS:
            continue
        if vr == "PN":
            value = f"Zyxname{n}^Qwgiven{n}"
            secrets += [f"ZYXNAME{n}", f"QWGIVEN{n}"]
        elif vr in ("DA", "DT"):
            d = (start + dt.timedelta(days=n * 3)).strftime("%Y%m%d")
            value = d if vr == "DA" else d + "101010"
            secrets.append(d)
        elif vr == "UI":
            value = f"1.2.826.0.1.3680043.99.{n}.777"
            secrets.append(value)
        elif vr in ("SH", "AE"):
            value = f"INJ{n}SH"
            secrets.append(value)
        else:
            value = f"Secretword{n} lives at Elmstreet{n}"
            secrets += [f"SECRETWORD{n}", f"ELMSTREET{n}"]
        ds.add_new(tag, vr, value)
    ds.PatientName = "Doe^Johanna^Q"
    ds.PatientID = "MRN-00912873"
    ds.AccessionNumber = "ACC77812"
    secrets += ["DOE^JOHANNA", "JOHANNA", "MRN-00912873", "ACC77812"]
    # Three levels deep, inside sequences the table does not list.
    inner = Dataset()
    inner.PatientName = "Deepname^Hidden"
    inner.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.5.5"
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    mid = Dataset()
    mid.ReferencedSOPSequence = Sequence([inner])
    mid.SeriesInstanceUID = "1.2.826.0.1.3680043.99.5.6"
    outer = Dataset()
    outer.ReferencedSeriesSequence = Sequence([mid])
    outer.StudyInstanceUID = "1.2.826.0.1.3680043.99.5.7"
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([outer])
    secrets += ["DEEPNAME", "1.2.826.0.1.3680043.99.5.5", "1.2.826.0.1.3680043.99.5.6", "1.2.826.0.1.3680043.99.5.7"]
    # SR text.
    text_item = Dataset()
    text_item.ValueType = "TEXT"
    text_item.RelationshipType = "CONTAINS"
    text_item.TextValue = "Seen by Johanna Doe, MRN-00912873, Mapleview clinic"
    ds.ContentSequence = Sequence([text_item])
    secrets.append("MAPLEVIEW")
    # Private block and an unknown public attribute.
    block = ds.private_block(0x0041, "INJECTOR 1.0", create=True)
    block.add_new(0x10, "LO", "Privname Johanna")
    block.add_new(0x11, "OB", b"Doe^Johanna blob" * 4)
    ds.add_new(0x00F00010, "LO", "Unknowntagvalue")
    secrets += ["PRIVNAME", "UNKNOWNTAGVALUE"]
    return secrets


def _assert_no_secret(data: bytes, secrets: list[str]) -> None:
    text = data.upper()
    for s in secrets:
        assert s.encode("ascii") not in text, s


def test_injected_identifiers_do_not_survive_basic(engine_for) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    secrets = inject(ds)
    result = engine_for("basic").deidentify(ds)
    assert result.released, (result.reasons, result.findings)
    data = _write(result.dataset)
    _assert_no_secret(data, secrets + ["COMPRESSEDSAMPLES"])
    out = pydicom.dcmread(BytesIO(data))
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.PatientID.startswith("PX") and out.PatientName.family_name == "PSEUDONYM"
    for uid in _all_uids(out) + [out.file_meta.MediaStorageSOPInstanceUID]:
        assert UID(uid).is_valid and len(uid) <= 64
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPInstanceUID.startswith("2.25.")
    assert not [t for t in out.keys() if t.group & 1]  # no private tag left
    assert 0x00F00010 not in out
    assert out.ContentSequence[0].TextValue == "ANONYMIZED"
    assert np.array_equal(out.pixel_array, pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array)


def test_research_profile_shifts_dates_and_keeps_characteristics(engine_for) -> None:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    src.PatientAge = "045Y"
    src.StudyDate, src.SeriesDate = "20200110", "20200112"
    result = engine_for("research").deidentify(src)
    assert result.released, result.reasons
    out = result.dataset
    d0 = dt.datetime.strptime(out.StudyDate, "%Y%m%d")
    d1 = dt.datetime.strptime(out.SeriesDate, "%Y%m%d")
    assert (d1 - d0).days == 2 and out.StudyDate != "20200110"
    assert out.PatientAge == "045Y"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]  # 113101 only when pixels were cleaned


def test_pseudonyms_stable_per_project_and_distinct_across(engine_for) -> None:
    def run(project: str) -> Dataset:
        return engine_for("basic", project).deidentify(pydicom.dcmread(get_testdata_file("CT_small.dcm"))).dataset

    a1, a2, b = run("alpha"), run("alpha"), run("beta")
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
               "FrameOfReferenceUID"):
        assert a1.get(kw) == a2.get(kw)
        assert a1.get(kw) != b.get(kw)


def test_references_stay_consistent(engine_for) -> None:
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ref = Dataset()
    ref.ReferencedSOPClassUID = ct.SOPClassUID
    ref.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ct.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([ref])
    study = Dataset()
    study.StudyInstanceUID = ct.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    ko = Dataset()
    ko.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection
    ko.SOPInstanceUID = "1.2.826.0.1.3680043.99.1"
    ko.StudyInstanceUID = ct.StudyInstanceUID
    ko.SeriesInstanceUID = "1.2.826.0.1.3680043.99.2"
    ko.PatientID = ct.PatientID
    ko.PatientName = ct.PatientName
    ko.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    seg_like = Dataset()
    seg_like.ReferencedSeriesSequence = Sequence([Dataset()])
    seg_like.ReferencedSeriesSequence[0].SeriesInstanceUID = ct.SeriesInstanceUID
    ko.ReferencedSeriesSequence = seg_like.ReferencedSeriesSequence
    eng = engine_for("basic")
    out_ct = eng.deidentify(ct).dataset
    result = eng.deidentify(ko)
    assert result.released, (result.reasons, result.findings)
    out_ko = result.dataset
    ev = out_ko.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == out_ct.StudyInstanceUID == out_ko.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == out_ct.SeriesInstanceUID
    ref_out = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref_out.ReferencedSOPInstanceUID == out_ct.SOPInstanceUID
    assert ref_out.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # registry UIDs are kept
    assert out_ko.ReferencedSeriesSequence[0].SeriesInstanceUID == out_ct.SeriesInstanceUID
    assert out_ko.PatientID == out_ct.PatientID


def test_leak_gate_blocks_identifier_copied_into_kept_attribute(engine_for) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Quixote^Alonso"
    ds.Manufacturer = "Quixote Imaging"  # kept attribute carrying the patient's name
    result = engine_for("basic").deidentify(ds)
    assert not result.released and result.dataset is None
    assert any(f.path == "(0008,0070)" and f.kind == "name" for f in result.findings)
    assert "QUIXOTE" not in repr([f.as_dict() for f in result.findings]).upper()


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrKoreanMulti.dcm", "chrGreek.dcm", "chrJapMulti.dcm",
                                  "chrRuss.dcm", "chrX1.dcm"])
def test_character_sets(engine_for, name: str) -> None:
    path = get_charset_files(name)[0]
    src = pydicom.dcmread(path)
    names = [c for c in str(src.PatientName).replace("=", "^").split("^") if len(c) >= 2]
    src.StudyDescription = f"{src.PatientName} study"
    no_pixel_risk = PixelPolicy(True, (), load_pixel_policy().recipe_path)
    result = engine_for("basic", pixel_policy=no_pixel_risk).deidentify(src)
    assert result.released, (result.reasons, result.findings)
    data = _write(result.dataset)
    charset = pydicom.charset.convert_encodings(src.SpecificCharacterSet)
    out = pydicom.dcmread(BytesIO(data))
    text = " ".join(str(el.value) for el in out.iterall() if el.VR in ("PN", "LO", "SH", "ST", "LT", "UT"))
    for comp in names:
        assert comp not in text
        for enc in charset:
            try:
                assert comp.encode(enc) not in data
            except (LookupError, UnicodeEncodeError):
                pass


def test_pynetdicom_and_deid_data_ct(engine_for) -> None:
    for path in (pynetdicom_file("CTImageStorage.dcm"), deid_data("humans/ctbrain1.dcm")):
        src = pydicom.dcmread(path)
        ids = [str(src.PatientID), str(src.get("AccessionNumber", "")), str(src.StudyInstanceUID)]
        src.BurnedInAnnotation = "NO"
        src.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # exercise header paths; pixels tested below
        result = engine_for("basic").deidentify(src)
        assert result.released, (path, result.reasons, result.findings)
        data = _write(result.dataset)
        for v in ids:
            if len(v) >= 4:
                assert v.encode() not in data


def test_burned_in_ultrasound_is_cleaned_with_clean_pixel_data(engine_for) -> None:
    path = deid_data("ultrasounds/GREYSCALE_IMAGE.dcm")
    src = pydicom.dcmread(path)
    assert src.BurnedInAnnotation == "YES"
    regions = src.SequenceOfUltrasoundRegions
    y0 = min(int(r.RegionLocationMinY0) for r in regions)
    result = engine_for("research").deidentify(src)
    assert result.released, result.reasons
    assert result.pixels.startswith("cleaned")
    out = pydicom.dcmread(BytesIO(_write(result.dataset)))
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    arr = out.pixel_array
    assert not arr[:y0].any()  # the header band above the image regions is blank
    assert arr.any()


def test_burned_in_held_back_without_option_or_rule(engine_for) -> None:
    held = engine_for("basic").deidentify(pydicom.dcmread(deid_data("ultrasounds/GREYSCALE_IMAGE.dcm")))
    assert not held.released and "Clean Pixel Data" in held.reasons[0]
    sc = engine_for("research").deidentify(pydicom.dcmread(deid_data("dicom-cookies/image1.dcm")))
    assert not sc.released and "no region rule" in sc.reasons[0]


def test_missing_uids_held_back(engine_for) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPInstanceUID
    r = engine_for("basic").deidentify(ds)
    assert not r.released and "SOPInstanceUID" in r.reasons[0]


def test_retain_safe_private_keeps_only_listed(engine_for) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    blk.add_new(0x0C, "IS", "1000")
    blk.add_new(0x20, "LO", "not on the list")
    out = engine_for("research-extended").deidentify(ds).dataset
    kept = [t for t in out.keys() if t.group & 1]
    assert [str(out[t].value) for t in kept] == ["SIEMENS MR HEADER", "1000"]


def test_preamble_is_not_carried_over(engine_for) -> None:
    """The PS3.10 preamble is not a data element: whatever an application left there never reaches
    the output (CT_small's own preamble is a TIFF header)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ds.preamble[:4] == b"II*\x00"
    ds.preamble = b"Patient Doe^Johanna MRN-00912873".ljust(128, b"\x00")
    result = engine_for("basic").deidentify(ds)
    assert result.released
    data = _write(result.dataset)
    assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
    _assert_no_secret(data, ["DOE^JOHANNA", "MRN-00912873"])
