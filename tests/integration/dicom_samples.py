"""Unique copies of pydicom's bundled sample files, so each test owns its study and patient."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


@dataclass(frozen=True)
class Sample:
    data: bytes
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str


def unique_instance(name: str = "CT_small.dcm", *, patient_id: str | None = None, patient_name: str | None = None,
                    study_uid: str | None = None) -> Sample:
    ds = pydicom.dcmread(get_testdata_file(name))
    tag = uuid.uuid4().hex[:12]
    ds.PatientID = patient_id or f"IT-{tag}"
    ds.PatientName = patient_name or f"Integration^Test{tag}"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Sample(buf.getvalue(), str(ds.PatientID), str(ds.PatientName), ds.StudyInstanceUID,
                  ds.SeriesInstanceUID, ds.SOPInstanceUID)


def parts_of_multipart(body: bytes, content_type: str) -> list[bytes]:
    """Split a multipart/related response into its part payloads (test helper, strict)."""
    from python_multipart.multipart import parse_options_header

    from compliance.dicomweb.stow import split_parts

    media, params = parse_options_header(content_type)
    assert media == b"multipart/related", content_type
    return [bytes(p) for _, p in split_parts(body, params[b"boundary"])]
