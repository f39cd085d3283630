"""STOW-RS framing and structure (issue 12 items 1 and 10), pure logic: the rebuilt body, the framing the
gateway refuses, the element walk (dicom_structure), and what the service does with an archive that
stored more than, or something else than, what the gateway validated.

The same attacks against the real stack: tests/security/test_stow_framing.py.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from compliance.audit.atna import AuditSource
from compliance.audit.codes import Outcome
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.auth.interfaces import Principal
from compliance.dicomweb.dicom_structure import DicomStructure, NestingTooDeep, StructureError
from compliance.dicomweb.interfaces import RequestContext
from compliance.dicomweb.orthanc import OrthancArchive
from compliance.dicomweb.routing import PERMISSIONS, Transaction, classify
from compliance.dicomweb.service import DicomwebService
from compliance.dicomweb.stow import (
    StowPartRejected,
    StowStreamValidator,
    multipart_related,
    split_parts,
    stow_boundary,
    unvalidated_uids,
    validate_stow,
)
from compliance.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from compliance.policy.rbac import RbacPolicy

B = b"b0undary"
CT_TYPE = f'multipart/related; type="application/dicom"; boundary={B.decode()}'
PART = b"Content-Type: application/dicom\r\n"


def instance(*, patient: str = "PAT-1", transfer_syntax=ExplicitVRLittleEndian, extra: bytes = b"",
             pixels: bool = False) -> tuple[str, bytes]:
    """(SOP Instance UID, a small PS3.10 file) with ``extra`` raw elements appended after the rest."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = patient, "Test^Patient", "OT"
    if pixels:
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = b"\x01" * 64
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ds.SOPInstanceUID, buf.getvalue() + extra


