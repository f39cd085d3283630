from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from compliance.demo import multipart_related
from compliance.dicomweb.stow import StowPartRejected, StowStreamValidator, split_parts, validate_stow
from compliance.errors import InvalidRequest, UnsupportedMediaType

CT = Path(get_testdata_file("CT_small.dcm")).read_bytes()
MR = Path(get_testdata_file("MR_small.dcm")).read_bytes()


def test_valid_request_lists_what_it_would_store():
    body, ct = multipart_related([CT, MR])
    instances = validate_stow(body, ct)
    ct_ds = pydicom.dcmread(io.BytesIO(CT))
    assert [i.sop_instance_uid for i in instances][0] == ct_ds.SOPInstanceUID
    assert instances[0].patient_id == ct_ds.PatientID
    assert instances[0].study_uid == ct_ds.StudyInstanceUID
    assert len(instances) == 2


def test_parts_without_their_own_content_type_default_to_the_type_parameter():
    body = b"--b\r\n\r\n" + CT + b"\r\n--b--\r\n"
    assert len(validate_stow(body, 'multipart/related; type="application/dicom"; boundary=b')) == 1


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/dicom",
        "multipart/form-data; boundary=b",
        'multipart/related; type="application/dicom+json"; boundary=b',
    ],
)
def test_wrong_request_media_type_is_415(content_type):
    body, _ = multipart_related([CT])
    with pytest.raises(UnsupportedMediaType):
        validate_stow(body, content_type)


def test_non_dicom_media_type_part_is_415():
    body, ct = multipart_related([b"hello"], media_type="text/plain")
    ct = ct.replace('type="text/plain"', 'type="application/dicom"')
    with pytest.raises(UnsupportedMediaType, match="part 0"):
        validate_stow(body, ct)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) // 2],  # truncated: no closing boundary
        lambda b: b.replace(b"--compliance-", b"--other-", 1),  # wrong boundary
        lambda b: b"no multipart here at all",
        lambda b: b"",
    ],
)
def test_malformed_multipart_is_400(mangle):
    body, ct = multipart_related([CT])
    with pytest.raises(InvalidRequest) as info:
        validate_stow(mangle(body), ct)
    assert not isinstance(info.value, UnsupportedMediaType)


def test_missing_boundary_is_400():
    with pytest.raises(InvalidRequest):
        validate_stow(b"x", 'multipart/related; type="application/dicom"')


def test_a_part_that_is_not_dicom_rejects_the_whole_request():
    body, ct = multipart_related([CT, b"%PDF-1.4 definitely not DICOM" * 10])
    with pytest.raises(StowPartRejected) as info:
        validate_stow(body, ct)
    assert info.value.detail["failures"][0]["part"] == 1
    assert "not a DICOM" in info.value.detail["failures"][0]["reason"]


def test_missing_uids_rejected():
    ds = pydicom.dcmread(io.BytesIO(CT))
    del ds.StudyInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    body, ct = multipart_related([buf.getvalue()])
    with pytest.raises(StowPartRejected) as info:
        validate_stow(body, ct)
    assert "StudyInstanceUID" in info.value.detail["failures"][0]["reason"]


def test_instance_of_another_study_than_the_url_rejected():
    body, ct = multipart_related([CT])
    with pytest.raises(StowPartRejected):
        validate_stow(body, ct, study_uid="1.2.3.4")


def feed_in_chunks(validator: StowStreamValidator, body: bytes, size: int) -> bytes:
    out = bytearray()
    for i in range(0, len(body), size):
        out += validator.feed(body[i : i + size])
    return bytes(out)


def archive_parts(body: bytes, validator: StowStreamValidator) -> list[tuple[dict[str, str], bytes]]:
    """The parts of the body the validator built for the archive, with their headers."""
    assert validator.content_type.endswith(f"boundary={validator.boundary}")
    return [(headers, bytes(payload)) for headers, payload in split_parts(body, validator.boundary.encode())]


@pytest.mark.parametrize("chunk", [1, 7, 1000, 65536, 10**9])
def test_streaming_rebuilds_the_body_from_the_validated_parts_and_withholds_its_end(chunk):
    body, ct = multipart_related([CT, MR])
    v = StowStreamValidator(ct)
    early = feed_in_chunks(v, body, chunk)
    # before finish() the archive can never have received a complete request
    assert not early.rstrip().endswith(b"--")
    assert f"--{v.boundary}--".encode() not in early
    rebuilt = early + v.finish()
    assert archive_parts(rebuilt, v) == [({"content-type": "application/dicom"}, CT),
                                         ({"content-type": "application/dicom"}, MR)]
    # the client's boundary never reaches the archive
    assert b"compliance-" + ct.rsplit("compliance-", 1)[1].encode() not in rebuilt
    assert [i.sop_instance_uid for i in v.instances] == [
        pydicom.dcmread(io.BytesIO(x)).SOPInstanceUID for x in (CT, MR)
    ]
    assert v.committed == v.instances


def test_streaming_never_forwards_a_rejected_part():
    bad = b"\x00" * 200 + b"this is not DICOM" * 50
    body, ct = multipart_related([CT, bad])
    v = StowStreamValidator(ct)
    forwarded = bytearray()
    with pytest.raises(StowPartRejected):
        for i in range(0, len(body), 512):
            forwarded += v.feed(body[i : i + 512])
        v.finish()
    assert b"this is not DICOM" not in forwarded
    assert len(forwarded) < len(body)


def test_a_large_part_streams_once_its_header_is_checked():
    ds = pydicom.dcmread(io.BytesIO(CT))
    ds.PixelData = b"\x00" * (16 * 1024 * 1024)
    ds.Rows, ds.Columns = 2048, 4096
    buf = io.BytesIO()
    ds.save_as(buf)
    body, ct = multipart_related([buf.getvalue()])
    v = StowStreamValidator(ct)
    held_max = 0
    fed = released = 0
    for i in range(0, len(body), 65536):
        piece = body[i : i + 65536]
        fed += len(piece)
        released += len(v.feed(piece))
        held_max = max(held_max, fed - released)
    released += len(v.finish())
    assert released > len(body) - 200  # the whole part, under the gateway's own framing
    assert held_max < 256 * 1024  # bounded by the header, not by the 16 MiB part
