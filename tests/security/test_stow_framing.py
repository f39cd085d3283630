"""STOW-RS bodies that the gateway and the archive could frame differently (issue 12, items 1 and 10).

The gateway validates and audits the instances of a STOW-RS request; Orthanc then stores what *it*
finds in the body. Wherever the two parsers could disagree (a part's own Content-Length, a header
line ended by a bare LF, a delimiter without its CRLF, bytes after the close delimiter), a hostile
technologist could hide an instance the gateway never saw. The gateway now sends the archive a body
it builds itself from the parts it validated, and refuses ambiguous framing outright: 400 with a JSON
body, a failed 110107 (DICOM Instances Transferred) event, nothing stored.

Item 10: sequences nested deeper than ``COMPLIANCE_STOW_MAX_SEQUENCE_DEPTH`` are refused the same way
(they raised RecursionError in pydicom: a 500 and no audit event).

Every test runs against the real stack: the answer, the document in Elasticsearch, and Orthanc's own
REST API (``/tools/lookup``) for what the archive holds. The gateway here is the module's own (a
64 MiB STOW limit, so that bodies larger than Orthanc's 10 MiB parse block fit; its own audit index).
"""

from __future__ import annotations

import io
import struct
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from compliance.demo import synthetic_instance
from tests.integration.conftest import (
    AuditIndex,
    Gateway,
    Stack,
    delete_study,
    drop_prefix,
    dump,
    own_database,
    start_gateway,
    stop_gateway,
)
from tests.integration.dicom_samples import Sample, unique_instance
from tests.security.conftest import bearer, orthanc_has_instance

pytestmark = pytest.mark.integration

DEPTH_LIMIT = 32  # the default of COMPLIANCE_STOW_MAX_SEQUENCE_DEPTH


@pytest.fixture(scope="module")
def gw(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp: Path = tmp_path_factory.mktemp("stow-framing")
    prefix = f"test-stow-framing-{uuid.uuid4().hex[:10]}"
    with own_database(stack, tmp, "stow-framing") as db:
        gateway = start_gateway(stack, tmp, database_url=db, index_prefix=prefix,
                                extra_env={"COMPLIANCE_STOW_MAX_BYTES": str(64 * 1024 * 1024)})
        try:
            yield gateway
        finally:
            stop_gateway(gateway)
            drop_prefix(stack, prefix)


@pytest.fixture(scope="module")
def trail(stack: Stack, gw: Gateway) -> AuditIndex:
    return AuditIndex(stack.es_url, gw.index_prefix)


def post(gw: Gateway, token: str, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/dicom-web/studies", content=body, timeout=120,
                      headers={**bearer(token), "Content-Type": content_type, "Accept": "application/dicom+json"})


def refusals_since(trail: AuditIndex, since: datetime, *, within: float = 60.0) -> list[dict]:
    """tom's failed 110107 events recorded after ``since`` (waits for the first one to be shipped)."""
    deadline = time.monotonic() + within
    while True:
        docs = [d for d in trail.wait_for(1, within=5, **{"event.id": "110107", "user.name": "tom",
                                                             "event.outcome": "8"})
                if datetime.fromisoformat(d["@timestamp"].replace("Z", "+00:00")) >= since]
        if docs or time.monotonic() > deadline:
            return docs
        time.sleep(0.5)


def assert_refused_and_audited(r: httpx.Response, trail: AuditIndex, since: datetime, reason: str,
                               status: int = 400) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.json()["error"] in ("invalid_request", "stow_part_rejected"), r.text
    docs = refusals_since(trail, since)
    assert docs, "no failed 110107 event was recorded"
    described = " ".join(d.get("event.outcome_description") or "" for d in docs)
    assert reason.lower() in described.lower(), dump(docs)


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def unpadded_instance(**kwargs: str) -> Sample:
    """A unique CT without pydicom's sample's Data Set Trailing Padding (FFFC,FFFC): elements can follow."""
    s = unique_instance(**kwargs)
    ds = pydicom.dcmread(io.BytesIO(s.data))
    del ds[0xFFFCFFFC]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Sample(buf.getvalue(), s.patient_id, s.patient_name, s.study_uid, s.series_uid, s.sop_instance_uid)


# -- item 1: smuggling an instance past the gateway -------------------------------------------------

PART = b"Content-Type: application/dicom\r\n"


def with_trailing_padding(data: bytes, length: int) -> bytes:
    """``data`` followed by the header of a Data Set Trailing Padding (FFFC,FFFC) element of ``length``
    bytes, whose value is whatever follows in the body: a file DCMTK reads whole."""
    return data + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, length)


