"""The archive reader of export jobs (``compliance.dicomweb.reader``), against an httpx mock transport.

(Kept with the export tests, whose jobs are its only user; its module is in compliance/dicomweb.)"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from compliance.dicomweb.reader import DicomwebArchiveReader, multipart_parts
from compliance.errors import UpstreamError


def _reader(answer: Callable[[httpx.Request], httpx.Response]) -> DicomwebArchiveReader:
    reader = DicomwebArchiveReader("http://archive", "/dicom-web", username="u", password="p")
    reader._http = httpx.Client(base_url="http://archive", transport=httpx.MockTransport(answer))
    return reader


def _uid(value: str) -> dict[str, object]:
    return {"vr": "UI", "Value": [value]}


def test_multipart_parts():
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n--b1--\r\n"
    assert multipart_parts('multipart/related; type="application/dicom"; boundary=b1', body) == [b"DATA"]


def test_the_studies_of_a_search_are_read_from_dicom_json():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[{"0020000D": _uid("1.2.3")}, {"0020000D": {"vr": "UI"}},
                                         {"00100020": {"vr": "LO", "Value": ["P1"]}}, {"0020000D": _uid("1.2.4")}])

    assert _reader(answer).find_studies({"PatientID": "P1"}) == ["1.2.3", "1.2.4"]  # studies without a UID: none
    (request,) = seen
    assert request.url.path == "/dicom-web/studies"
    assert request.url.params.multi_items() == [("PatientID", "P1"), ("includefield", "0020000D")]
    assert request.headers["accept"] == "application/dicom+json"


def test_the_instances_of_a_study_are_read_sorted_and_an_empty_answer_is_none():
    instances = [{"0020000E": _uid("1.2.3.2"), "00080018": _uid("1.2.3.2.9")},
                 {"0020000E": _uid("1.2.3.1"), "00080018": _uid("1.2.3.1.7")}]
    reader = _reader(lambda request: httpx.Response(200, json=instances))
    assert reader.find_instances("1.2.3") == [("1.2.3.1", "1.2.3.1.7"), ("1.2.3.2", "1.2.3.2.9")]
    assert _reader(lambda request: httpx.Response(204)).find_instances("1.2.3") == []


def test_an_instance_the_archive_lists_without_its_uids_fails_the_read():
    reader = _reader(lambda request: httpx.Response(200, json=[{"0020000E": _uid("1.2.3.1")}]))
    with pytest.raises(KeyError):
        reader.find_instances("1.2.3")


def test_an_archive_error_never_carries_the_source_uids():
    reader = _reader(lambda request: httpx.Response(500, text="boom"))
    uids = ("1.2.840.99.1", "1.2.840.99.2", "1.2.840.99.3")
    with pytest.raises(UpstreamError) as failed:
        reader.retrieve_instance(*uids)
    assert failed.value.message == "the archive answered 500 to a retrieve request"
    with pytest.raises(UpstreamError) as failed:
        reader.find_instances(uids[0])
    assert not any(uid in failed.value.message for uid in uids)
    with pytest.raises(UpstreamError, match="refused the gateway's credentials"):
        _reader(lambda request: httpx.Response(401)).find_studies({})
