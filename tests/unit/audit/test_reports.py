"""Report rows from real event documents, the CSV and the patient-facing PDF."""

from __future__ import annotations

import csv
import io
import re
import zlib
from datetime import UTC, datetime

import pytest

from compliance.audit.atna import AuditSource
from compliance.audit.codes import Action, EventTypeCode, Outcome
from compliance.audit.documents import to_document
from compliance.audit.events import export_event, instances_accessed_event, query_event, security_alert_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.audit.reports import (
    AccessRow,
    DisclosureRow,
    Report,
    ReportKind,
    ReportService,
    SecurityRow,
    render,
    six_years_before,
)
from compliance.errors import InvalidRequest

SOURCE = AuditSource(source_id="compliance-gateway", enterprise_site_id="demo-hospital")
ALICE = UserRef("sub-alice", "alice", "ohif-viewer", ("clinician",), "10.0.0.1")
P1 = PatientRef("PAT-1", "Doe^Jane")
P2 = PatientRef("PAT-2", "Roe^Richard")
S1 = StudyRef("1.2.3.1")
S2 = StudyRef("1.2.3.2")
WHEN = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def doc(event) -> dict:
    return to_document(event, SOURCE)


def test_access_row_keeps_only_the_reported_patient() -> None:
    d = doc(query_event(user=ALICE, gateway_id="gw", outcome=Outcome.SUCCESS, query=b"q", sop_class_uid=None,
                        patients=[P1, P2], studies=[S1, S2], occurred_at=WHEN))
    row = AccessRow.from_document(d, only_patient="PAT-1")
    assert (row.patients, row.studies) == ("PAT-1", "")
    assert (row.time, row.user_name, row.roles, row.source_address) == ("2025-03-03T09:00:00Z", "alice",
                                                                         "clinician", "10.0.0.1")
    assert row.what == "Searched the image archive"
    full = AccessRow.from_document(d)
    assert (full.patients, full.studies) == ("PAT-1 PAT-2", "1.2.3.1 1.2.3.2")


def test_break_glass_access_is_flagged() -> None:
    d = doc(instances_accessed_event(user=ALICE, gateway_id="gw", action=Action.READ, outcome=Outcome.SUCCESS,
                                     patients=[P1], studies=[S1], occurred_at=WHEN,
                                     event_type_codes=[EventTypeCode.EMERGENCY_OVERRIDE_STARTED]))
    row = AccessRow.from_document(d, only_patient="PAT-1")
    assert row.emergency and row.what == "Viewed images (emergency access)"
    assert row.studies == "1.2.3.1"
    assert DisclosureRow.from_document(d).kind == "break-glass"


def test_disclosure_rows() -> None:
    export = DisclosureRow.from_document(doc(export_event(
        user=ALICE, recipient="mailto:irb@x.example", purpose="HRESCH", patients=[P1], studies=[S1, S2],
        occurred_at=WHEN)))
    assert (export.kind, export.recipient, export.purpose, export.disclosed_by) == (
        "export", "mailto:irb@x.example", "HRESCH", "alice")
    assert export.description == "Copy of 2 imaging studies exported"
    reid = DisclosureRow.from_document(doc(security_alert_event(
        user=ALICE, gateway_id="gw", alert_type=EventTypeCode.USE_OF_RESTRICTED_FUNCTION, description="R-1",
        resource="urn:x", patients=[P1], occurred_at=WHEN)))
    assert reid.kind == "re-identification" and reid.description.endswith(": R-1")


def test_security_row_names_the_resource_not_the_patient() -> None:
    row = SecurityRow.from_document(doc(security_alert_event(
        user=None, gateway_id="gw", alert_type=EventTypeCode.AUTHENTICATION_DECISION, description="bad token",
        resource="/dicom-web/studies", source_address="10.9.9.9", alternative_user_id="=cmd|x",
        patients=[P1], occurred_at=WHEN)))
    assert (row.resource, row.unverified_claim, row.patients) == ("/dicom-web/studies", "=cmd|x", "PAT-1")


