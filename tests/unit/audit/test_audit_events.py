"""The event model's own rules (PS3.15 A.5.3 cardinalities, code values from PS3.16)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from compliance.audit.codes import Action, EventID, EventTypeCode, ObjectIDTypeCode, ObjectRole, ObjectType, Outcome
from compliance.audit.events import instances_accessed_event, instances_transferred_event, study_deleted_event
from compliance.audit.message import ActiveParticipant, AuditEvent, ParticipantObject, PatientRef, StudyRef, UserRef

USER = UserRef("sub", "alice", None, ("radiologist",), "host.example")


def test_event_ids_are_cid_400() -> None:
    assert [e.code.code for e in EventID] == [str(c) for c in range(110100, 110115)]
    assert EventID.QUERY.code.display == "Query"
    assert all(e.code.scheme == "DCM" for e in EventID)


def test_event_type_codes_match_ps3_16_cid_401() -> None:
    # Cross-check against the standard's own tables as pydicom ships them (generated from PS3.16).
    from pydicom.sr._cid_dict import cid_concepts
    from pydicom.sr._concepts_dict import concepts

    expected = {}
    for name in cid_concepts[401]["DCM"]:
        for code, (display, _cids) in concepts["DCM"][name].items():
            expected[code] = display
    ours = {c.code: c.display for c in EventTypeCode.all()}
    assert ours == expected


def test_occurred_at_must_be_aware_and_is_normalised_to_utc() -> None:
    participant = ActiveParticipant("u", is_requestor=True)
    with pytest.raises(ValueError):
        naive = datetime(2024, 1, 1)
        AuditEvent(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS, naive, participants=(participant,))
    local = datetime(2024, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    event = AuditEvent(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS, local, participants=(participant,))
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.occurred_at.hour == 23


def test_uuid_is_unique_per_event() -> None:
    p = (ActiveParticipant("u"),)
    now = datetime.now(UTC)
    a = AuditEvent(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS, now, participants=p)
    b = AuditEvent(EventID.QUERY, Action.EXECUTE, Outcome.SUCCESS, now, participants=p)
    assert a.uuid != b.uuid


def test_object_needs_exactly_one_of_name_and_query() -> None:
    kwargs = dict(id="x", type_code=ObjectType.SYSTEM_OBJECT, type_code_role=ObjectRole.REPORT,
                  id_type_code=ObjectIDTypeCode.URI)
    with pytest.raises(ValueError):
        ParticipantObject(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ParticipantObject(name="n", query=b"q", **kwargs)  # type: ignore[arg-type]


def test_single_patient_rule() -> None:
    with pytest.raises(ValueError, match="single patient"):
        instances_accessed_event(
            user=USER,
            gateway_id="gw",
            action=Action.READ,
            outcome=Outcome.SUCCESS,
            patients=[PatientRef("A"), PatientRef("B")],
            studies=[StudyRef("1.2")],
        )


def test_studies_required() -> None:
    with pytest.raises(ValueError):
        study_deleted_event(user=USER, gateway_id="gw", outcome=Outcome.SUCCESS, patients=[], studies=[])


def test_accessed_rejects_execute() -> None:
    with pytest.raises(ValueError):
        instances_accessed_event(
            user=USER, gateway_id="gw", action=Action.EXECUTE, outcome=0, patients=[], studies=[StudyRef("1")]
        )


def test_machine_name_access_point() -> None:
    event = instances_transferred_event(
        user=USER, gateway_id="gw", source_id="archive", outcome=0, patients=[], studies=[StudyRef("1")]
    )
    person = next(p for p in event.participants if p.user_id == "sub")
    assert int(person.network_access_point_type) == 1  # type: ignore[arg-type]
    # No client id: the person is the destination (Table A.5.3.7-1), the archive the source.
    assert event.objects[0].id_type_code == ObjectIDTypeCode.STUDY_INSTANCE_UID
    assert "110152" in {c.code for c in person.role_id_codes}
    assert {c.code for c in event.participants[0].role_id_codes} == {"110153"}


def test_event_ids_are_time_ordered_uuids() -> None:
    """Version 7 (RFC 9562): new ids land at the end of the outbox's unique index and of
    Elasticsearch's id terms, not at random places; each is still unique."""
    import uuid

    events = [instances_accessed_event(user=USER, gateway_id="gw", action=Action.READ, outcome=Outcome.SUCCESS,
                                       patients=[PatientRef("P1")], studies=[StudyRef("1.2.3")])
              for _ in range(2000)]
    ids = [e.uuid for e in events]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
