"""The HTTP edge's pure logic (compliance/api/edge.py): which source address a request is recorded under.
Authentication before the body and the body cap are tested end to end in tests/security."""

from __future__ import annotations

import pytest

from compliance.api.edge import Edge

SECRET = "9f2c4e7a1b3d5f60718293a4b5c6d7e8"


def client_of(*headers: tuple[str, str], peer: str = "127.0.0.1") -> tuple[str, int]:
    scope = {"type": "http", "client": (peer, 51234),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    Edge(front_secret=SECRET, max_body_bytes=1024).resolve_client(scope)
    return scope["client"]  # type: ignore[return-value]


def test_the_front_names_the_client_next_to_its_secret():
    assert client_of(("X-Compliance-Front", SECRET), ("X-Forwarded-For", "192.0.2.7"))[0] == "192.0.2.7"
    assert client_of(("X-Compliance-Front", SECRET), ("X-Forwarded-For", "2001:db8::1"))[0] == "2001:db8::1"


@pytest.mark.parametrize("headers", [
    [("X-Forwarded-For", "203.0.113.9")],
    [("X-Compliance-Front", "nginx"), ("X-Forwarded-For", "203.0.113.9")],
    [("X-Compliance-Front", SECRET + "x"), ("X-Forwarded-For", "203.0.113.9")],
    [("X-Compliance-Front", SECRET), ("X-Compliance-Front", SECRET), ("X-Forwarded-For", "203.0.113.9")],
    [("X-Compliance-Front", SECRET), ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "10.0.0.1")],
    [("X-Compliance-Front", SECRET), ("X-Forwarded-For", "203.0.113.9, 10.0.0.1")],
    [("X-Compliance-Front", SECRET), ("X-Forwarded-For", "not-an-address")],
    [("X-Compliance-Front", SECRET)],
    [("Forwarded", "for=203.0.113.9"), ("X-Real-IP", "203.0.113.9")],
])
def test_anything_else_is_the_tcp_peer(headers):
    assert client_of(*headers, peer="127.0.0.7") == ("127.0.0.7", 51234)


def test_no_secret_configured_believes_nobody():
    scope = {"type": "http", "client": ("127.0.0.7", 1),
             "headers": [(b"x-compliance-front", b""), (b"x-forwarded-for", b"203.0.113.9")]}
    Edge(front_secret="", max_body_bytes=1024).resolve_client(scope)
    assert scope["client"] == ("127.0.0.7", 1)


@pytest.mark.parametrize("path", ["/dicom-web/studies\n", "/dicom-web/studies/1.2\r/metadata", "/api/v1/x\x00",
                                  "/metrics\x7f", "/\x1b[2J"])
def test_a_control_character_in_the_path_is_refused(path):
    scope = {"type": "http", "path": path, "client": ("127.0.0.1", 1), "headers": []}
    refused = Edge(front_secret=SECRET, max_body_bytes=1024).screen(scope)
    assert refused is not None and refused.code == "invalid_request"


def test_an_ordinary_path_passes():
    scope = {"type": "http", "path": "/dicom-web/studies/1.2.3/series", "client": ("127.0.0.1", 1), "headers": []}
    assert Edge(front_secret=SECRET, max_body_bytes=1024).screen(scope) is None
