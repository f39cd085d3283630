from __future__ import annotations

import pytest

from compliance.dicomweb.routing import Transaction, classify

S, SE, INST = "1.2.840.113619.2.1", "1.2.840.113619.2.1.2", "1.2.840.113619.2.1.2.3"


@pytest.mark.parametrize(
    "method,path,transaction,permission",
    [
        ("GET", "/studies", Transaction.SEARCH, "dicomweb:study:search"),
        ("GET", "/series", Transaction.SEARCH, "dicomweb:study:search"),
        ("GET", "/instances", Transaction.SEARCH, "dicomweb:study:search"),
        ("GET", f"/studies/{S}/series", Transaction.SEARCH, "dicomweb:study:search"),
        ("GET", f"/studies/{S}/instances", Transaction.SEARCH, "dicomweb:study:search"),
        ("GET", f"/studies/{S}/series/{SE}/instances", Transaction.SEARCH, "dicomweb:study:search"),
        ("GET", f"/studies/{S}", Transaction.RETRIEVE, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}", Transaction.RETRIEVE, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}", Transaction.RETRIEVE, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/metadata", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/metadata", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}/metadata", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}/frames/1", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}/frames/1,2,3", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}/rendered", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/rendered", Transaction.ACCESS, "dicomweb:study:read"),
        ("GET", f"/studies/{S}/series/{SE}/thumbnail", Transaction.ACCESS, "dicomweb:study:read"),
        ("POST", "/studies", Transaction.STORE, "dicomweb:study:store"),
        ("POST", f"/studies/{S}", Transaction.STORE, "dicomweb:study:store"),
    ],
)
def test_transactions(method, path, transaction, permission):
    route = classify(method, path)
    assert route is not None
    assert route.transaction is transaction
    assert route.permission == permission
    if "/studies/" in path:
        assert route.study_uid == S


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/"),
        ("GET", "/tools/find"),
        ("GET", f"/studies/{S}/../../../instances"),
        ("GET", "/studies/01.2"),
        ("GET", "/studies/1..2"),
        ("GET", "/studies/abc"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}/frames/0"),
        ("GET", f"/studies/{S}/series/{SE}/instances/{INST}/frames/"),
        ("DELETE", f"/studies/{S}"),
        ("PUT", "/studies"),
        ("POST", f"/studies/{S}/series"),
        ("GET", "/servers"),
    ],
)
def test_anything_else_is_not_proxied(method, path):
    assert classify(method, path) is None
