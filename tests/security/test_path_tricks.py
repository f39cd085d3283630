"""Path tricks toward the archive's own REST API: none reaches Orthanc through the gateway.

Orthanc's REST API (``/system``, ``/instances``, ``/tools/execute-script``, ``/patients/.../modify``)
answers anyone holding the gateway's archive credentials, so the gateway proxies only the DICOMweb
shapes it classifies (compliance/dicomweb/routing.py) and answers every other path itself. These
requests are sent byte for byte (``http.client`` does not normalise dot segments or encodings, as
httpx and browsers do), so the gateway sees exactly what a hostile client would send.

They passed before issue 12 and are kept so that none regresses.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from .conftest import Gateway, Stack

pytestmark = pytest.mark.integration

#: What would identify an answer of Orthanc's REST API rather than the gateway's own refusal.
ORTHANC_MARKERS = (b"DicomAet", b"ApiVersion", b"PluginsEnabled", b"MainDicomTags", b"IsStable", b"LastUpdate")

TRICKS = [
    "/dicom-web/../system",
    "/dicom-web/%2e%2e/system",
    "/dicom-web/%2E%2E%2Fsystem",
    "/dicom-web/..%2fsystem",
    "/dicom-web/..%5csystem",
    "/dicom-web/studies/../../system",
    "/dicom-web/studies/1.2.3/../../../instances",
    "/dicom-web/studies/%2e%2e/%2e%2e/patients",
    "/dicom-web//system",
    "/dicom-web/./system",
    "/dicom-web/system",
    "/dicom-web/tools/find",
    "/dicom-web/tools/execute-script",
    "/dicom-web/studies/1.2.3;/system",
    "/dicom-web/studies/1.2.3%3b/system",
    "/dicom-web/studies/1.2.3%2f..%2f..%2fsystem",
    "/dicom-web/instances/../../system",
    "//system",
    "/system",
    "/instances",
    "/patients",
    "/tools/execute-script",
    "/dicom-web%2f..%2fsystem",
    "/DICOM-WEB/studies",
    "/dicom-web\\..\\system",
    "http://127.0.0.1:8042/system",
]


def raw(gw: Gateway, method: str, target: str, token: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


@pytest.mark.parametrize("target", TRICKS)
def test_no_path_trick_reaches_the_archives_rest_api(gateway: Gateway, tokens: dict[str, str], target: str):
    # ada is the admin: the most privileged demo user gets no further than anyone else
    for user in ("ada", "tom"):
        for method in ("GET", "POST", "DELETE", "PUT"):
            body = b"{}" if method in ("POST", "PUT") else None
            status, data, ctype = raw(gateway, method, target, tokens[user], body)
            assert status in (400, 404, 405), (user, method, target, status, data[:300])
            assert not any(m in data for m in ORTHANC_MARKERS), (user, method, target, data[:300])
            # the gateway's own refusal: JSON with an error code, never the archive's body
            assert "json" in ctype, (user, method, target, ctype, data[:300])
            assert "error" in json.loads(data), (user, method, target, data[:300])


def test_the_archive_itself_refuses_anonymous_requests(stack: Stack):
    """The only way around the gateway would be the archive's own port: it wants the gateway's
    credentials (which no client holds) for its REST API and its DICOMweb."""
    parts = urlsplit(stack.orthanc_url)
    for target in ("/system", "/dicom-web/studies", "/instances", "/tools/execute-script"):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 401, (target, resp.status)
        finally:
            conn.close()