def report(kind: ReportKind, rows: list) -> Report:
    return Report(kind=kind, title="t", organization="Demo Hospital", period_start=datetime(2019, 3, 1, tzinfo=UTC),
                  period_end=datetime(2025, 3, 1, tzinfo=UTC), generated_at=WHEN, rows=rows,
                  subject={"patient": "PAT-1"})


def test_csv_quotes_and_defuses_formulas() -> None:
    row = SecurityRow.from_document(doc(security_alert_event(
        user=None, gateway_id="gw", alert_type=EventTypeCode.AUTHENTICATION_DECISION, description="a, \"b\"",
        resource="/x", alternative_user_id="=HYPERLINK(1)", occurred_at=WHEN)))
    out = render(report(ReportKind.SECURITY, [row]), "csv").decode()
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert parsed[0]["unverified_claim"] == "'=HYPERLINK(1)"
    assert parsed[0]["description"] == 'a, "b"'
    assert out.splitlines()[0].startswith("time,event_uuid,alert_type")


def pdf_text(data: bytes) -> str:
    parts = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            parts.append(zlib.decompress(m.group(1)).decode("latin-1"))
        except zlib.error:
            parts.append(m.group(1).decode("latin-1"))
    return "\n".join(parts)


def test_pdf_for_the_patient() -> None:
    d = doc(query_event(user=ALICE, gateway_id="gw", outcome=Outcome.SUCCESS, query=b"q", sop_class_uid=None,
                        patients=[P1, P2], studies=[S1, S2], occurred_at=WHEN))
    data = render(report(ReportKind.PATIENT_ACCESS, [AccessRow.from_document(d, only_patient="PAT-1")]), "pdf")
    assert data.startswith(b"%PDF-")
    text = pdf_text(data)
    for expected in ("PAT-1", "Demo Hospital", "alice", "Searched the image archive", "01 March 2019"):
        assert expected in text
    assert "PAT-2" not in text and "Roe" not in text and "1.2.3.2" not in text
    empty = pdf_text(render(report(ReportKind.DISCLOSURES, []), "pdf"))
    assert "Nothing was recorded for this period." in empty


def test_pdf_only_for_patient_reports() -> None:
    with pytest.raises(InvalidRequest):
        render(report(ReportKind.SECURITY, []), "pdf")
    with pytest.raises(InvalidRequest):
        render(report(ReportKind.SECURITY, []), "xlsx")


def test_six_years_back() -> None:
    assert six_years_before(datetime(2026, 11, 28, tzinfo=UTC)) == datetime(2020, 11, 28, tzinfo=UTC)
    assert six_years_before(datetime(2028, 2, 29, tzinfo=UTC)) == datetime(2022, 2, 28, tzinfo=UTC)


class ListQueries:
    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs
        self.searches: list = []

    def iterate(self, search, *, order="asc", limit=None, **_):
        self.searches.append(search)
        yield from self.docs[:limit]


def test_service_defaults_and_truncation() -> None:
    d = doc(query_event(user=ALICE, gateway_id="gw", outcome=Outcome.SUCCESS, query=b"q", sop_class_uid=None,
                        patients=[P1], studies=[S1], occurred_at=WHEN))
    queries = ListQueries([d] * 5)
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    service = ReportService(queries, organization="Org", clock=lambda: now, max_rows=3)  # type: ignore[arg-type]
    rep = service.run("disclosures", patient="PAT-1")
    assert (rep.period_start, rep.period_end) == (datetime(2020, 11, 28, 12, 0, tzinfo=UTC), now)
    assert rep.truncated and len(rep.rows) == 3
    assert service.run("security").period_start == datetime(2026, 10, 29, 12, 0, tzinfo=UTC)
    for kind, kwargs in [("patient-access", {}), ("user-activity", {}), ("nope", {})]:
        with pytest.raises(InvalidRequest):
            service.run(kind, **kwargs)
