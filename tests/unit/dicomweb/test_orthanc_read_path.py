"""The archive client's read path (aiohttp): what goes on the wire and what comes back.

A small aiohttp server on loopback stands in for the archive (pure logic of the client; the real
Orthanc is exercised by the integration tests). The same guarantees as the httpx path's tests in
``test_orthanc_client.py``: the caller's token never reaches the archive, the bytes come back as sent.
"""

from __future__ import annotations

import base64
import socket

import pytest
from aiohttp import web

from compliance.dicomweb.orthanc import OrthancArchive
from compliance.errors import UpstreamError, UpstreamUnavailable

BODY = bytes(range(256)) * 4096  # 1 MiB, larger than one read


@pytest.fixture
async def fake_archive():
    seen: list[web.Request] = []

    async def studies(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}],
                                 content_type="application/dicom+json")

    async def instance(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        # gzip-looking headers must pass through untouched: the client never decodes
        resp = web.StreamResponse(headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                                            'boundary=abc', "ETag": '"v1"'})
        resp.content_length = len(BODY)
        await resp.prepare(request)
        for i in range(0, len(BODY), 65536):
            await resp.write(BODY[i:i + 65536])
        return resp

    async def refused(request: web.Request) -> web.Response:
        return web.Response(status=401, text="no")

    app = web.Application()
    app.router.add_get("/dicom-web/studies", studies)
    app.router.add_get("/dicom-web/studies/1.2.3/series/4/instances/5", instance)
    app.router.add_get("/dicom-web/refused", refused)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    archive = OrthancArchive(f"http://127.0.0.1:{port}", "/dicom-web", username="gateway", password="pw",
                             public_host="127.0.0.1:8080")
    try:
        yield archive, seen
    finally:
        await archive.aclose()
        await runner.cleanup()


async def test_the_callers_token_and_cookies_never_reach_the_archive(fake_archive):
    archive, seen = fake_archive
    resp = await archive.send("GET", "/studies", query=[("PatientID", "X^Y*")], headers={
        "authorization": "Bearer eyJ.secret.token", "cookie": "session=abc", "x-forwarded-for": "10.0.0.1",
        "accept": "application/dicom+json",
    })
    body = await resp.aread()
    await resp.aclose()
    assert resp.status_code == 200 and resp.json()[0]["0020000D"]["Value"] == ["1.2.3"] and body
    req = seen[0]
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"gateway:pw").decode()
    assert "eyJ.secret.token" not in str(dict(req.headers))
    assert "Cookie" not in req.headers and "X-Forwarded-For" not in req.headers
    assert req.headers["Accept"] == "application/dicom+json"
    assert req.headers["Forwarded"] == "host=127.0.0.1:8080;proto=http"
    assert req.headers["Accept-Encoding"] == "identity"
    assert req.query["PatientID"] == "X^Y*"


async def test_a_retrieve_streams_back_the_bytes_and_headers_as_sent(fake_archive):
    archive, _ = fake_archive
    resp = await archive.send("GET", "/studies/1.2.3/series/4/instances/5", headers={"accept": "*/*"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].endswith("boundary=abc") and resp.headers["ETag"] == '"v1"'
    assert int(resp.headers["Content-Length"]) == len(BODY)
    chunks = [c async for c in resp.aiter_raw()]
    await resp.aclose()
    assert b"".join(chunks) == BODY


async def test_refused_credentials_and_an_unreachable_archive_are_upstream_errors(fake_archive):
    archive, _ = fake_archive
    with pytest.raises(UpstreamError, match="credentials"):
        await archive.send("GET", "/refused")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connection refused
        gone = OrthancArchive(f"http://127.0.0.1:{dead}", "/dicom-web", username="gateway", password="pw")
        try:
            with pytest.raises(UpstreamUnavailable):
                await gone.send("GET", "/studies")
        finally:
            await gone.aclose()