def body(*payloads: bytes, headers: bytes = PART, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    out = [preamble]
    for p in payloads:
        out += [b"--" + B + b"\r\n", headers, b"\r\n", p, b"\r\n"]
    out[-1] = b"\r\n--" + B + b"--" + epilogue
    return b"".join(out)


def feed(validator: StowStreamValidator, data: bytes, size: int) -> bytes:
    out = bytearray()
    for i in range(0, len(data), size):
        out += validator.feed(data[i : i + size])
    return bytes(out) + validator.finish()


# -- the rebuilt body ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 64, 4096, 10**9])
def test_the_archive_gets_only_the_validated_payloads_under_the_gateways_own_framing(chunk):
    (_, a), (_, b) = instance(), instance(pixels=True)
    client = body(a, b, headers=PART + b"Content-ID: <x@y>\r\nContent-Description: scan\r\n")
    v = StowStreamValidator(CT_TYPE)
    rebuilt = feed(v, client, chunk)
    assert B not in rebuilt and b"Content-ID" not in rebuilt and b"scan" not in rebuilt
    assert rebuilt.startswith(f"--{v.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    assert rebuilt.endswith(f"\r\n--{v.boundary}--\r\n".encode())
    assert [(h, bytes(p)) for h, p in split_parts(rebuilt, v.boundary.encode())] == [
        ({"content-type": "application/dicom"}, a), ({"content-type": "application/dicom"}, b)]


def test_each_request_gets_a_fresh_unguessable_boundary():
    boundaries = {StowStreamValidator(CT_TYPE).boundary for _ in range(50)}
    assert len(boundaries) == 50 and all(len(b) >= 32 for b in boundaries)


def test_a_part_is_committed_only_once_the_delimiter_after_it_is_produced():
    (_, a), (_, b) = instance(), instance()
    data = body(a, b)
    v = StowStreamValidator(CT_TYPE)
    second = data.index(b"--" + B, 10)
    cut = data.index(b"\r\n\r\n", second) + 4 + 20  # into the second part: the first has ended, whole
    v.feed(data[:cut])
    assert v.committed == [] and v.forwarded
    v.feed(data[cut:])
    assert [i.sop_instance_uid for i in v.committed] == [v.instances[0].sop_instance_uid]
    v.finish()
    assert v.committed == v.instances


def test_abandon_ends_the_body_without_a_crlf_before_the_close_delimiter():
    (_, a) = instance()
    v = StowStreamValidator(CT_TYPE)
    v.feed(body(a)[:-20])
    end = v.abandon()
    assert end == b"!!--" + v.boundary.encode() + b"--\r\n"


def test_consistent_framing_headers_are_accepted():
    (_, a) = instance()
    headers = PART + b"Content-Length: %d\r\nContent-Transfer-Encoding: Binary\r\n" % len(a)
    assert len(validate_stow(body(a, headers=headers, epilogue=b""), CT_TYPE)) == 1
    assert len(validate_stow(b"\r\n" + body(a), CT_TYPE)) == 1  # one CRLF before the first delimiter


# -- ambiguous framing: 400 ---------------------------------------------------------------------------

def padding(value: bytes) -> bytes:
    """A Data Set Trailing Padding (FFFC,FFFC) element holding ``value``."""
    value += b"\x00" * (len(value) % 2)
    return struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, len(value)) + value


AMBIGUOUS = {
    "content-length too short": lambda a: body(a, headers=PART + b"Content-Length: 10\r\n"),
    "content-length too long": lambda a: body(a, headers=PART + b"Content-Length: %d\r\n" % (len(a) + 1)),
    "content-length not a number": lambda a: body(a, headers=PART + b"Content-Length: 0x10\r\n"),
    "content-transfer-encoding": lambda a: body(a, headers=PART + b"Content-Transfer-Encoding: base64\r\n"),
    "content-encoding": lambda a: body(a, headers=PART + b"Content-Encoding: gzip\r\n"),
    "transfer-encoding": lambda a: body(a, headers=PART + b"Transfer-Encoding: chunked\r\n"),
    "header twice": lambda a: body(a, headers=PART + b"content-type: application/dicom\r\n"),
    "bare LF in a header": lambda a: body(a, headers=b"Content-Length: 5\nContent-Type: application/dicom\r\n"),
    "NUL in a header": lambda a: body(a, headers=PART + b"Content-ID: a\x00b\r\n"),
    "parameter twice in a part": lambda a: body(
        a, headers=b"Content-Type: application/dicom; transfer-syntax=1.2; transfer-syntax=1.3\r\n"),
    "nested multipart": lambda a: body(a, headers=b"Content-Type: multipart/related; boundary=x\r\n"),
    # inside the value of a Data Set Trailing Padding element: a valid file for the gateway
    "boundary inside a part": lambda a: body(a + padding(b"xx--" + B + b"\r\n" + PART + b"\r\n" + a)),
    "boundary after CRLF inside a part": lambda a: body(a + padding(b"\r\n--" + B + b"x" + a)),
    "preamble": lambda a: body(a, preamble=b"hello\r\n"),
    "preamble after a CRLF": lambda a: body(a, preamble=b"\r\nhello"),
    "epilogue": lambda a: body(a, epilogue=b"\r\n--" + B + b"\r\n" + PART + b"\r\n" + a + b"\r\n--" + B + b"--"),
    "epilogue without CRLF": lambda a: body(a, epilogue=b"x"),
}


@pytest.mark.parametrize("kind", list(AMBIGUOUS))
@pytest.mark.parametrize("chunk", [1, 7, 10**9])
def test_ambiguous_framing_is_a_400(kind, chunk):
    (_, a) = instance()
    v = StowStreamValidator(CT_TYPE)
    with pytest.raises(InvalidRequest) as info:
        feed(v, AMBIGUOUS[kind](a), chunk)
    assert not isinstance(info.value, UnsupportedMediaType)
    assert not isinstance(info.value, StowPartRejected)


def test_a_header_split_across_chunks_is_read_whole():
    # python-multipart calls back once per piece: "Content-Le" + "ngth" must still be seen
    (_, a) = instance()
    data = body(a, headers=PART + b"Content-Length: 10\r\n")
    at = data.index(b"Content-Length") + 10
    v = StowStreamValidator(CT_TYPE)
    with pytest.raises(InvalidRequest, match="(?i)content-length"):
        v.feed(data[:at])
        v.feed(data[at:])
        v.finish()


@pytest.mark.parametrize("content_type", [
    f"multipart/related; boundary={B.decode()}; boundary=other",
    f'multipart/related; type="application/dicom"; type="application/dicom"; boundary={B.decode()}',
    'multipart/related; boundary="a;b"',
    "multipart/related; boundary=" + "x" * 71,
    'multipart/related; boundary="ends-with-space "',
    "multipart/related; boundary*=utf-8''abc",
])
def test_ambiguous_request_content_types_are_a_400(content_type):
    with pytest.raises(InvalidRequest) as info:
        stow_boundary(content_type)
    assert not isinstance(info.value, UnsupportedMediaType)


def test_request_content_types_that_are_fine():
    assert stow_boundary('multipart/related; type="application/dicom"; boundary="quoted:=?"') == b"quoted:=?"
    assert stow_boundary("Multipart/Related; BOUNDARY=abc") == b"abc"


# -- the element walk ---------------------------------------------------------------------------------

def sq(tag: int, length: int, vr: bytes = b"SQ") -> bytes:
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)


ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def undefined_nesting(depth: int, tag: int = 0x0040A730, vr: bytes = b"SQ") -> bytes:
    return (sq(tag, 0xFFFFFFFF, vr) + ITEM) * depth + (ITEM_END + SEQ_END) * depth


