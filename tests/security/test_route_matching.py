"""Issue 12 item 9: DICOMweb routes and UIDs are matched as whole strings.

The attack: ``$`` in a Python regex also matches before a trailing newline, so
``/dicom-web/studies/<uid>%0A`` was classified as a retrieve of ``<uid>``, audited as a successful
transfer and forwarded to the archive, which then failed. Here every segment of every DICOMweb route
shape (study, series, instance, frames, metadata, rendered, thumbnail, bulk data, the QIDO levels,
STOW-RS) gets ``%0A``, ``%0D``, ``%00`` and their combinations, before and after its text: each
answer is 400 or 404 with a JSON body, nothing reaches the archive (a fake one that records every
request), and no success is audited.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.integration.conftest import dump

from .conftest import AuditIndex, Gateway, Stack, bearer
from .edges_support import FakeArchive, fake_archive, own_gateway

S, SE, IN = "1.2.840.113619.2.1", "1.2.840.113619.2.1.2", "1.2.840.113619.2.1.2.3"
I_PATH = f"studies/{S}/series/{SE}/instances/{IN}"
GET_SHAPES = [
    "studies", "series", "instances",
    f"studies/{S}/series", f"studies/{S}/instances", f"studies/{S}/series/{SE}/instances",
    f"studies/{S}", f"studies/{S}/series/{SE}", I_PATH,
    *(f"{base}/{leaf}" for base in (f"studies/{S}", f"studies/{S}/series/{SE}", I_PATH)
      for leaf in ("metadata", "rendered", "thumbnail")),
    f"{I_PATH}/frames/1", f"{I_PATH}/frames/1,2", f"{I_PATH}/frames/1/rendered", f"{I_PATH}/frames/1/thumbnail",
    f"{I_PATH}/bulk/7FE00010",
]
POST_SHAPES = ["studies", f"studies/{S}"]
BAD = ["%0A", "%0D", "%00", "%0D%0A", "%00%0A", "%0A%0D%00"]
SUCCESS_EVENTS = ("110103", "110104", "110107", "110112")


def variants(shape: str) -> Iterator[str]:
    """``/dicom-web/<shape>`` with each bad sequence before and after each segment, and as a segment."""
    segments = ["dicom-web", *shape.split("/")]
    for i, segment in enumerate(segments):
        for bad in BAD:
            for changed in (segment + bad, bad + segment):
                yield "/" + "/".join([*segments[:i], changed, *segments[i + 1:]])
    for bad in BAD:
        yield "/" + "/".join(segments) + "/" + bad


@dataclass
class Target:
    gateway: Gateway
    audit: AuditIndex
    archive: FakeArchive


@pytest.fixture(scope="module")
def target(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("edges-routes")
    with fake_archive() as archive, own_gateway(stack, tmp, "edges-routes", COMPLIANCE_ARCHIVE_URL=archive.url,
                                                COMPLIANCE_ARCHIVE_ENCRYPTED="false") as (gw, audit):
        yield Target(gw, audit, archive)


def _refusals(client: httpx.Client, method: str, url: str, paths: Iterator[str], **kwargs: object) -> list[str]:
    wrong = []
    for path in paths:
        r = client.request(method, url + path, **kwargs)  # type: ignore[arg-type]
        is_json = r.headers.get("content-type", "").startswith("application/json")
        if r.status_code not in (400, 404) or not is_json or "error" not in r.json():
            wrong.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
    return wrong


def short(shape: str) -> str:
    return shape.replace(IN, "I").replace(SE, "SE").replace(S, "S").replace(",", "+")


@pytest.mark.parametrize("shape", GET_SHAPES, ids=short)
def test_control_characters_in_any_segment_of_a_get_are_refused(target: Target, tokens, shape: str):
    target.archive.requests.clear()
    with httpx.Client(timeout=30, headers=bearer(tokens["rita"])) as client:
        wrong = _refusals(client, "GET", target.gateway.url, variants(shape))
    assert wrong == [], "\n".join(wrong)
    assert target.archive.requests == [], target.archive.requests


@pytest.mark.parametrize("shape", POST_SHAPES, ids=short)
def test_control_characters_in_any_segment_of_a_stow_are_refused(target: Target, tokens, shape: str):
    target.archive.requests.clear()
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nnot DICOM\r\n--b1--\r\n"
    headers = {**bearer(tokens["tom"]), "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'}
    with httpx.Client(timeout=30, headers=headers) as client:
        wrong = _refusals(client, "POST", target.gateway.url, variants(shape), content=body)
    assert wrong == [], "\n".join(wrong)
    assert target.archive.requests == [], target.archive.requests


def test_a_uid_longer_than_64_characters_is_not_a_uid(target: Target, tokens):
    """PS3.5 9.1: at most 64 characters of digits and dots."""
    target.archive.requests.clear()
    long_uid = "1." + "2" * 63
    with httpx.Client(timeout=30, headers=bearer(tokens["rita"])) as client:
        for path in (f"/dicom-web/studies/{long_uid}", f"/dicom-web/studies/{S}/series/{long_uid}/metadata"):
            r = client.get(target.gateway.url + path)
            assert r.status_code in (400, 404) and r.json()["error"], (path, r.status_code, r.text[:300])
    assert target.archive.requests == [], target.archive.requests


def test_nothing_refused_was_audited_as_a_success(target: Target, tokens):
    """A valid search afterwards reaches the archive (the fake archive does record) and is the only
    success in the audit trail: none of the refused requests above was recorded as one."""
    target.archive.requests.clear()
    marker = f"EDGES-{uuid.uuid4().hex[:8]}"
    r = httpx.get(f"{target.gateway.url}/dicom-web/studies", params={"PatientID": marker},
                  headers=bearer(tokens["rita"]), timeout=30)
    assert r.status_code == 200, r.text
    assert len(target.archive.requests) == 1 and marker in target.archive.requests[0]["path"]
    docs = target.audit.wait_for(1, **{"event.id": "110112", "event.outcome": "0"})
    successes = [d for event in SUCCESS_EVENTS for d in target.audit.search(**{"event.id": event})
                 if d["event.outcome"] == 0]
    assert len(docs) == 1 and len(successes) == 1, dump(successes)
