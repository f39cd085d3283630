"""Helpers for the attacks on the gateway's HTTP edge (issue 12 items 5, 6, 9, 13): a fake archive
that records what reaches it, a client that streams a body from a generator and stops as soon as the
server answers, and gateways of a module's own (fresh memory high-water mark, a private audit index).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.integration.conftest import (
    AuditIndex,
    Gateway,
    Stack,
    _free_port,
    _reset_database,
    drop_prefix,
    start_gateway,
    stop_gateway,
)

MiB = 1024 * 1024


# -- a fake archive ----------------------------------------------------------------------------------------

@dataclass
class FakeArchive:
    """An HTTP server standing where Orthanc stands. Every request is recorded; QIDO answers are
    chosen by the ``PatientID`` query parameter (``answers``), otherwise an empty JSON array."""

    url: str
    requests: list[dict] = field(default_factory=list)
    answers: dict[str, tuple[str, bytes]] = field(default_factory=dict)


@contextmanager
def fake_archive(answers: dict[str, tuple[str, bytes]] | None = None) -> Iterator[FakeArchive]:
    archive = FakeArchive(url="", answers=dict(answers or {}))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            archive.requests.append({"method": self.command, "path": self.path})
            query = parse_qs(urlsplit(self.path).query)
            content_type, body = archive.answers.get((query.get("PatientID") or [""])[0],
                                                     ("application/dicom+json", b"[]"))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
    archive.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield archive
    finally:
        server.shutdown()
        server.server_close()


# -- gateways of a module's own -----------------------------------------------------------------------------

@contextmanager
def own_gateway(stack: Stack, tmp: Path, name: str, **extra_env: str) -> Iterator[tuple[Gateway, AuditIndex]]:
    """A gateway process of the caller's own (SQLite database, private index prefix, dropped after)."""
    prefix = f"test-{name}-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp / f'{name}.db'}"
    _reset_database(db)
    gw = start_gateway(stack, tmp, database_url=db, index_prefix=prefix, extra_env=extra_env)
    try:
        yield gw, AuditIndex(stack.es_url, prefix)
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)


# -- a client that streams a body and stops when the server answers ------------------------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Body bytes the client had sent when it saw the answer (or could send no more).
    sent: int

    def json(self) -> dict:
        return json.loads(self.body)  # type: ignore[no-any-return]


def zeros(total: int, chunk: int = MiB) -> Iterator[bytes]:
    """``total`` bytes of a JSON-ish filler, produced chunk by chunk: never held whole."""
    block = b" " * chunk
    left = total
    while left > 0:
        n = min(chunk, left)
        yield block[:n]
        left -= n


def stream_request(url: str, method: str, path: str, *, headers: dict[str, str], chunks: Iterable[bytes],
                   length: int | None, local_address: str | None = None, timeout: float = 120) -> Answer:
    """Send ``method path`` with a body taken from ``chunks``: with ``Content-Length: length``, or
    chunked (no Content-Length) when ``length`` is None. Stops sending as soon as the server answers
    (or stops reading), then reads the answer."""
    u = urlsplit(url)
    assert u.hostname and u.port
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout,
                                    source_address=(local_address, 0) if local_address else None)
    head = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close"]
    head.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    head += [f"{k}: {v}" for k, v in headers.items()]
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        sock.settimeout(10)  # a server that stopped reading without answering: stop sending, read
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server has answered (or closed): send no more
            sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        else:
            if length is None:
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        body = response.read()
    finally:
        sock.close()
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body, sent)


def request_from(local_address: str) -> Callable[..., httpx.Response]:
    """An httpx request function whose connections come from ``local_address`` (any 127.x works on Linux)."""

    def send(method: str, url: str, **kwargs: object) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=local_address), timeout=60) as client:
            return client.request(method, url, **kwargs)  # type: ignore[arg-type]

    return send