def defined_nesting(depth: int, tag: int = 0x0040A730) -> bytes:
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = sq(tag, len(item)) + item
    return inner


def walk(data: bytes, *, depth: int = 32, chunk: int = 10**9) -> DicomStructure:
    w = DicomStructure(depth)
    for i in range(0, len(data), chunk):
        w.feed(data[i : i + chunk])
    w.close()
    return w


@pytest.mark.parametrize("make", [undefined_nesting, defined_nesting], ids=["undefined", "defined"])
def test_nesting_up_to_the_limit_passes_and_one_more_level_is_refused(make):
    walk(instance(extra=make(8))[1], depth=8)
    with pytest.raises(NestingTooDeep) as info:
        walk(instance(extra=make(9))[1], depth=8)
    assert info.value.limit == 8


@pytest.mark.parametrize(("make", "depth"), [(undefined_nesting, 10_000), (undefined_nesting, 200_000),
                                             (defined_nesting, 10_000)])
def test_huge_nesting_is_refused_without_recursion(make, depth):
    data = instance(extra=make(depth))[1]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # the walk does not recurse: it cannot run into the interpreter's limit
    try:
        with pytest.raises(NestingTooDeep):
            walk(data, chunk=65536)
        walk(data, depth=10**6, chunk=65536)  # no limit to speak of: walked to the end, and no recursion
    finally:
        sys.setrecursionlimit(limit)


def test_un_of_undefined_length_and_implicit_vr_sequences_count_as_nesting():
    # UN with undefined length is an implicit VR sequence (PS3.5 6.2.2), as pydicom reads it
    un = (sq(0x0040A730, 0xFFFFFFFF, b"UN") + ITEM) + (struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) + ITEM) * 4 \
        + (ITEM_END + SEQ_END) * 5
    with pytest.raises(NestingTooDeep):
        walk(instance(extra=un)[1], depth=4)
    walk(instance(extra=un)[1], depth=5)
    implicit = (struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) + ITEM) * 6 + (ITEM_END + SEQ_END) * 6
    with pytest.raises(NestingTooDeep):
        walk(instance(transfer_syntax=ImplicitVRLittleEndian, extra=implicit)[1], depth=5)


def test_nesting_after_the_pixel_data_is_refused_too():
    with pytest.raises(NestingTooDeep):
        walk(instance(pixels=True, extra=undefined_nesting(40, tag=0xFFFAFFFA))[1])


def test_header_end_is_where_pydicom_stops_before_the_pixel_data():
    _, data = instance(pixels=True)
    w = walk(data)
    assert data[w.header_end : w.header_end + 4] == struct.pack("<HH", 0x7FE0, 0x0010)
    _, data = instance()
    assert walk(data).header_end == len(data)


@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_the_walk_gives_the_same_answer_whatever_the_chunks(chunk):
    _, data = instance(pixels=True, extra=defined_nesting(3, tag=0xFFFAFFFA))
    assert walk(data, chunk=chunk).header_end == walk(data).header_end


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


