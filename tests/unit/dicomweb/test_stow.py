from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from compliance.demo import multipart_related
from compliance.dicomweb.stow import StowPartRejected, validate_stow
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
    with pytest.raises(StowPartRejected, match="1 of 1"):
        validate_stow(body, ct)


def test_instance_of_another_study_than_the_url_rejected():
    body, ct = multipart_related([CT])
    with pytest.raises(StowPartRejected):
        validate_stow(body, ct, study_uid="1.2.3.4")