def smuggle_past_the_close_delimiter(visible: bytes, hidden: bytes, *, padded: bool) -> tuple[bytes, str]:
    """The attack of issue 12 item 1: the first part declares a Content-Length reaching past the close
    delimiter the gateway stops at; Orthanc reads that many bytes, then a second part: ``hidden``."""
    b = b"smuggle" + uuid.uuid4().hex.encode()
    close = b"\r\n--" + b + b"--\r\n"
    if padded:  # the first part stays a valid DICOM file for Orthanc: the close delimiter is padding
        swallowed = close + b"\x00" * (len(close) % 2)
        first = with_trailing_padding(visible, len(swallowed))
        declared = len(first) + len(swallowed)
        tail = swallowed[len(close):]
    else:
        first, tail = visible, b""
        declared = len(first) + len(close)
    body = (b"--" + b + b"\r\n" + PART + b"Content-Length: %d\r\n\r\n" % declared + first + close + tail
            + b"\r\n--" + b + b"\r\n" + PART + b"\r\n" + hidden + close)
    return body, f'multipart/related; type="application/dicom"; boundary={b.decode()}'


def smuggle_with_a_bare_delimiter(visible: bytes, hidden: bytes) -> tuple[bytes, str]:
    """No framing header at all: Orthanc takes ``--boundary`` anywhere as a delimiter (and drops the two
    bytes before it as the CRLF); the gateway's parser only after a CRLF. The gateway sees one part."""
    b = b"bare" + uuid.uuid4().hex.encode()
    body = (b"--" + b + b"\r\n" + PART + b"\r\n" + visible + b"xx--" + b + b"\r\n" + PART + b"\r\n" + hidden
            + b"\r\n--" + b + b"--\r\n")
    return body, f'multipart/related; type="application/dicom"; boundary={b.decode()}'


def smuggle_with_a_bare_lf_header(visible: bytes, hidden: bytes) -> tuple[bytes, str]:
    """A Content-Length hidden in a header value behind a bare LF: Orthanc splits header lines at LF."""
    b = b"lf" + uuid.uuid4().hex.encode()
    close = b"\r\n--" + b + b"--\r\n"
    swallowed = close + b"\x00" * (len(close) % 2)
    first = with_trailing_padding(visible, len(swallowed))
    body = (b"--" + b + b"\r\nContent-Length: %d\nContent-Type: application/dicom\r\n\r\n"
            % (len(first) + len(swallowed)) + first + swallowed
            + b"\r\n--" + b + b"\r\n" + PART + b"\r\n" + hidden + close)
    return body, f'multipart/related; type="application/dicom"; boundary={b.decode()}'


SMUGGLES = {
    "content-length past the close delimiter (the reported attack)":
        lambda v, h: smuggle_past_the_close_delimiter(v, h, padded=False),
    "content-length past the close delimiter, first part padded to stay valid":
        lambda v, h: smuggle_past_the_close_delimiter(v, h, padded=True),
    "delimiter without its CRLF inside a part": smuggle_with_a_bare_delimiter,
    "content-length behind a bare LF in a header value": smuggle_with_a_bare_lf_header,
}


@pytest.mark.parametrize("attack", list(SMUGGLES), ids=list(SMUGGLES))
def test_a_hidden_instance_of_another_patient_is_never_stored(gw, tokens, stack, trail, attack):
    mine = unpadded_instance()
    other = unique_instance(patient_id=f"VICTIM-{uuid.uuid4().hex[:8]}", patient_name="Other^Patient")
    body, content_type = SMUGGLES[attack](mine.data, other.data)
    since = now()
    try:
        r = post(gw, tokens["tom"], body, content_type)
        hidden_stored = orthanc_has_instance(stack, other.sop_instance_uid)
        visible_stored = orthanc_has_instance(stack, mine.sop_instance_uid)
        assert not hidden_stored, f"the archive holds the smuggled instance (gateway answered {r.status_code})"
        assert not visible_stored, "a refused request stored its visible instance"
        assert_refused_and_audited(r, trail, since, "refused by the gateway")
    finally:
        delete_study(stack, other.study_uid)
        delete_study(stack, mine.study_uid)


def framed(parts: list[tuple[bytes, bytes]], boundary: bytes, *, preamble: bytes = b"", epilogue: bytes = b"\r\n"
           ) -> bytes:
    """A multipart body of (part headers, payload) pairs, written by hand."""
    out = [preamble]
    for headers, payload in parts:
        out += [b"--" + boundary + b"\r\n", headers, b"\r\n", payload, b"\r\n"]
    out[-1] = b"\r\n--" + boundary + b"--" + epilogue
    return b"".join(out)


