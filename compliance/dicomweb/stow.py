"""Validation of STOW-RS request bodies (DICOM PS3.18 10.5), streaming, before anything is stored.

The gateway accepts ``multipart/related; type="application/dicom"`` (PS3.18 8.6.1.2.1): every part a
PS3.10 file. A request is refused whole when any part is bad:

* not multipart/related, or a ``type`` other than application/dicom (metadata + bulk data
  representations are not accepted here) -> :class:`UnsupportedMediaType` (415);
* a part whose own Content-Type is not application/dicom -> :class:`UnsupportedMediaType` (415);
* a body that is not well-formed multipart (bad or missing boundary, truncated, no parts), or whose
  framing another parser could read differently -> :class:`InvalidRequest` (400): anything before
  the first delimiter but one CRLF, anything after the close delimiter but one CRLF, the boundary
  anywhere inside a part, a part header that frames or encodes the payload (a Content-Length that
  disagrees with the delimiter, a Content-Transfer-Encoding other than binary, Content-Encoding,
  Transfer-Encoding, Content-Range), a header given twice or holding a control character (a bare LF
  splits a header line for Orthanc, not for python-multipart), a parameter given twice, a nested
  multipart part;
* sequences nested deeper than the configured depth (``dicom_structure``) -> 400;
* a part that is not a plainly encoded DICOM PS3.10 file (``dicom_structure.StructureError``), lacks
  SOP Class/Instance or Study Instance UID, or belongs to another study than the one in the URL
  -> :class:`StowPartRejected` (409, PS3.18 Table 10.5.3-1 "none of the instances were stored"),
  with the reason per part.

What the archive receives is never the client's body: :class:`StowStreamValidator` rebuilds it from
the parts it validated, under a boundary of its own (random, never shown to the client) with one
header per part (``Content-Type: application/dicom``); the client's part headers, preamble, epilogue
and boundary stay behind. So the archive's multipart parser (Orthanc honours a part's Content-Length
and takes ``--boundary`` anywhere as a delimiter) only ever frames the gateway's own bytes.

Streaming: the validator is fed the body chunk by chunk and returns the bytes of the rebuilt body
that may go to the archive. A part is held back until its DICOM header (up to the Pixel Data) has
been walked (``dicom_structure``) and checked; after that the rest of the part flows through while
the walk goes on to its end. The close delimiter is only produced by :meth:`finish`, after a
well-formed end. Memory is bounded by the header cap per part, not by the size of the request.

A part is complete for the archive once the delimiter after it has gone out (``committed``): Orthanc
parses a STOW body every 10 MiB as it arrives and stores each complete part at once, so a request
refused later may have stored its first parts; the caller removes them (``service.DicomwebService``).

The archive's answer: :func:`parse_stow_answer` reads a DICOM JSON STOW-RS response (the gateway's
archive and the export destinations), :func:`reconcile_stow` checks it against the instances that
were sent, so that a store the archive did not (wholly) make is never passed on as stored, and
:func:`unvalidated_uids` names what the archive reports that the gateway never validated.

The multipart framing is parsed by python-multipart, media type parameters by the standard library's
``email`` package, DICOM values by pydicom; the element walk is ``dicom_structure``'s.
"""

from __future__ import annotations

import email.message
import io
import json
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from compliance import dicom_json
from compliance.dicomweb.dicom_structure import DEFAULT_MAX_DEPTH, DicomStructure, NestingTooDeep, StructureError
from compliance.errors import ComplianceError, Conflict, InvalidRequest, UnsupportedMediaType

DICOM_MEDIA_TYPE = "application/dicom"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: A part's DICOM header (everything before the Pixel Data) may not be larger than this.
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
        for item in dicom_json.items(doc, "00081199"):
            stored.update(str(v) for v in dicom_json.values(item, "00081155"))
        for item in dicom_json.items(doc, "00081198"):
            reason = dicom_json.first_value(item, "00081197")
            if reason is not None and not isinstance(reason, int | float | str):
                raise TypeError(f"failure reason {reason!r}")
            text = "no reason given" if reason is None else \
                FAILURE_REASONS.get(int(reason), f"failure reason {int(reason):04X}H")
            for v in dicom_json.values(item, "00081155"):
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