MALFORMED = {
    "a repeated top-level element": lambda d: d + _element(0x00100020, b"LO", b"OTHER-PT"),
    "an element after the trailing padding out of order": lambda d: d + _element(0xFFFCFFFC, b"OB", b"")
                                                                     + _element(0x00200010, b"SH", b"X1"),
    "an unknown VR": lambda d: d + _element(0x00211010, b"ZZ", b"ab"),
    "trailing bytes": lambda d: d + b"\x00\x00\r\n",
    "a truncated element": lambda d: d + sq(0x0040A730, 100) + b"\x00" * 10,
    "an item overrunning its sequence": lambda d: d + sq(0x0040A730, 8) + struct.pack("<HHI", 0xFFFE, 0xE000, 16)
                                                  + b"\x00" * 16,
    "a delimiter at the top level": lambda d: d + ITEM_END,
    "an open sequence at the end": lambda d: d + sq(0x0040A730, 0xFFFFFFFF) + ITEM,
    "undefined length on a non-sequence": lambda d: d + struct.pack("<HH2sHI", 0x0042, 0x0011, b"OB", 0, 0xFFFFFFFF),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_encodings_parsers_could_read_differently_are_refused(kind):
    _, data = instance()
    with pytest.raises(StructureError):
        walk(MALFORMED[kind](data))


def test_meta_and_transfer_syntax_checks():
    _, data = instance()
    with pytest.raises(StructureError, match="DICM"):
        walk(data[128:])
    with pytest.raises(StructureError, match="deflated"):
        walk(instance(transfer_syntax=pydicom.uid.DeflatedExplicitVRLittleEndian)[1])
    # (0002,0000) must agree with the meta information it measures
    at = data.index(struct.pack("<HH", 0x0002, 0x0000)) + 8
    wrong = data[:at] + struct.pack("<I", struct.unpack("<I", data[at : at + 4])[0] + 2) + data[at + 4 :]
    with pytest.raises(StructureError, match="Group Length"):
        walk(wrong)
    # an explicit VR data set under an implicit VR transfer syntax (pydicom would switch silently):
    # the Transfer Syntax UID's value, same length, NUL-padded
    explicit = ExplicitVRLittleEndian.encode() + b"\x00"
    mixed = data.replace(explicit, ImplicitVRLittleEndian.encode().ljust(len(explicit), b"\x00"), 1)
    with pytest.raises(StructureError, match="transfer syntax says"):
        walk(mixed)


def test_pydicoms_sample_files_that_are_plain_part10_files_pass():
    folder = os.path.dirname(get_testdata_file("CT_small.dcm"))
    refused = []
    for path in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
        data = open(path, "rb").read()  # noqa: SIM115 - small files
        try:
            walk(data, chunk=4096)
        except StructureError:
            refused.append(os.path.basename(path))
    # each of these is a deliberately broken or unusual sample (no preamble, truncated, deflated, ...)
    assert set(refused) <= {"ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "no_meta.dcm", "rtstruct.dcm",
                            "MR_truncated.dcm", "SC_rgb_jpeg.dcm", "image_dfl.dcm", "meta_missing_tsyntax.dcm",
                            "nested_priv_SQ.dcm", "rtplan_truncated.dcm"}, refused
    assert "CT_small.dcm" not in refused and "rtplan.dcm" not in refused


# -- the validator's answers for structure and depth ----------------------------------------------------

def test_too_deep_is_a_400_naming_the_limit_and_a_bad_structure_a_409():
    (_, deep) = instance(extra=undefined_nesting(33))
    with pytest.raises(InvalidRequest) as info:
        validate_stow(body(deep), CT_TYPE)
    assert info.value.detail == {"part": 0, "max_sequence_depth": 32}
    assert not isinstance(info.value, StowPartRejected)
    (_, dup) = instance(extra=_element(0x00100020, b"LO", b"OTHER-PT"))
    with pytest.raises(StowPartRejected, match="not an acceptable DICOM instance"):
        validate_stow(body(dup), CT_TYPE)


def test_the_depth_limit_is_configurable():
    (_, data) = instance(extra=undefined_nesting(5))
    assert len(validate_stow(body(data), CT_TYPE, max_sequence_depth=5)) == 1
    with pytest.raises(InvalidRequest):
        validate_stow(body(data), CT_TYPE, max_sequence_depth=4)


# -- the service: what the archive reports, and refusals after parts went out -----------------------------

CT_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def answer(stored: list[str], failed: list[str] = ()) -> bytes:
    def seq(uids, reason=None):
        items = [{"00081150": {"vr": "UI", "Value": [CT_CLASS]}, "00081155": {"vr": "UI", "Value": [u]},
                  **({"00081197": {"vr": "US", "Value": [reason]}} if reason else {})} for u in uids]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}

    return json.dumps({"00081198": seq(failed, 0x0110), "00081199": seq(stored)}).encode()