def ambiguous(kind: str, a: Sample, b: Sample) -> tuple[bytes, str, str]:
    """(body, content type, a word the refusal names) of an ambiguously framed request."""
    bd = b"amb" + uuid.uuid4().hex.encode()
    ct = f'multipart/related; type="application/dicom"; boundary={bd.decode()}'
    if kind == "content-length shorter than the part":
        return framed([(PART + b"Content-Length: 100\r\n", a.data)], bd), ct, "content-length"
    if kind == "content-length one byte longer":
        return framed([(PART + b"Content-Length: %d\r\n" % (len(a.data) + 1), a.data)], bd), ct, "content-length"
    if kind == "content-transfer-encoding base64":
        return framed([(PART + b"Content-Transfer-Encoding: base64\r\n", a.data)], bd), ct, "transfer-encoding"
    if kind == "two content-type headers":
        return framed([(PART + b"Content-Type: text/plain\r\n", a.data)], bd), ct, "twice"
    if kind == "a second part after the close delimiter":
        return (framed([(PART, a.data)], bd, epilogue=b"\r\n--" + bd + b"\r\n" + PART + b"\r\n" + b.data
                       + b"\r\n--" + bd + b"--\r\n"), ct, "after the close delimiter")
    if kind == "a preamble":
        return framed([(PART, a.data)], bd, preamble=b"this is a preamble\r\n"), ct, "before the first"
    if kind == "two boundary parameters":
        return (framed([(PART, a.data), (PART, b.data)], bd),
                f'multipart/related; type="application/dicom"; boundary={bd.decode()}; boundary=other', "boundary")
    if kind == "the boundary inside a part":
        return framed([(PART, a.data + b"\r\n--" + bd + b"x\r\n" + b.data)], bd), ct, "boundary"
    if kind == "a nested multipart part":
        inner = b"in" + uuid.uuid4().hex.encode()
        nested = framed([(PART, b.data)], inner)
        return (framed([(PART, a.data), (b"Content-Type: multipart/related; boundary=" + inner + b"\r\n", nested)],
                       bd), ct, "multipart")
    raise AssertionError(kind)


AMBIGUOUS = ["content-length shorter than the part", "content-length one byte longer",
             "content-transfer-encoding base64", "two content-type headers",
             "a second part after the close delimiter", "a preamble", "two boundary parameters",
             "the boundary inside a part", "a nested multipart part"]


@pytest.mark.parametrize("kind", AMBIGUOUS)
def test_ambiguous_framing_is_refused_with_400_and_stores_nothing(gw, tokens, stack, trail, kind):
    a, b = unique_instance(), unique_instance()
    body, content_type, reason = ambiguous(kind, a, b)
    since = now()
    try:
        r = post(gw, tokens["tom"], body, content_type)
        assert not orthanc_has_instance(stack, a.sop_instance_uid), r.text
        assert not orthanc_has_instance(stack, b.sop_instance_uid), r.text
        assert_refused_and_audited(r, trail, since, reason)
    finally:
        delete_study(stack, a.study_uid)
        delete_study(stack, b.study_uid)


def test_a_part_content_length_that_agrees_with_the_delimiter_is_accepted(gw, tokens, stack):
    """Orthanc's own STOW-RS client writes a Content-Length in each part: consistent framing is fine."""
    a = unique_instance()
    bd = b"ok" + uuid.uuid4().hex.encode()
    body = framed([(PART + b"Content-Length: %d\r\n" % len(a.data), a.data)], bd, epilogue=b"")
    try:
        r = post(gw, tokens["tom"], body, f'multipart/related; type="application/dicom"; boundary={bd.decode()}')
        assert r.status_code == 200, r.text
        assert orthanc_has_instance(stack, a.sop_instance_uid)
    finally:
        delete_study(stack, a.study_uid)


