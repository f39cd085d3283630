"""The hash chain names every kind of tampering (pure logic over documents)."""

from __future__ import annotations

import copy

import pytest

from compliance.audit.chain import GENESIS, HASH, PREV, SEQ, extend, link_hash, verify_chain


def docs(n: int = 10) -> list[dict]:
    out = [{"event.uuid": f"u{i}", "event.id": "110112", "user.name": "alice", "patient.ids": [f"P{i}"]}
           for i in range(1, n + 1)]
    extend(0, GENESIS, out)
    return out


def test_extend_links_every_event():
    d = docs(3)
    assert [x[SEQ] for x in d] == [1, 2, 3]
    assert d[0][PREV] == GENESIS
    assert d[1][PREV] == d[0][HASH] and d[2][PREV] == d[1][HASH]
    assert link_hash(d[2][PREV], d[2]) == d[2][HASH]


def test_extend_continues_from_a_head():
    first = docs(3)
    more = [{"event.uuid": "u4"}]
    head = extend(3, first[-1][HASH], more)
    assert more[0][SEQ] == 4 and more[0][PREV] == first[-1][HASH]
    assert head == (4, more[0][HASH])
    assert verify_chain([*first, *more], start_prev=GENESIS, expected_first_seq=1).intact


def test_intact_chain():
    v = verify_chain(docs(), start_prev=GENESIS, expected_first_seq=1, expected_last_seq=10)
    assert v.intact, v.findings
    assert v.summary().startswith("intact: 10 events, seq 1..10")


def test_modified_event_is_named():
    d = docs()
    d[4]["patient.ids"] = ["SOMEONE-ELSE"]
    v = verify_chain(d, start_prev=GENESIS, expected_first_seq=1)
    assert [(f.kind, f.seq, f.uuid) for f in v.findings] == [("modified", 5, "u5")]
    assert "BROKEN at seq 5" in v.summary()


def test_deleted_event_is_named():
    d = docs()
    del d[3]
    v = verify_chain(d, start_prev=GENESIS, expected_first_seq=1)
    assert [(f.kind, f.seq) for f in v.findings] == [("deleted", 4)]


def test_deleted_first_and_last_events_are_named():
    d = docs()
    v = verify_chain(d[1:-1], start_prev=GENESIS, expected_first_seq=1, expected_last_seq=10)
    assert [(f.kind, f.seq) for f in v.findings] == [("deleted", 1), ("deleted", 10)]


def test_inserted_event_is_named():
    d = docs()
    forged = {"event.uuid": "forged", "event.id": "110112"}
    v = verify_chain([*d[:5], forged, *d[5:]], start_prev=GENESIS, expected_first_seq=1)
    assert [(f.kind, f.uuid) for f in v.findings] == [("inserted", "forged")]


def test_inserted_event_with_a_copied_position_is_named():
    d = docs()
    forged = copy.deepcopy(d[5])
    forged["event.uuid"] = "forged"
    v = verify_chain([*d[:6], forged, *d[6:]], start_prev=GENESIS, expected_first_seq=1)
    assert ("duplicated", 6, "forged") in [(f.kind, f.seq, f.uuid) for f in v.findings]


def test_reordered_events_are_named():
    d = docs()
    d[2][SEQ], d[6][SEQ] = d[6][SEQ], d[2][SEQ]  # swap two events' positions
    d.sort(key=lambda x: x[SEQ])
    v = verify_chain(d, start_prev=GENESIS, expected_first_seq=1)
    kinds = {(f.kind, f.uuid) for f in v.findings}
    assert ("reordered", "u3") in kinds and ("reordered", "u7") in kinds


def test_a_document_stored_under_another_id_is_named():
    d = docs(3)
    d[1]["_id"] = "u3"
    d[0]["_id"] = "u1"
    v = verify_chain(d, start_prev=GENESIS, expected_first_seq=1)
    assert [(f.kind, f.seq) for f in v.findings] == [("modified", 2)]


@pytest.mark.parametrize("field", ["event.id", "user.name", SEQ, PREV])
def test_any_field_change_breaks_the_chain(field):
    d = docs()
    d[7][field] = 99 if field == SEQ else "x"
    assert not verify_chain(d, start_prev=GENESIS, expected_first_seq=1).intact


def test_serialized_extension_stores_the_same_document_it_hashed():
    import json

    from compliance.audit.chain import extend_serialized

    plain = [{"event.uuid": f"u{i}", "user.name": "\u00e9l\u00e8ve \"q\"", "n": [i, None]} for i in range(5)]
    twin = copy.deepcopy(plain)
    head = extend(0, GENESIS, plain)
    seq, last, texts = extend_serialized(0, GENESIS, twin)
    assert (seq, last) == head
    assert [json.loads(t) for t in texts] == plain == twin
    assert verify_chain([json.loads(t) for t in texts], start_prev=GENESIS, expected_first_seq=1).intact


@pytest.mark.parametrize("value", [
    "plain", "\u00e9\u4e2d\U0001f600", 'quote " back \\ slash /', "ctl \x00\x01\x1f\x7f \n\r\t\b\f",
    "\u2028\u2029", 0, -1, 2**63 - 1, True, False, None, [], {}, ["a", ["b", {"z": 1, "a": None}]],
])
def test_canonical_form_is_the_standard_librarys(value):
    """The chain's bytes must not depend on which JSON library computed them (a verifier may lack orjson)."""
    import json

    from compliance.audit.chain import canonical

    doc = {"z": value, "a": 1, "m": {"y": value, "b": [value]}}
    assert canonical(doc) == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_canonical_form_of_real_audit_documents_is_the_standard_librarys():
    import json

    from compliance.audit.atna import AuditSource
    from compliance.audit.chain import canonical
    from compliance.audit.codes import Outcome
    from compliance.audit.documents import to_document
    from compliance.audit.events import query_event
    from compliance.audit.message import PatientRef, UserRef

    source = AuditSource(source_id="gw", enterprise_site_id="site")
    user = UserRef(user_id="s", username="\u00e9l\u00e8ve", client_id="c", roles=("r",), source_address="::1")
    docs = [to_document(query_event(user=user, gateway_id="gw", outcome=Outcome.SUCCESS, query=b"PatientID=\x00\xff",
                                    sop_class_uid=None, patients=[PatientRef("P1", "M\u00fcller^J\u00fcrgen")],
                                    resource="/dicom-web/studies"), source)]
    for doc in docs:
        assert canonical(doc) == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_values_orjson_refuses_fall_back_to_the_standard_library():
    import json

    from compliance.audit.chain import canonical

    doc = {"big": 2**70, "b": "x"}
    assert canonical(doc) == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