class Archive:
    """A fake archive: reads the whole body, answers ``answer``; remembers what it was asked to remove."""

    def __init__(self, answer_for=None, *, removal: str = "removed") -> None:
        self.answer_for = answer_for
        self.removal = removal
        self.received = b""
        self.removed: list[str] = []
        self.since: datetime | None = None

    async def send(self, method, path, *, query=None, headers=None, content=None):
        self.content_type = headers["content-type"]
        async for chunk in content:
            self.received += chunk
        payload = self.answer_for(self) if self.answer_for else answer([])
        return httpx.Response(200, headers={"content-type": "application/dicom+json"}, content=payload)

    async def remove_instances(self, uids, *, received_since):
        self.since = received_since
        self.removed += list(uids)
        return {uid: self.removal for uid in uids}

    async def study_summary(self, study_uid):
        return None

    async def aclose(self):
        pass


def service(outbox: SqlAuditOutbox, archive: Archive) -> DicomwebService:
    policy = RbacPolicy.from_mapping({"version": 1, "roles": {"technologist": [PERMISSIONS[Transaction.STORE]]}})
    auditor = AuditRecorder(outbox, AuditSource(source_id="gw", enterprise_site_id="site"), fail_closed=True)
    return DicomwebService(archive, policy, auditor, gateway_id="gw")


def context(content_type: str) -> RequestContext:
    return RequestContext(Principal("sub", "tom", frozenset({"technologist"}), client_id="viewer"), "127.0.0.1",
                          "POST", "/studies", [], "", {"content-type": content_type})


async def chunks(data: bytes, size: int = 4096, then: Exception | None = None):
    for i in range(0, len(data), size):
        yield data[i : i + size]
    if then is not None:
        raise then


def events(outbox: SqlAuditOutbox) -> list[dict]:
    return [doc for _, _, doc in outbox.pending(50)]


async def test_an_instance_the_archive_reports_but_the_gateway_never_validated_is_an_alert_and_removed(outbox):
    (uid, data) = instance()
    smuggled = generate_uid()
    archive = Archive(lambda a: answer([uid, smuggled]))
    client, ct = multipart_related([data])
    before = datetime.now(UTC) - timedelta(seconds=1)
    response = await service(outbox, archive).store(context(ct), classify("POST", "/studies"), chunks(client))
    assert response.status_code == 200
    assert archive.removed == [smuggled] and archive.since is not None and archive.since >= before
    alert = next(e for e in events(outbox) if e["event.id"] == "110113")
    assert smuggled in alert["event.outcome_description"] and "removed" in alert["event.outcome_description"]
    assert alert["event.outcome"] == Outcome.SERIOUS_FAILURE
    stored = next(e for e in events(outbox) if e["event.id"] == "110107")
    assert stored["event.outcome"] == Outcome.SUCCESS


async def test_an_unvalidated_instance_that_could_not_be_removed_is_a_major_alert(outbox):
    (uid, data) = instance()
    archive = Archive(lambda a: answer([uid, generate_uid()]), removal="error: ConnectError")
    client, ct = multipart_related([data])
    await service(outbox, archive).store(context(ct), classify("POST", "/studies"), chunks(client))
    alert = next(e for e in events(outbox) if e["event.id"] == "110113")
    assert alert["event.outcome"] == Outcome.MAJOR_FAILURE


def test_unvalidated_uids_reads_both_sequences():
    from compliance.dicomweb.stow import StowInstance

    mine = StowInstance(CT_CLASS, "1.2.3", "1.2", None, None, None, None)
    assert unvalidated_uids(answer(["1.2.3", "9.9"], ["8.8"]), [mine]) == (["9.9"], ["8.8"])
    assert unvalidated_uids(b"not json", [mine]) == ([], [])