def test_a_refused_request_stores_nothing_even_past_the_archives_parse_block(gw, tokens, stack, trail):
    """Orthanc parses a STOW body every 10 MiB as it arrives and stores each complete part at once.
    Two valid 6 MiB instances then a bad part: the request is refused (409), and neither valid
    instance may stay in the archive."""
    patients = [f"BLOCK-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    firsts = [synthetic_instance(frames=12, patient_id=patient) for patient in patients]
    from compliance.dicomweb.stow import multipart_related

    body, content_type = multipart_related([firsts[0][0], firsts[1][0], b"MZ this is not a DICOM file" * 40])
    since = now()
    try:
        r = post(gw, tokens["tom"], body, content_type)
        assert r.status_code == 409, r.text
        for _, _, _, sop in firsts:
            assert not orthanc_has_instance(stack, sop), "a refused request left an instance in the archive"
        docs = refusals_since(trail, since)
        assert docs, "no failed 110107 event"
        # the event says what the archive had stored and that it was removed, and names its patient
        assert any("1 removed" in (d.get("event.outcome_description") or "") for d in docs), dump(docs)
        assert any(patients[0] in (d.get("patient.ids") or []) for d in docs), dump(docs)
    finally:
        for _, study, _, _ in firsts:
            delete_study(stack, study)


# -- item 10: nesting -------------------------------------------------------------------------------

def _explicit_sq(tag: int, length: int) -> bytes:
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, length)


def nested(depth: int, *, undefined: bool = True, tag: int = 0x0040A730) -> bytes:
    """An explicit VR little endian SQ element nested ``depth`` levels deep (each item holds the next)."""
    if undefined:
        opening = (_explicit_sq(tag, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
        closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return opening * depth + closing * depth
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = _explicit_sq(tag, len(item)) + item
    return inner


def sr_instance(depth: int, *, undefined: bool = True) -> tuple[bytes, str, str]:
    """A Basic Text SR instance whose Content Sequence (0040,A730) is nested ``depth`` levels deep:
    (file bytes, study UID, SOP Instance UID). Written by hand past the top-level attributes,
    which pydicom writes (its writer recurses too)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.11")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = f"NEST-{uuid.uuid4().hex[:8]}", "Nested^Sequence", "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue() + nested(depth, undefined=undefined), ds.StudyInstanceUID, ds.SOPInstanceUID


def after_pixel_data(depth: int) -> tuple[bytes, str, str]:
    """A CT whose Digital Signatures Sequence (FFFA,FFFA), after the pixel data, nests ``depth`` levels:
    the gateway's header check (pydicom, up to the pixel data) never read it before."""
    s = unpadded_instance()
    return s.data + nested(depth, tag=0xFFFAFFFA), s.study_uid, s.sop_instance_uid


NESTINGS = {
    "10000 undefined-length levels": lambda: sr_instance(10_000),
    "10000 defined-length levels": lambda: sr_instance(10_000, undefined=False),
    "one level over the limit": lambda: sr_instance(DEPTH_LIMIT + 1),
    "over the limit after the pixel data": lambda: after_pixel_data(DEPTH_LIMIT + 8),
}


@pytest.mark.parametrize("shape", list(NESTINGS), ids=list(NESTINGS))
def test_sequences_nested_too_deep_are_refused_with_400_and_audited(gw, tokens, stack, trail, shape):
    from compliance.dicomweb.stow import multipart_related

    if shape == "10000 defined-length levels":
        # pydicom never parsed these (defined-length sequences are read lazily), so the old gateway passed
        # them on, and 10000 levels crashed Orthanc 1.10.1 (DCMTK: segfault in libdcmdata, seen once on
        # the shared stack). Never send them to a gateway that lets a few levels too many through.
        probe, probe_study, _ = sr_instance(DEPTH_LIMIT + 8, undefined=False)
        probe_body, probe_type = multipart_related([probe])
        try:
            refused = post(gw, tokens["tom"], probe_body, probe_type).status_code == 400
        finally:
            delete_study(stack, probe_study)
        if not refused:
            pytest.fail("defined-length nesting over the limit is not refused: not sending 10000 levels, which "
                        "would crash the shared archive")
    data, study, sop = NESTINGS[shape]()
    body, content_type = multipart_related([data])
    since = now()
    try:
        r = post(gw, tokens["tom"], body, content_type)
        assert not orthanc_has_instance(stack, sop), f"the archive holds it (gateway answered {r.status_code})"
        assert_refused_and_audited(r, trail, since, "nested")
        assert r.json()["detail"]["max_sequence_depth"] == DEPTH_LIMIT
    finally:
        delete_study(stack, study)


def test_sequences_nested_within_the_limit_are_stored(gw, tokens, stack):
    from compliance.dicomweb.stow import multipart_related

    data, study, sop = sr_instance(DEPTH_LIMIT)
    body, content_type = multipart_related([data])
    try:
        r = post(gw, tokens["tom"], body, content_type)
        assert r.status_code == 200, r.text
        assert orthanc_has_instance(stack, sop)
    finally:
        delete_study(stack, study)
