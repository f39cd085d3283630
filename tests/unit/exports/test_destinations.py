"""The allow-list of research archives (``compliance.exports.destinations``): loading it, what is shown
of it, and ``DicomwebStowClient`` reading STOW-RS answers over an httpx mock transport."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from compliance.errors import ConfigurationError
from compliance.exports.destinations import (
    FAILED,
    STORED,
    UNCONFIRMED,
    DestinationRegistry,
    DicomwebDestination,
    DicomwebStowClient,
    load_destinations,
)
from compliance.exports.interfaces import InvalidExportRequest

from .builders import PACS


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "destinations.yaml"
    p.write_text(text)
    return p


def test_allow_list_loads_and_hides_credentials(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PACS_PW", "s3cret-value")
    reg = load_destinations(_write(tmp_path, """
destinations:
  research-pacs:
    kind: dicomweb
    description: lab archive
    url: https://pacs.example.org/dicom-web/
    auth: basic
    username: exporter
    password_env: PACS_PW
    projects: [lung-study]
"""), environment="production")
    dest = reg.get("research-pacs")
    assert dest.stow_url == "https://pacs.example.org/dicom-web/studies"
    public = json.dumps(reg.public())
    assert "s3cret-value" not in public and "PACS_PW" not in public and "exporter" not in public
    auth = dest.credentials()
    assert isinstance(auth, httpx.BasicAuth)
    assert load_destinations(tmp_path / "missing.yaml").names() == []  # no file: bundles only
    shipped = load_destinations(Path(__file__).resolve().parents[3] / "policies" / "export-destinations.yaml")
    assert shipped.names() == []  # the shipped list enables nothing


@pytest.mark.parametrize("spec, message", [
    ("kind: ftp\n    url: https://x.example/dw", "kind"),
    ("kind: dicomweb\n    url: https://user:pw@x.example/dw", "without credentials"),
    ("kind: dicomweb\n    url: https://x.example/dw?to=elsewhere", "without credentials or query"),
    ("kind: dicomweb\n    url: file:///etc/passwd", "http(s)"),
    ("kind: dicomweb\n    url: http://x.example/dw", "HTTPS only"),
    ("kind: dicomweb\n    url: https://x.example/dw\n    auth: basic\n    username: u", "password_env"),
    ("kind: dicomweb\n    url: https://x.example/dw\n    password: inline-secret", "unknown keys"),
])
def test_allow_list_refuses_bad_entries(tmp_path, spec, message):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_destinations(_write(tmp_path, f"destinations:\n  pacs:\n    {spec}\n"), environment="production")


def test_a_request_names_a_destination_never_a_url():
    reg = DestinationRegistry([PACS])
    assert reg.resolve("bundle", "lung-study") == {"kind": "bundle"}
    assert reg.resolve({"kind": "dicomweb", "name": "research-pacs"}, "lung-study") == \
        {"kind": "dicomweb", "name": "research-pacs"}
    for bad in ({"kind": "dicomweb", "name": "elsewhere"},
                {"kind": "dicomweb", "name": "research-pacs", "url": "http://evil.example/dicom-web"},
                {"kind": "dicomweb", "url": "http://evil.example/dicom-web"},
                "http://evil.example/dicom-web", "ftp"):
        with pytest.raises(InvalidExportRequest):
            reg.resolve(bad, "lung-study")
    with pytest.raises(InvalidExportRequest, match="may not export"):
        reg.resolve({"kind": "dicomweb", "name": "research-pacs"}, "another-project")


def test_a_researcher_is_shown_only_the_destinations_of_his_projects():
    registry = DestinationRegistry([
        DicomwebDestination(name="open", url="http://127.0.0.1:9/a"),
        DicomwebDestination(name="cardio", url="http://127.0.0.1:9/b", projects=frozenset({"other-study"})),
        DicomwebDestination(name="shared", url="http://127.0.0.1:9/c",
                            projects=frozenset({"other-study", "lung-study"}))])
    shown = {d["name"]: d["projects"] for d in registry.public(["lung-study"])}
    assert shown == {"open": None, "shared": ["lung-study"]}
    assert {d["name"] for d in registry.public()} == {"open", "cardio", "shared"}  # a steward sees all


def _client(handler, **kw) -> DicomwebStowClient:  # type: ignore[no-untyped-def]
    client = DicomwebStowClient(PACS, backoff_seconds=0, **kw)
    client._client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=False)
    return client


def _sop_seq(tag: str, uids: list[str], reason: int | None = None) -> dict:
    items = []
    for uid in uids:
        item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {tag: {"vr": "SQ", "Value": items}}


def test_stow_answer_is_read_per_instance():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {**_sop_seq("00081199", ["2.25.1"]), **_sop_seq("00081198", ["2.25.2"], 0xA700)}
        return httpx.Response(409, json=body)

    out = _client(handler).store([("2.25.1", b"A"), ("2.25.2", b"B"), ("2.25.3", b"C")])
    assert out["2.25.1"] == (STORED, None)
    assert out["2.25.2"] == (FAILED, "destination refused the instance: out of resources")
    assert out["2.25.3"][0] == UNCONFIRMED
    req = seen[0]
    assert str(req.url) == "http://research.example/dicom-web/studies" and req.method == "POST"
    assert req.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert req.content.count(b"Content-Type: application/dicom\r\n\r\n") == 3


def test_stow_never_follows_a_redirect_and_retries_only_busy_answers():
    calls: list[str] = []

    def redirect(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(307, headers={"Location": "http://evil.example/dicom-web/studies"})

    out = _client(redirect).store([("2.25.1", b"A")])
    assert out["2.25.1"][0] == FAILED and "redirects are not followed" in out["2.25.1"][1]
    assert calls == ["http://research.example/dicom-web/studies"]

    answers = iter([httpx.Response(503), httpx.Response(200, json=_sop_seq("00081199", ["2.25.1"]))])
    assert _client(lambda r: next(answers)).store([("2.25.1", b"A")]) == {"2.25.1": (STORED, None)}

    def refused(request: httpx.Request) -> httpx.Response:
        calls.append("refused")
        return httpx.Response(401)

    calls.clear()
    out = _client(refused).store([("2.25.1", b"A")])
    assert out["2.25.1"][0] == FAILED and "credentials" in out["2.25.1"][1] and calls == ["refused"]

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert _client(down).store([("2.25.1", b"A")])["2.25.1"] == \
        (FAILED, "destination unreachable (ConnectError)")


def test_missing_credential_is_a_configuration_error(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    dest = DicomwebDestination(name="p", url="https://x.example/dw", auth="basic", username="u",
                               password_env="NO_SUCH_PW")
    with pytest.raises(ConfigurationError, match="NO_SUCH_PW"):
        DicomwebStowClient(dest)
