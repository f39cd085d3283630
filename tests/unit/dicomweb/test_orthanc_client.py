"""What the archive client puts on the wire (captured by httpx's MockTransport; pure logic)."""

from __future__ import annotations

import base64

import httpx
import pytest

from compliance.dicomweb.orthanc import OrthancArchive
from compliance.errors import UpstreamError, UpstreamUnavailable


def archive(handler) -> OrthancArchive:
    return OrthancArchive("http://archive:8042", "/dicom-web", username="gateway", password="pw",
                          public_host="127.0.0.1:8080", transport=httpx.MockTransport(handler))


async def test_the_callers_token_and_cookies_never_reach_the_archive():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    a = archive(handler)
    resp = await a.send("GET", "/studies", query=[("PatientID", "X")], headers={
        "authorization": "Bearer eyJ.secret.token", "cookie": "session=abc", "x-forwarded-for": "10.0.0.1",
        "accept": "application/dicom+json",
    })
    await resp.aclose()
    req = seen[0]
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"gateway:pw").decode()
    assert "eyJ.secret.token" not in str(req.headers)
    assert "cookie" not in req.headers and "x-forwarded-for" not in req.headers
    assert req.headers["accept"] == "application/dicom+json"
    assert req.headers["forwarded"] == "host=127.0.0.1:8080;proto=http"
    assert str(req.url) == "http://archive:8042/dicom-web/studies?PatientID=X"
    await a.aclose()


@pytest.mark.parametrize("status", [401, 403])
async def test_archive_refusing_the_gateways_credentials_is_an_upstream_error(status):
    a = archive(lambda r: httpx.Response(status))
    with pytest.raises(UpstreamError):
        await a.send("GET", "/studies")
    await a.aclose()


async def test_unreachable_archive_is_503_material():
    def handler(request):
        raise httpx.ConnectError("refused")

    a = archive(handler)
    with pytest.raises(UpstreamUnavailable):
        await a.send("GET", "/studies")
    await a.aclose()


async def test_study_summary_is_cached_only_when_found():
    calls = {"n": 0}
    found = {"value": False}

    def handler(request):
        calls["n"] += 1
        if not found["value"]:
            return httpx.Response(200, json=[])
        return httpx.Response(200, json=[{"00100020": {"vr": "LO", "Value": ["P1"]},
                                          "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}}])

    a = archive(handler)
    assert await a.study_summary("1.2.3") is None
    found["value"] = True  # stored a moment later: the miss must not have been cached
    summary = await a.study_summary("1.2.3")
    assert summary is not None and summary.patient_id == "P1" and summary.patient_name == "Doe^Jane"
    await a.study_summary("1.2.3")
    assert calls["n"] == 2
    await a.aclose()
