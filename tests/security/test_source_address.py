"""Issue 12 item 5: a client cannot choose the source address its audit events record.

Only the nginx front (compliance/dicomweb/front.py) may tell the gateway who the client is, and only
next to the secret it shares with the gateway; anyone else is recorded at the address their TCP
connection comes from. The attack: a client of the gateway's own port (on loopback, which uvicorn
trusted by default) sends ``X-Forwarded-For`` and so writes the ``source.address`` of its events,
including the refused logins that the per-source failed-login detection counts.

Loopback has a whole /8: a client connecting from 127.0.0.7 is told apart from nginx (127.0.0.1).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.integration.conftest import _free_port, dump
from tests.integration.test_front import Front, start_front, stop_front

from .conftest import AuditIndex, Gateway, bearer
from .edges_support import request_from

FORGED = "203.0.113.9"
CLIENT = "127.0.0.7"  # a loopback address that is not nginx's


@pytest.fixture(scope="module")
def front(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """The nginx front before the session's gateway (the stack's shared front secret)."""
    tmp: Path = tmp_path_factory.mktemp("edges-front")
    fr = start_front(gateway, tmp, "source-front", _free_port())
    try:
        yield fr
    finally:
        stop_front(fr)


def _retrieve_path() -> tuple[str, str]:
    """A study nobody holds: the refused retrieve is audited (110104) and names the study."""
    study = generate_uid()
    return study, f"/dicom-web/studies/{study}"


def _one(audit: AuditIndex, **terms: str) -> dict:
    docs = audit.wait_for(1, **terms)
    assert len(docs) == 1, dump(docs)
    return docs[0]


def test_x_forwarded_for_on_the_gateways_own_port_is_not_believed(gateway: Gateway, audit: AuditIndex, tokens):
    # the loopback peer uvicorn trusted by default
    study, path = _retrieve_path()
    r = httpx.get(gateway.url + path, headers={**bearer(tokens["alice"]), "X-Forwarded-For": FORGED,
                                               "Forwarded": f"for={FORGED}", "X-Real-IP": FORGED}, timeout=30)
    assert r.status_code == 404, r.text
    doc = _one(audit, **{"event.id": "110104", "study.uids": study})
    assert doc["source.address"] == "127.0.0.1", dump(doc)

    # another loopback client, claiming to be the front without its secret
    study, path = _retrieve_path()
    r = request_from(CLIENT)("GET", gateway.url + path, headers={
        **bearer(tokens["alice"]), "X-Forwarded-For": FORGED, "X-Compliance-Front": "nginx"})
    assert r.status_code == 404, r.text
    doc = _one(audit, **{"event.id": "110104", "study.uids": study})
    assert doc["source.address"] == CLIENT, dump(doc)


def test_refused_logins_are_counted_against_the_real_address(gateway: Gateway, audit: AuditIndex):
    """Rotating X-Forwarded-For per attempt spread a password-guessing run over many 'sources'."""
    marker = f"/dicom-web/studies/{generate_uid()}"
    for i in range(3):
        r = httpx.get(gateway.url + marker, timeout=30,
                      headers={**bearer(f"not.a.token{i}"), "X-Forwarded-For": f"198.51.100.{i + 1}"})
        assert r.status_code == 401, r.text
    docs = audit.wait_for(3, **{"event.id": "110113", "object.ids": marker})
    assert len(docs) == 3, dump(docs)
    assert {d["source.address"] for d in docs} == {"127.0.0.1"}, dump(docs)


def test_through_the_front_the_clients_address_is_recorded(front: Front, audit: AuditIndex, tokens):
    send = request_from(CLIENT)
    study, path = _retrieve_path()
    r = send("GET", front.url + path, headers={**bearer(tokens["alice"]), "X-Forwarded-For": FORGED})
    assert r.status_code == 404, f"{r.text}\n{front.error_log[-2000:]}"
    doc = _one(audit, **{"event.id": "110104", "study.uids": study})
    # nginx's own connection comes from 127.0.0.1; the client's from 127.0.0.7, whatever it claims
    assert doc["source.address"] == CLIENT, dump(doc)

    marker = f"/dicom-web/studies/{generate_uid()}"
    r = send("GET", front.url + marker, headers={**bearer("not.a.token"), "X-Forwarded-For": FORGED})
    assert r.status_code == 401, r.text
    doc = _one(audit, **{"event.id": "110113", "object.ids": marker})
    assert doc["source.address"] == CLIENT, dump(doc)


def test_a_front_secret_without_a_forwarded_address_records_the_peer(gateway: Gateway, audit: AuditIndex,
                                                                     tokens):
    """The secret alone does not make a malformed address believable: the TCP peer is recorded."""
    secret = gateway.env.get("COMPLIANCE_FRONT_SECRET", "")
    assert secret, "the stack's gateway.env names no front secret"
    send = request_from(CLIENT)
    for forwarded in ("", "not-an-address", f"{FORGED}, 10.0.0.1", str(uuid.uuid4())):
        study, path = _retrieve_path()
        r = send("GET", gateway.url + path, headers={
            **bearer(tokens["alice"]), "X-Compliance-Front": secret, "X-Forwarded-For": forwarded})
        assert r.status_code == 404, r.text
        doc = _one(audit, **{"event.id": "110104", "study.uids": study})
        assert doc["source.address"] == CLIENT, (forwarded, dump(doc))
