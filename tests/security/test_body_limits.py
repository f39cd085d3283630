"""Issue 12 item 6: no body is read before the token is checked, and request bodies are capped.

The attack: a 200 MiB JSON body without a token, sent to any API route. FastAPI parses a route's body
model before its dependencies run, so the gateway read (and grew by ~600 MiB for) the whole body
before answering 400. Now every route but health answers 401 before a byte of the body is read;
a JSON body over ``COMPLIANCE_API_MAX_BODY_BYTES`` (1 MiB) is 413 in JSON, with or without a
Content-Length; and the nginx front refuses bodies over the same limits (STOW-RS over
``COMPLIANCE_STOW_MAX_BYTES``) before they reach the gateway.

Each test's gateway is its own (a fresh memory high-water mark); bodies come from a generator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import _free_port, peak_rss_mb
from tests.integration.test_front import Front, start_front, stop_front

from .conftest import Gateway, Stack, bearer
from .edges_support import MiB, own_gateway, stream_request, zeros

JSON = {"Content-Type": "application/json"}
BIG = 200 * MiB
#: Routes of every router that take a JSON body, and a plain POST without one.
BODY_ROUTES = [
    "/api/v1/exports",
    "/api/v1/exports/reidentifications",
    "/api/v1/exports/00000000-0000-0000-0000-000000000000/approve",
    "/api/v1/keys/shred",
    "/api/v1/keys/rotate",
    "/api/v1/audit/alerts/00000000-0000-0000-0000-000000000000",
    "/api/v1/nowhere",
]
#: The test gateway's STOW-RS limit (tests/integration/conftest.py start_gateway).
STOW_LIMIT = 8 * MiB


@dataclass
class Edge:
    gateway: Gateway
    front: Front


@pytest.fixture(scope="module")
def edge(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edges-body")
    with own_gateway(stack, tmp, "edges-body") as (gw, _audit):
        front = start_front(gw, tmp, "body-front", _free_port())
        try:
            yield Edge(gw, front)
        finally:
            stop_front(front)


def _assert_json_error(answer, status: int, error: str) -> None:
    assert answer.status == status, (answer.status, answer.body[:500])
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    assert json.loads(answer.body)["error"] == error, answer.body[:500]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_body_without_a_token_is_refused_before_it_is_read(edge: Edge, declared: bool):
    pid = edge.gateway.process.pid
    before = peak_rss_mb(pid)
    answer = stream_request(edge.gateway.url, "POST", "/api/v1/exports", headers=JSON, chunks=zeros(BIG),
                            length=BIG if declared else None)
    grown = peak_rss_mb(pid) - before
    assert grown < 40, f"the gateway's peak memory grew by {grown:.0f} MiB ({answer.sent} bytes sent)"
    _assert_json_error(answer, 401, "unauthenticated")
    assert answer.headers["www-authenticate"].startswith("Bearer"), answer.headers


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_every_route_checks_the_token_before_the_body(edge: Edge, path: str):
    """A body the route could not even parse: 401 (the token), never 400/422 (the body)."""
    answer = stream_request(edge.gateway.url, "POST", path, headers=JSON, chunks=[b"{not json"], length=9)
    _assert_json_error(answer, 401, "unauthenticated")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_authenticated_json_body_over_the_cap_is_413(edge: Edge, tokens, declared: bool):
    size = 2 * MiB
    pid = edge.gateway.process.pid
    before = peak_rss_mb(pid)
    answer = stream_request(edge.gateway.url, "POST", "/api/v1/exports",
                            headers={**JSON, **bearer(tokens["rob"])}, chunks=zeros(size, 64 * 1024),
                            length=size if declared else None)
    _assert_json_error(answer, 413, "payload_too_large")
    assert json.loads(answer.body)["detail"]["limit_bytes"] == MiB
    assert peak_rss_mb(pid) - before < 40


def test_an_authenticated_json_body_under_the_cap_is_read(edge: Edge, tokens):
    """The cap does not break a normal request: a body of almost 1 MiB, chunked, is read whole and parsed."""
    padding = " " * (MiB - 2048)
    body = json.dumps({"project": "edges", "protocol": "IRB-1", "purpose": "test", "profile": "nonexistent",
                       "cohort": {"study_uids": []}}).encode()
    body = body[:-1] + padding.encode() + b"}"
    answer = stream_request(edge.gateway.url, "POST", "/api/v1/exports", headers={**JSON, **bearer(tokens["rob"])},
                            chunks=[body[i:i + 65536] for i in range(0, len(body), 65536)], length=None)
    # parsed (the answer names the project the body asked for) and decided on its merits, not its size
    assert answer.status != 413, answer.body[:500]
    assert "edges" in answer.body.decode(), (answer.status, answer.body[:500])


def test_the_front_refuses_oversized_bodies_itself(edge: Edge):
    """nginx answers 413 before the gateway sees the request: without a token, the gateway would
    have answered 401."""
    for declared in (True, False):
        answer = stream_request(edge.front.url, "POST", "/api/v1/exports", headers=JSON, chunks=zeros(2 * MiB),
                                length=2 * MiB if declared else None)
        _assert_json_error(answer, 413, "payload_too_large")
    # STOW-RS has its own, larger limit at the front
    stow = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'}
    answer = stream_request(edge.front.url, "POST", "/dicom-web/studies", headers=stow,
                            chunks=zeros(STOW_LIMIT + MiB), length=STOW_LIMIT + MiB)
    _assert_json_error(answer, 413, "payload_too_large")
    # under it, the request reaches the gateway, which checks the token first
    answer = stream_request(edge.front.url, "POST", "/dicom-web/studies", headers=stow,
                            chunks=zeros(2 * MiB), length=2 * MiB)
    _assert_json_error(answer, 401, "unauthenticated")
    # and the gateway's own port answers the small unauthenticated body with 401, as said above
    answer = stream_request(edge.gateway.url, "POST", "/api/v1/exports", headers=JSON, chunks=zeros(2 * MiB),
                            length=2 * MiB)
    _assert_json_error(answer, 401, "unauthenticated")
