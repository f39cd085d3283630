"""Validation of STOW-RS request bodies (DICOM PS3.18 10.5) before anything reaches the archive.

The gateway accepts ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2.1): every part a
PS3.10 file. The whole request is validated first and refused whole when any part is bad, so a bad
request changes nothing in the archive:

* not multipart/related, or a ``type`` other than application/dicom (metadata + bulk data
  representations are not accepted here) -> :class:`UnsupportedMediaType` (415);
* a part whose own Content-Type is not application/dicom -> :class:`UnsupportedMediaType` (415);
* a body that is not well-formed multipart (bad or missing boundary, truncated, no parts)
  -> :class:`InvalidRequest` (400);
* a part that is not a DICOM PS3.10 file, lacks SOP Class/Instance or Study Instance UID, or belongs
  to another study than the one in the URL -> :class:`StowPartRejected` (409, PS3.18 Table 10.5.3-1
  "none of the instances were stored"), with the reason per part.

The multipart framing is parsed by python-multipart; DICOM parsing is pydicom's.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from compliance.errors import Conflict, InvalidRequest, UnsupportedMediaType

DICOM_MEDIA_TYPE = "application/dicom"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class StowPartRejected(Conflict):
    code = "stow_part_rejected"


@dataclass(frozen=True)
class StowInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str | None
    patient_id: str | None
    patient_name: str | None
    accession: str | None


def parse_content_type(content_type: str | None) -> bytes:
    """Return the multipart boundary of a STOW-RS request, or raise 415/400."""
    if not content_type:
        raise UnsupportedMediaType("STOW-RS needs Content-Type: multipart/related; type=\"application/dicom\"")
    media, params = parse_options_header(content_type)
    if media.lower() != b"multipart/related":
        raise UnsupportedMediaType(
            f"STOW-RS accepts multipart/related, not {media.decode('latin-1')}",
            detail={"accepted": 'multipart/related; type="application/dicom"'},
        )
    part_type = params.get(b"type", b"").lower()
    if part_type and part_type != DICOM_MEDIA_TYPE.encode():
        raise UnsupportedMediaType(
            f"this gateway accepts STOW-RS parts of type application/dicom only, not {part_type.decode('latin-1')}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("the multipart/related Content-Type has no boundary")
    return boundary


def split_parts(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], memoryview]]:
    """Split a multipart body into (headers, payload) without copying payloads."""
    parts: list[tuple[dict[str, str], memoryview]] = []
    state: dict = {"ended": False}
    view = memoryview(body)

    def on_part_begin() -> None:
        state["headers"] = {}
        state["spans"] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] = bytes(data[start:end]).decode("latin-1").lower()

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["headers"][state["field"]] = bytes(data[start:end]).decode("latin-1").strip()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["spans"].append((start, end))

    def on_part_end() -> None:
        spans = state["spans"]
        if spans and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)):
            payload = view[spans[0][0] : spans[-1][1]]
        else:
            payload = memoryview(b"".join(view[a:b] for a, b in spans))
        parts.append((state["headers"], payload))

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        # One write of the whole body: the parser's offsets are then offsets into ``body``.
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
    if not state["ended"]:
        raise InvalidRequest("the multipart body is truncated: no closing boundary")
    if not parts:
        raise InvalidRequest("the multipart body holds no parts")
    return parts


def validate_stow(body: bytes, content_type: str | None, study_uid: str | None = None) -> list[StowInstance]:
    """Validate a STOW-RS request; return what it would store, or raise (nothing is stored)."""
    boundary = parse_content_type(content_type)
    parts = split_parts(body, boundary)
    instances: list[StowInstance] = []
    failures: list[dict[str, object]] = []
    for index, (headers, payload) in enumerate(parts):
        part_type = parse_options_header(headers.get("content-type", DICOM_MEDIA_TYPE))[0].decode("latin-1")
        if part_type.lower() != DICOM_MEDIA_TYPE:
            raise UnsupportedMediaType(
                f"part {index} has media type {part_type!r}; STOW-RS parts must be application/dicom",
                detail={"part": index},
            )
        try:
            ds = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True, force=False)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", "") or "")
            study = str(ds.get("StudyInstanceUID", "") or "")
            series = str(ds.get("SeriesInstanceUID", "") or "") or None
            patient_id = str(ds.get("PatientID", "") or "") or None
            patient_name = str(ds.get("PatientName", "") or "") or None
            accession = str(ds.get("AccessionNumber", "") or "") or None
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            failures.append({"part": index, "reason": f"not a DICOM PS3.10 file ({type(exc).__name__})"})
            continue
        missing = [
            name
            for name, value in (
                ("SOPClassUID", sop_class),
                ("SOPInstanceUID", sop_instance),
                ("StudyInstanceUID", study),
            )
            if not value or not _UID.match(value) or len(value) > 64
        ]
        if missing:
            failures.append({"part": index, "reason": f"missing or invalid {', '.join(missing)}"})
            continue
        if study_uid is not None and study != study_uid:
            failures.append(
                {"part": index, "sop_instance_uid": sop_instance, "reason": "belongs to another study than the URL's"}
            )
            continue
        instances.append(
            StowInstance(sop_class, sop_instance, study, series, patient_id, patient_name, accession)
        )
    if failures:
        raise StowPartRejected(
            f"{len(failures)} of {len(parts)} parts are not acceptable DICOM instances; nothing was stored",
            detail={"failures": failures},
        )
    return instances
