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


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\r\n", "\x00\n", " ", "/x"])
@pytest.mark.parametrize("path", [
    "/studies", f"/studies/{S}", f"/studies/{S}/series/{SE}/instances/{INST}/metadata",
    f"/studies/{S}/series/{SE}/instances/{INST}/frames/1", f"/studies/{S}/series",
])
def test_a_path_matches_whole_or_not_at_all(path, bad):
    """``$`` matched before a trailing newline: ``/studies/<uid>\\n`` passed as a retrieve of ``<uid>``."""
    assert classify("GET", path) is not None
    assert classify("GET", path + bad) is None
    if path.count("/") > 1:
        head, _, tail = path.rpartition("/")
        assert classify("GET", f"{head}/{tail}{bad}/x") is None
        assert classify("GET", f"{head}{bad}/{tail}") is None


def test_post_paths_match_whole():
    assert classify("POST", "/studies\n") is None
    assert classify("POST", f"/studies/{S}\n") is None


@pytest.mark.parametrize("uid,ok", [
    ("1.2.3", True), ("0", True), ("1." + "2" * 62, True), ("1." + "2" * 63, False), ("1.2.3\n", False),
    ("1.2.3\x00", False), ("01.2", False), ("1..2", False), (".1", False), ("1.", False), ("", False),
    ("1.\u0663", False), ("1.2.a", False),
])
def test_uids_are_dicom_uids(uid, ok):
    from compliance.dicomweb.routing import is_uid

    assert is_uid(uid) is ok
    assert (classify("GET", f"/studies/{uid}/metadata") is not None) is ok