def unvalidated_uids(payload: bytes, instances: Sequence[StowInstance]) -> tuple[list[str], list[str]]:
    """SOP Instance UIDs an archive's STOW-RS answer names that are not among ``instances`` (the parts
    the gateway validated): (reported stored, reported failed). Nothing when the answer is not a
    DICOM JSON STOW-RS response."""
    try:
        answer = parse_stow_answer(payload)
    except ValueError:
        return [], []
    validated = {i.sop_instance_uid for i in instances}
    return sorted(answer.stored - validated), sorted(set(answer.failed) - validated)


# -- the request's own framing ----------------------------------------------------------------------

#: RFC 2046 5.1.1: 1-70 characters of bchars, not ending with a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
#: RFC 9110 field-name (token).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A header value: visible ASCII, Latin-1, spaces and tabs; no CR, LF, NUL or other control.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
#: Part headers that frame or encode the payload. Content-Length is accepted when it is exactly the
#: payload's length (Orthanc's own STOW-RS client writes one), Content-Transfer-Encoding when binary.
_FRAMING_HEADERS = frozenset({"content-length", "content-transfer-encoding", "content-encoding",
                              "transfer-encoding", "content-range"})


def _media_type(value: str, what: str) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of a Content-Type value; a parameter named twice, or one in RFC 2231
    form, is ambiguous (parsers keep the first or the last) and refused."""
    msg = email.message.Message()
    msg["content-type"] = value
    params = msg.get_params() or [("", "")]
    seen: dict[str, str] = {}
    for name, param in params[1:]:
        if not isinstance(param, str):
            raise InvalidRequest(f"{what} has an RFC 2231 parameter ({name}); not accepted")
        if name in seen:
            raise InvalidRequest(f"{what} gives the parameter {name!r} twice", detail={"parameter": name})
        seen[name] = param
    return str(params[0][0]).strip().lower(), seen


def stow_boundary(content_type: str | None) -> bytes:
    """The boundary of a STOW-RS request's Content-Type, or raise 415 (not multipart/related of
    application/dicom) or 400 (no boundary, an invalid one, a parameter given twice)."""
    if not content_type:
        raise UnsupportedMediaType("STOW-RS needs Content-Type: multipart/related; type=\"application/dicom\"")
    media, params = _media_type(content_type, "the request's Content-Type")
    if media != "multipart/related":
        raise UnsupportedMediaType(f"STOW-RS accepts multipart/related, not {media}",
                                   detail={"accepted": 'multipart/related; type="application/dicom"'})
    part_type = params.get("type", "").strip().lower()
    if part_type and part_type != DICOM_MEDIA_TYPE:
        raise UnsupportedMediaType(
            f"this gateway accepts STOW-RS parts of type application/dicom only, not {part_type}")
    boundary = params.get("boundary")
    if not boundary:
        raise InvalidRequest("the multipart/related Content-Type has no boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise InvalidRequest("the multipart boundary is not an RFC 2046 boundary (1-70 letters, digits and "
                             "'()+_,-./:=? )")
    return boundary.encode("ascii")


@dataclass
class _Part:
    index: int
    headers: dict[str, str] = field(default_factory=dict)
    #: the payload's bytes so far
    size: int = 0
    #: a Content-Length the part declared, which its payload must match exactly
    declared: int | None = None
    structure: DicomStructure | None = None
    #: the bytes held back until the header is checked
    prefix: bytearray = field(default_factory=bytearray)
    #: the last bytes of the payload, to find the boundary across two pieces
    tail: bytes = b""
    validated: bool = False
    failed: bool = False
    instance: StowInstance | None = None


class StowStreamValidator:
    """Incremental STOW-RS validation and rebuilding; see the module docstring.

    :meth:`feed` and :meth:`finish` return bytes of the body for the archive, whose Content-Type is
    :attr:`content_type`. :attr:`instances` are the validated parts' instances; :attr:`committed`
    those whose part the archive has received whole (it may have stored them already).
    """

    def __init__(self, content_type: str | None, study_uid: str | None = None, *,
                 header_cap: int = HEADER_CAP, max_sequence_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._boundary = stow_boundary(content_type)
        self._study_uid = study_uid
        self._header_cap = header_cap
        self._max_depth = max_sequence_depth
        self._dashes = b"--" + self._boundary
        self._close = b"\r\n--" + self._boundary + b"--"
        # what the client's body must start with: the first delimiter, after at most one CRLF
        self._starts = (self._dashes + b"\r\n", b"\r\n" + self._dashes + b"\r\n")
        self._start = bytearray()
        self._start_checked = False
        #: the body sent to the archive: a boundary of the gateway's own that the client never sees
        self.boundary = f"compliance-{secrets.token_hex(16)}"
        self.content_type = f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={self.boundary}'
        self._opening = f"--{self.boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode()
        self._out: list[bytes | bytearray | memoryview] = []
        self._emitted = 0  # parts whose opening delimiter went out
        self._part: _Part | None = None
        self._last: _Part | None = None
        self._count = 0
        self._field = bytearray()
        self._value = bytearray()
        self._ended = False
        self._ended_now = False
        self._carry = b""  # the last bytes of the input: the close delimiter may straddle two chunks
        self._epilogue = bytearray()
        self._error: ComplianceError | None = None
        self.instances: list[StowInstance] = []
        self.committed: list[StowInstance] = []
        self.failures: list[dict[str, object]] = []
        self._parser = MultipartParser(self._boundary, {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_end": self._on_end,
        })

    # -- refusing ---------------------------------------------------------------------------------
    def _refuse(self, message: str, **detail: object) -> ComplianceError:
        """A framing error: 400 for the whole request. Returns the error to raise: the first one."""
        if self._error is None:
            self._error = InvalidRequest(message, detail=dict(detail))
        if self._part is not None:
            self._part.failed = True
        return self._error

    def _reject(self, part: _Part, reason: str, **extra: object) -> None:
        """A part that is not an acceptable instance: 409 with the reason per part."""
        if not part.failed:
            self.failures.append({"part": part.index, **extra, "reason": reason})
        part.failed = True

    def _structure_failed(self, part: _Part, exc: StructureError) -> None:
        if isinstance(exc, NestingTooDeep):
            self._refuse(f"part {part.index}: {exc}; this gateway accepts at most {exc.limit} levels of "
                         f"sequence nesting", part=part.index, max_sequence_depth=exc.limit)
        else:
            self._reject(part, f"not an acceptable DICOM PS3.10 file: {exc}")
        part.failed = True

    # -- multipart callbacks ---------------------------------------------------------------------
    def _on_part_begin(self) -> None:
        self._part = _Part(index=self._count, structure=DicomStructure(self._max_depth))
        self._count += 1

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]  # a header may arrive in several pieces

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        part = self._part
        assert part is not None
        name, value = bytes(self._field), bytes(self._value)
        self._field.clear()
        self._value.clear()
        if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            self._refuse(f"part {part.index} has a header with a control character (a bare CR or LF ends a "
                         f"header line for some parsers and not for others)", part=part.index)
            return
        key = name.decode("ascii").lower()
        if key in part.headers:
            self._refuse(f"part {part.index} gives the header {key} twice", part=part.index, header=key)
            return
        part.headers[key] = value.decode("latin-1").strip(" \t")

    def _on_headers_finished(self) -> None:
        part = self._part
        assert part is not None
        if part.failed:
            return
        headers = part.headers
        for key in sorted(_FRAMING_HEADERS & headers.keys()):
            value = headers[key]
            if key == "content-length" and value.isascii() and value.isdigit() and len(value) <= 15:
                part.declared = int(value)
            elif key == "content-transfer-encoding" and value.lower() == "binary":
                pass
            else:
                self._refuse(f"part {part.index} has a {key} header ({value[:40]!r}): the gateway frames parts "
                             f"by their delimiters only", part=part.index, header=key)
                return
        try:
            media, _ = _media_type(headers.get("content-type", DICOM_MEDIA_TYPE),
                                   f"the Content-Type of part {part.index}")
        except InvalidRequest as exc:
            self._refuse(exc.message, part=part.index)
            return
        if media.startswith("multipart/"):
            self._refuse(f"part {part.index} is itself multipart ({media}); nested multipart is not accepted",
                         part=part.index)
        elif media != DICOM_MEDIA_TYPE and self._error is None:
            self._error = UnsupportedMediaType(
                f"part {part.index} has media type {media!r}; STOW-RS parts must be application/dicom",
                detail={"part": part.index},
            )
            part.failed = True

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.failed or self._error is not None or start == end:
            return
        # The boundary inside a part: Orthanc (and others) would end the part there.
        dashes = self._dashes
        if data.find(dashes, start, end) >= 0 or \
                (part.tail and dashes in part.tail + bytes(data[start : start + len(dashes) - 1])):
            self._refuse(f"part {part.index} contains its request's boundary: another parser would split it there",
                         part=part.index)
            return
        keep = len(dashes) - 1
        part.tail = bytes(data[max(start, end - keep) : end]) if end - start >= keep else \
            (part.tail + bytes(data[start:end]))[-keep:]
        part.size += end - start
        if part.declared is not None and part.size > part.declared:
            self._refuse(f"part {part.index} is longer than its Content-Length", part=part.index,
                         header="content-length")
            return
        piece = memoryview(data)[start:end]
        structure = part.structure
        assert structure is not None
        try:
            structure.feed(piece)
        except StructureError as exc:
            self._structure_failed(part, exc)
            return
        if part.validated:
            self._out.append(piece)
            return
        part.prefix += piece
        if structure.header_end is not None:
            self._check_header(part, structure.header_end)
        elif len(part.prefix) > self._header_cap:
            self._reject(part, f"its DICOM header (the data before the Pixel Data) is larger than "
                               f"{self._header_cap} bytes")
            part.prefix = bytearray()

    def _on_part_end(self) -> None:
        part = self._part
        assert part is not None
        self._part = None
        self._last = part
        if part.failed or self._error is not None:
            return
        if part.declared is not None and part.size != part.declared:
            self._part = part
            self._refuse(f"part {part.index} is {part.size} bytes long, not the {part.declared} of its "
                         f"Content-Length", part=part.index, header="content-length")
            self._part = None
            return
        structure = part.structure
        assert structure is not None
        try:
            structure.close()
        except StructureError as exc:
            self._structure_failed(part, exc)
            return
        if not part.validated:
            assert structure.header_end is not None
            self._check_header(part, structure.header_end)
        part.structure = None

    def _on_end(self) -> None:
        self._ended = self._ended_now = True

    # -- the DICOM header check -----------------------------------------------------------------
    def _check_header(self, part: _Part, header_end: int) -> None:
        """Read the identifying attributes of a part whose header the walk has passed, once."""
        if header_end > self._header_cap:
            self._reject(part, f"its DICOM header (the data before the Pixel Data) is larger than "
                               f"{self._header_cap} bytes")
            return
        try:
            ds = pydicom.dcmread(io.BytesIO(bytes(part.prefix[:header_end])), stop_before_pixels=True, force=False)
            sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", "") or "")
            study = str(ds.get("StudyInstanceUID", "") or "")
            series = str(ds.get("SeriesInstanceUID", "") or "") or None
            patient_id = str(ds.get("PatientID", "") or "") or None
            patient_name = str(ds.get("PatientName", "") or "") or None
            accession = str(ds.get("AccessionNumber", "") or "") or None
        except RecursionError:  # the walk bounds the depth; should pydicom ever disagree, refuse still
            self._structure_failed(part, NestingTooDeep(self._max_depth + 1, self._max_depth, header_end))
            return
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on a client's bytes is a refusal
            self._reject(part, f"not a DICOM PS3.10 file ({type(exc).__name__})")
            return
        missing = [
            name
            for name, value in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_instance),
                                ("StudyInstanceUID", study))
            if not value or not _UID.fullmatch(value) or len(value) > 64
        ]
        if missing:
            self._reject(part, f"missing or invalid {', '.join(missing)}")
            return
        if self._study_uid is not None and study != self._study_uid:
            self._reject(part, "belongs to another study than the URL's", sop_instance_uid=sop_instance)
            return
        part.validated = True
        part.instance = StowInstance(sop_class, sop_instance, study, series, patient_id, patient_name, accession)
        self.instances.append(part.instance)
        # The part goes out under the gateway's own delimiter; the one before it completes the part
        # before, which the archive may now store.
        if self._emitted:
            self._out.append(b"\r\n" + self._opening)
            self._commit_previous()
        else:
            self._out.append(self._opening)
        self._emitted += 1
        self._out.append(part.prefix)
        part.prefix = bytearray()

    def _commit_previous(self) -> None:
        done = len(self.committed)
        if done < len(self.instances) - 1:
            self.committed.append(self.instances[done])

    # -- feeding --------------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self.failures:
            raise StowPartRejected(
                f"part {self.failures[0]['part']} is not an acceptable DICOM instance; nothing was stored",
                detail={"failures": self.failures},
            )

    def _check_start(self, chunk: bytes) -> None:
        """Nothing before the first delimiter but one CRLF (a preamble is read differently by parsers)."""
        want = len(self._starts[1])
        self._start += chunk[: want - len(self._start)]
        if not any(s.startswith(bytes(self._start)) or bytes(self._start).startswith(s) for s in self._starts):
            raise self._refuse("the body must begin with its first delimiter: nothing may come before the "
                               "first boundary (a preamble)")
        if len(self._start) >= want:
            self._start_checked = True

    def _check_epilogue(self, extra: bytes) -> None:
        """Nothing after the close delimiter but one CRLF: another parser could read a part there."""
        self._epilogue += extra[:3]
        if not b"\r\n".startswith(bytes(self._epilogue)):
            raise self._refuse("bytes after the close delimiter (an epilogue) are not accepted: another parser "
                               "could read a part there")

    def feed(self, chunk: bytes) -> bytes:
        """Consume a chunk; return the bytes of the archive's body now ready (possibly empty)."""
        if not chunk:
            return b""
        if self._ended:
            self._check_epilogue(chunk)
            return b""
        if not self._start_checked:
            self._check_start(chunk)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
        self._raise_if_failed()
        if self._ended_now:
            self._ended_now = False
            window = self._carry + chunk
            at = window.find(self._close)
            if at < 0:
                raise InvalidRequest("the multipart body is malformed: its close delimiter was not found")
            self._check_epilogue(window[at + len(self._close) :])
        keep = len(self._close) - 1
        self._carry = chunk[-keep:] if len(chunk) >= keep else (self._carry + chunk)[-keep:]
        return self._flush()

    def finish(self) -> bytes:
        """The body ended: check it was complete and valid, and return the rest of the archive's body."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
        self._raise_if_failed()
        if not self._ended:
            raise InvalidRequest("the multipart body is truncated: no closing boundary")
        if bytes(self._epilogue) not in (b"", b"\r\n"):
            raise self._refuse("bytes after the close delimiter (an epilogue) are not accepted")
        if not self.instances:
            raise InvalidRequest("the multipart body holds no parts")
        self._out.append(b"\r\n--" + self.boundary.encode() + b"--\r\n")
        self.committed = list(self.instances)
        return self._flush()

    @property
    def forwarded(self) -> bool:
        """Whether any part's bytes have gone (or were about to go) to the archive."""
        return self._emitted > 0

    def abandon(self) -> bytes:
        """The last bytes of an archive's body the gateway refuses after parts of it went out.

        Aborting the upload instead would leave the archive storing, after the gateway gave up, the
        parts it had received whole (Orthanc stores each as soon as it parses it). These bytes end the
        body with a close delimiter that has no CRLF before it, so the part they end is malformed:
        Orthanc's multipart reader stores no part past the last committed one (checked against
        Orthanc 1.10 / DICOMweb 1.7), answers once it has finished, and the caller then removes what
        the archive stored (:attr:`committed`, or any validated instance, to be safe)."""
        self._out.clear()
        return b"!!--" + self.boundary.encode() + b"--\r\n"

    def _flush(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out


def validate_stow(body: bytes, content_type: str | None, study_uid: str | None = None, *,
                  max_sequence_depth: int = DEFAULT_MAX_DEPTH) -> list[StowInstance]:
    """Validate a whole STOW-RS body at once; return what it would store, or raise."""
    validator = StowStreamValidator(content_type, study_uid, max_sequence_depth=max_sequence_depth)
    validator.feed(body)
    validator.finish()
    return validator.instances
