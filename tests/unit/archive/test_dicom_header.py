"""The PatientID fast path gives pydicom's answer exactly, or none (and pydicom is asked)."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file

from compliance.archive import dicom_header
from compliance.archive.storage import NON_PATIENT_ID, patient_id_of

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def pydicom_patient_id(data: bytes) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID"])
    value = ds.get("PatientID")
    return None if value is None else str(value)


def element(tag: int, vr: str, value: bytes, *, implicit: bool = False, undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", length) + value
    if vr in _LONG:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", length) + value
    return head + vr.encode() + struct.pack("<H", length) + value


def item(content: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def part10(dataset: bytes, syntax: str = EXPLICIT_LE) -> bytes:
    uid = syntax.encode() + (b"\0" if len(syntax) % 2 else b"")
    meta = element(0x00020010, "UI", uid)
    return b"\0" * 128 + b"DICM" + element(0x00020000, "UL", struct.pack("<I", len(meta))) + meta + dataset


def text(value: str) -> bytes:
    raw = value.encode("latin-1")
    return raw + (b" " if len(raw) % 2 else b"")


def test_every_pydicom_test_file_gets_pydicoms_answer_or_none():
    answered = 0
    # The files bundled with pydicom (get_testdata_files would also try to download more).
    files = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))
    assert len(files) > 50
    for path in files:
        data = Path(path).read_bytes()
        variants = [data]
        pixels = data.rfind(b"\xe0\x7f\x10\x00")
        if pixels > 132:
            variants.append(data[:pixels])  # what Orthanc stores as dicom-until-pixel-data
        for variant in variants:
            try:
                fast = dicom_header.patient_id(variant)
            except dicom_header.Unsupported:
                continue
            answered += 1
            assert fast == pydicom_patient_id(variant), path
    assert answered >= 80, "the fast path answers most well-formed files"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"])
def test_common_files_take_the_fast_path(name: str):
    data = Path(get_testdata_file(name)).read_bytes()
    assert dicom_header.patient_id(data) == pydicom_patient_id(data)


def dataset(patient: bytes | None, *, implicit: bool = False, before: bytes = b"", after: bytes = b"") -> bytes:
    e = lambda tag, vr, value: element(tag, vr, value, implicit=implicit)  # noqa: E731
    body = e(0x00080005, "CS", text("ISO_IR 100")) + e(0x00080016, "UI", b"1.2.3\0") + before
    body += e(0x00100010, "PN", text("Doe^Jane"))
    if patient is not None:
        body += e(0x00100020, "LO", patient)
    return body + e(0x00100030, "DA", b"20000101") + after + e(0x0020000D, "UI", b"1.2.3.4\0")


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(("raw", "expected"), [
    (text("PAT-1"), "PAT-1"),
    (b"PAT-2   ", "PAT-2"),
    (b"PAT-3\0", "PAT-3"),
    (b"  LEADING", "  LEADING"),
    (b"", ""),
])
def test_values_are_decoded_as_pydicom_decodes_them(raw: bytes, expected: str, implicit: bool):
    data = part10(dataset(raw, implicit=implicit), IMPLICIT_LE if implicit else EXPLICIT_LE)
    assert pydicom_patient_id(data) == expected
    assert dicom_header.patient_id(data) == expected
    assert patient_id_of(data, 1) == expected


def test_no_patient_id_is_none_and_the_non_patient_key():
    data = part10(dataset(None))
    assert pydicom_patient_id(data) is None and dicom_header.patient_id(data) is None
    assert patient_id_of(data, 1) == NON_PATIENT_ID


@pytest.mark.parametrize("raw", [b"M\xfcller", b"A\\B ", b"ESC\x1b$B"])
def test_values_it_cannot_vouch_for_go_to_pydicom(raw: bytes):
    data = part10(dataset(raw))
    with pytest.raises(dicom_header.Unsupported):
        dicom_header.patient_id(data)
    assert patient_id_of(data, 1) == str(pydicom_patient_id(data))


def test_iso_2022_character_sets_go_to_pydicom():
    body = dataset(text("PAT-J")).replace(element(0x00080005, "CS", text("ISO_IR 100")),
                                          element(0x00080005, "CS", text("\\ISO 2022 IR 87")))
    with pytest.raises(dicom_header.Unsupported):
        dicom_header.patient_id(part10(body))
    assert patient_id_of(part10(body), 1) == "PAT-J"


@pytest.mark.parametrize("padding", [0, 100_000])
def test_an_out_of_order_patient_id_is_never_missed(padding: int):
    # PatientID after StudyInstanceUID: pydicom (and Orthanc's DCMTK) still see it. A walk that
    # stopped at the first tag past (0010,0020) would file this object under the non-patient key,
    # out of reach of the patient's shred. Padding makes the rest long (walked, not searched).
    body = dataset(None, after=element(0x00191000, "OB", b"P" * padding))
    body += element(0x00100020, "LO", text("HIDDEN"))
    data = part10(body)
    assert pydicom_patient_id(data) == "HIDDEN"
    with pytest.raises(dicom_header.Unsupported):
        dicom_header.patient_id(data)
    assert patient_id_of(data, 1) == "HIDDEN"


def test_patient_id_tags_inside_sequences_and_values_are_not_top_level():
    inner = element(0x00100020, "LO", text("OTHER-ID"))
    other_ids = element(0x00101002, "SQ", item(inner, undefined=True) + item(inner) + SEQUENCE_END, undefined=True)
    blob = element(0x00191010, "OB", struct.pack("<HH", 0x0010, 0x0020) * 8)  # private, binary
    for patient in (text("MAIN"), None):
        data = part10(dataset(patient, after=other_ids + blob))
        assert dicom_header.patient_id(data) == pydicom_patient_id(data)
        assert dicom_header.patient_id(data) == (None if patient is None else "MAIN")


def test_undefined_length_sequences_before_patient_id_are_skipped():
    nested = element(0x00081150, "UI", b"1.2\0") + element(
        0x00082112, "SQ", item(element(0x00100020, "LO", text("NOPE")), undefined=True) + SEQUENCE_END,
        undefined=True)
    referenced = element(0x00081140, "SQ", item(nested, undefined=True) + SEQUENCE_END, undefined=True)
    # An undefined-length UN: its content is implicit VR (PS3.5 6.2.2).
    unknown = element(0x00091010, "UN", item(element(0x00100020, "LO", text("NOPE"), implicit=True),
                                             undefined=True) + SEQUENCE_END, undefined=True)
    data = part10(dataset(text("PAT-SEQ"), before=referenced + unknown))
    assert pydicom_patient_id(data) == "PAT-SEQ"
    assert dicom_header.patient_id(data) == "PAT-SEQ"


@pytest.mark.parametrize("damage", ["truncated", "not_part10", "big_endian", "bad_vr", "un_vr"])
def test_anything_unusual_goes_to_pydicom(damage: str):
    data = part10(dataset(text("PAT-X")))
    if damage == "truncated":
        data = data[: data.find(b"PAT-X") + 2]
    elif damage == "not_part10":
        data = data[132:]
    elif damage == "big_endian":
        data = part10(dataset(text("PAT-X")), "1.2.840.10008.1.2.2")
    elif damage == "bad_vr":
        data = data.replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00pn")
    else:  # PatientID written with VR UN: pydicom reads it as the dictionary's LO
        birth = element(0x00100030, "DA", b"20000101")
        data = part10(dataset(None).replace(birth, element(0x00100020, "UN", text("PAT-X")) + birth))
    with pytest.raises(dicom_header.Unsupported):
        dicom_header.patient_id(data)
    try:
        expected = pydicom_patient_id(data)
    except Exception:  # noqa: BLE001 - pydicom refuses it: the non-patient key, as before
        expected = None
    assert patient_id_of(data, 1) == (NON_PATIENT_ID if expected is None else expected)