async def test_a_refusal_after_parts_went_out_ends_the_body_and_removes_what_the_archive_stored(outbox):
    (uid1, first), (uid2, second) = instance(patient="PAT-A"), instance(patient="PAT-B")
    client, ct = multipart_related([first, second, b"MZ not a DICOM file at all" * 20])
    archive = Archive()
    with pytest.raises(StowPartRejected):
        await service(outbox, archive).store(context(ct), classify("POST", "/studies"), chunks(client, 512))
    # the archive saw the validated parts, then an end that completes no further part
    assert archive.received.endswith(b"!!--" + archive.content_type.rsplit("=", 1)[1].encode() + b"--\r\n")
    assert b"not a DICOM" not in archive.received
    assert sorted(archive.removed) == sorted([uid1, uid2])
    [event] = events(outbox)
    assert event["event.id"] == "110107" and event["event.outcome"] == Outcome.SERIOUS_FAILURE
    assert "2 removed" in event["event.outcome_description"]
    assert set(event["patient.ids"]) == {"PAT-A", "PAT-B"}


async def test_a_client_that_goes_away_mid_body_is_audited_and_undone(outbox):
    (uid1, first), (_, second) = instance(), instance()
    client, ct = multipart_related([first, second])
    archive = Archive()

    class ClientDisconnect(Exception):
        pass

    with pytest.raises(ClientDisconnect):
        await service(outbox, archive).store(context(ct), classify("POST", "/studies"),
                                             chunks(client[: len(client) - 200], 512, then=ClientDisconnect()))
    assert uid1 in archive.removed
    [event] = events(outbox)
    assert "the upload broke off (ClientDisconnect)" in event["event.outcome_description"]


async def test_a_body_over_the_limit_after_parts_went_out_is_undone(outbox):
    (uid1, first), (_, second) = instance(), instance()
    client, ct = multipart_related([first, second])
    archive = Archive(removal="error: ReadTimeout")
    with pytest.raises(PayloadTooLarge):
        await service(outbox, archive).store(context(ct), classify("POST", "/studies"),
                                             chunks(client[:-300], 512, then=PayloadTooLarge("too large")))
    [event] = events(outbox)
    assert event["event.outcome"] == Outcome.MAJOR_FAILURE
    assert "NOT REMOVED" in event["event.outcome_description"] and uid1 in event["event.outcome_description"]


async def test_a_refusal_before_anything_went_out_aborts_and_removes_nothing(outbox):
    client, ct = multipart_related([b"MZ not a DICOM file at all" * 20])
    archive = Archive()
    with pytest.raises(StowPartRejected):
        await service(outbox, archive).store(context(ct), classify("POST", "/studies"), chunks(client))
    assert archive.removed == []
    [event] = events(outbox)
    assert event["event.outcome_description"].startswith("refused by the gateway: part 0")


# -- OrthancArchive.remove_instances over Orthanc's REST API ---------------------------------------------

async def test_remove_instances_deletes_only_what_arrived_since_the_request():
    since = datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)
    reception = {"new": "20260102T030405", "old": "20260102T030404"}
    deleted: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/tools/lookup":
            uid = request.content.decode()
            if uid == "1.1":
                return httpx.Response(200, json=[])
            if uid == "9.9":
                return httpx.Response(500)
            return httpx.Response(200, json=[{"Type": "Instance", "ID": {"1.2": "new", "1.3": "old"}[uid]},
                                             {"Type": "Study", "ID": "s"}])
        if path.endswith("/metadata/ReceptionDate"):
            return httpx.Response(200, text=reception[path.split("/")[2]])
        if request.method == "DELETE":
            deleted.append(path.split("/")[2])
            return httpx.Response(200, json={})
        return httpx.Response(404)

    archive = OrthancArchive("http://orthanc", "/dicom-web", username="u", password="p",
                             transport=httpx.MockTransport(handler))
    result = await archive.remove_instances(["1.1", "1.2", "1.3", "9.9"], received_since=since)
    assert result == {"1.1": "absent", "1.2": "removed", "1.3": "held before", "9.9": "error: HTTPStatusError"}
    assert deleted == ["new"]
    await archive.aclose()
