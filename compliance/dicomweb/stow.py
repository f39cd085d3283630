"""Validation of STOW-RS request bodies (DICOM PS3.18 10.5), streaming, before anything is stored.

The gateway accepts ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2.1): every part a
PS3.10 file. A request is refused whole when any part is bad, so a bad request changes nothing:

* not multipart/related, or a ``type`` other than application/dicom (metadata + bulk data
  representations are not accepted here) -> :class:`UnsupportedMediaType` (415);
* a part whose own Content-Type is not application/dicom -> :class:`UnsupportedMediaType` (415);
* a body that is not well-formed multipart (bad or missing boundary, truncated, no parts)
  -> :class:`InvalidRequest` (400);
* a part that is not a DICOM PS3.10 file, lacks SOP Class/Instance or Study Instance UID, or belongs
  to another study than the one in the URL -> :class:`StowPartRejected` (409, PS3.18 Table 10.5.3-1
  "none of the instances were stored"), with the reason per part.

Streaming: :class:`StowStreamValidator` is fed the body chunk by chunk and returns the bytes that
are safe to forward to the archive. A part's bytes are held back until its DICOM header (preamble,
file meta, the identifying attributes before Pixel Data) has been read and checked; after that the
rest of the part flows through. The last bytes of the body (at least the closing delimiter) are
always withheld until :meth:`StowStreamValidator.finish` has seen a well-formed end and every part
validated. The archive (Orthanc) processes a request only once its body is complete, so when
validation fails the gateway aborts the upload and the archive stores nothing. Memory is bounded by
the header cap per part, not by the size of the request.

The archive's answer: :func:`parse_stow_answer` reads a DICOM JSON STOW-RS response (the gateway's
archive and the export destinations), and :func:`reconcile_stow` checks it against the instances
that were sent, so that a store the archive did not (wholly) make is never passed on as stored.

The multipart framing is parsed by python-multipart; DICOM parsing is pydicom's.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from compliance.errors import ComplianceError, Conflict, InvalidRequest, UnsupportedMediaType

DICOM_MEDIA_TYPE = "application/dicom"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: Try to read a part's DICOM header after this many bytes, then after each doubling, up to the cap.
HEADER_FIRST_TRY = 64 * 1024
HEADER_CAP = 16 * 1024 * 1024


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


def multipart_related(parts: Sequence[bytes], media_type: str = "application/dicom") -> tuple[bytes, str]:
    """A PS3.18 multipart/related body and its Content-Type (STOW-RS requests the gateway sends)."""
    boundary = f"compliance-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{media_type}"; boundary={boundary}'


#: Failure Reason (0008,1197) values a STOW-RS response (PS3.18 10.5.3) may give, as words: the
#: storage statuses of PS3.4 Annex B and the general statuses of PS3.7 Annex C.
FAILURE_REASONS = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                   0xC000: "cannot understand", 0xC122: "referenced transfer syntax not supported",
                   0x0110: "processing failure", 0x0122: "referenced SOP class not supported",
                   0x0111: "duplicate SOP instance", 0xC123: "SOP instance already exists"}
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class StowAnswer:
    """What a STOW-RS response body (PS3.18 10.5.3) says about each instance it names."""

    stored: frozenset[str]
    #: SOP Instance UID -> the failure reason in words
    failed: dict[str, str]
    #: the response dataset as parsed (the item, when a server answered a one-element array)
    document: dict[str, Any]


def parse_stow_answer(body: bytes) -> StowAnswer:
    """Read the Referenced SOP Sequence (0008,1199) and Failed SOP Sequence (0008,1198) of a DICOM
    JSON STOW-RS response. Raises ``ValueError`` when the body is not such a document."""
    try:
        doc = json.loads(body) if body else {}
        if isinstance(doc, list):  # some servers answer a one-element array
            doc = doc[0] if doc else {}
        if not isinstance(doc, dict):
            raise TypeError(type(doc).__name__)
        stored: set[str] = set()
        failed: dict[str, str] = {}
        for item in (doc.get("00081199") or {}).get("Value") or []:
            stored.update(str(v) for v in (item.get("00081155") or {}).get("Value") or [])
        for item in (doc.get("00081198") or {}).get("Value") or []:
            reason = ((item.get("00081197") or {}).get("Value") or [None])[0]
            text = "no reason given" if reason is None else \
                FAILURE_REASONS.get(int(reason), f"failure reason {int(reason):04X}H")
            for v in (item.get("00081155") or {}).get("Value") or []:
                failed[str(v)] = text
    except (ValueError, AttributeError, TypeError, IndexError) as exc:
        raise ValueError("not a DICOM JSON STOW-RS response") from exc
    return StowAnswer(frozenset(stored - failed.keys()), failed, doc)


def reconcile_stow(status: int, payload: bytes,
                   instances: list[StowInstance]) -> tuple[int, bytes, dict[str, str]] | None:
    """Check the archive's STOW-RS answer against the instances sent; ``None`` when it stored them all.

    Orthanc's DICOMweb plugin answers 200 even when it stored nothing: an instance its storage
    refused is missing from both the Referenced and the Failed SOP Sequence. The client, and the
    audit trail, must not be told it was stored. Otherwise: the PS3.18 Table 10.5.3-1 status (202
    when some were stored, 409 when none were), the answer with a Failed SOP Sequence item
    (Processing failure) for each instance the archive did not acknowledge, and the reasons by SOP
    Instance UID. An answer that is not a DICOM JSON STOW response is passed on as it came.
    """
    if status not in (200, 202) or not instances:
        return None
    try:
        answer = parse_stow_answer(payload)
    except ValueError:
        return None
    doc = answer.document
    not_stored = {i.sop_instance_uid: answer.failed.get(i.sop_instance_uid, "not acknowledged by the archive")
                  for i in instances if i.sop_instance_uid not in answer.stored}
    if not not_stored:
        return None
    failed_seq = doc.setdefault("00081198", {"vr": "SQ"})
    items = failed_seq.setdefault("Value", [])
    for inst in instances:
        if inst.sop_instance_uid in not_stored and inst.sop_instance_uid not in answer.failed:
            items.append({"00081150": {"vr": "UI", "Value": [inst.sop_class_uid]},
                          "00081155": {"vr": "UI", "Value": [inst.sop_instance_uid]},
                          "00081197": {"vr": "US", "Value": [PROCESSING_FAILURE]}})
    new_status = 409 if len(not_stored) == len(instances) else 202
    return new_status, json.dumps(doc).encode(), not_stored


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
    """Split a complete multipart body into (headers, payload) without copying payloads."""
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

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
    if not state["ended"]:
        raise InvalidRequest("the multipart body is truncated: no closing boundary")
    if not parts:
        raise InvalidRequest("the multipart body holds no parts")
    return parts


@dataclass
class _Part:
    index: int
    headers: dict[str, str] = field(default_factory=dict)
    data_start: int | None = None
    prefix: bytearray = field(default_factory=bytearray)
    next_try: int = HEADER_FIRST_TRY
    validated: bool = False


class StowStreamValidator:
    """Incremental STOW-RS validation; see the module docstring for the forwarding rule."""

    def __init__(self, content_type: str | None, study_uid: str | None = None, *,
                 header_cap: int = HEADER_CAP) -> None:
        self._boundary = parse_content_type(content_type)
        self._study_uid = study_uid
        self._header_cap = header_cap
        # Never forward the last bytes before finish(): the closing delimiter is within them.
        self._reserve = len(self._boundary) + 16
        self._received = 0  # bytes fed so far
        self._released = 0  # bytes handed back for forwarding so far
        self._held = bytearray()  # received but not yet released: [_released, _received)
        self._part: _Part | None = None
        self._ended = False
        self._count = 0
        self._base = 0
        self._field = ""
        self._error: ComplianceError | None = None
        self.instances: list[StowInstance] = []
        self.failures: list[dict[str, object]] = []
        self._parser = MultipartParser(self._boundary, {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data, "on_part_end": self._on_part_end, "on_end": self._on_end,
        })

    # -- multipart callbacks ---------------------------------------------------------------------
    def _on_part_begin(self) -> None:
        self._part = _Part(index=self._count)
        self._count += 1

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field = bytes(data[start:end]).decode("latin-1").lower()

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.headers[self._field] = bytes(data[start:end]).decode("latin-1").strip()

    def _on_headers_finished(self) -> None:
        assert self._part is not None
        ctype = self._part.headers.get("content-type", DICOM_MEDIA_TYPE)
        media = parse_options_header(ctype)[0].decode("latin-1").lower()
        if media != DICOM_MEDIA_TYPE and self._error is None:
            self._error = UnsupportedMediaType(
                f"part {self._part.index} has media type {media!r}; STOW-RS parts must be application/dicom",
                detail={"part": self._part.index},
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.data_start is None:
            part.data_start = self._base + start
        if part.validated:
            return
        room = self._header_cap - len(part.prefix)
        part.prefix += data[start : start + max(0, min(room, end - start))]
        if len(part.prefix) >= part.next_try:
            self._try_header(part, complete=False)
            part.next_try *= 2

    def _on_part_end(self) -> None:
        part = self._part
        assert part is not None
        if not part.validated:
            self._try_header(part, complete=True)
            if not part.validated and not any(f["part"] == part.index for f in self.failures):
                self.failures.append({"part": part.index, "reason": "not a DICOM PS3.10 file"})
        part.prefix = bytearray()
        self._part = None

    def _on_end(self) -> None:
        self._ended = True

    # -- the DICOM header check -----------------------------------------------------------------
    def _try_header(self, part: _Part, *, complete: bool) -> None:
        try:
            ds = pydicom.dcmread(io.BytesIO(bytes(part.prefix)), stop_before_pixels=True, force=False)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", "") or "")
            study = str(ds.get("StudyInstanceUID", "") or "")
            series = str(ds.get("SeriesInstanceUID", "") or "") or None
            patient_id = str(ds.get("PatientID", "") or "") or None
            patient_name = str(ds.get("PatientName", "") or "") or None
            accession = str(ds.get("AccessionNumber", "") or "") or None
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError, OSError,
                IndexError, OverflowError) as exc:
            if complete or len(part.prefix) >= self._header_cap:
                self.failures.append({"part": part.index, "reason": f"not a DICOM PS3.10 file ({type(exc).__name__})"})
                part.validated = False
                part.next_try = 1 << 62
            return
        missing = [
            name
            for name, value in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_instance),
                                ("StudyInstanceUID", study))
            if not value or not _UID.match(value) or len(value) > 64
        ]
        if missing:
            if complete or len(part.prefix) >= self._header_cap:
                self.failures.append({"part": part.index, "reason": f"missing or invalid {', '.join(missing)}"})
                part.next_try = 1 << 62
            return  # the attributes may still be ahead in the stream
        if self._study_uid is not None and study != self._study_uid:
            self.failures.append({"part": part.index, "sop_instance_uid": sop_instance,
                                  "reason": "belongs to another study than the URL's"})
            part.next_try = 1 << 62
            return
        part.validated = True
        self.instances.append(StowInstance(sop_class, sop_instance, study, series, patient_id, patient_name,
                                           accession))

    # -- feeding --------------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self.failures:
            raise StowPartRejected(
                f"part {self.failures[0]['part']} is not an acceptable DICOM instance; nothing was stored",
                detail={"failures": self.failures},
            )

    def feed(self, chunk: bytes) -> bytes:
        """Consume a chunk; return the bytes now safe to forward (possibly empty). Raises when invalid."""
        if not chunk:
            return b""
        self._base = self._received
        self._held += chunk
        self._received += len(chunk)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
        self._raise_if_failed()
        safe = self._received - self._reserve
        part = self._part
        if part is not None and not part.validated and part.data_start is not None:
            safe = min(safe, part.data_start)
        return self._release(safe)

    def finish(self) -> bytes:
        """The body ended: check it was complete and valid, and return the withheld rest."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
        self._raise_if_failed()
        if not self._ended:
            raise InvalidRequest("the multipart body is truncated: no closing boundary")
        if not self.instances:
            raise InvalidRequest("the multipart body holds no parts")
        return self._release(self._received)

    def _release(self, upto: int) -> bytes:
        if upto <= self._released:
            return b""
        n = upto - self._released
        out = bytes(self._held[:n])
        del self._held[:n]
        self._released = upto
        return out


def validate_stow(body: bytes, content_type: str | None, study_uid: str | None = None) -> list[StowInstance]:
    """Validate a whole STOW-RS body at once; return what it would store, or raise."""
    validator = StowStreamValidator(content_type, study_uid)
    validator.feed(body)
    validator.finish()
    return validator.instances
