"""The privacy officer's HIPAA reports over the audit trail, as row models rendered to JSON, CSV and PDF.

Four reports (:class:`ReportKind`), each a query over the flat document fields
(``audit/elasticsearch/README.md``) turned into rows:

* **patient access** (45 CFR 164.312(b), 164.308(a)(1)(ii)(D)): every access to one patient's
  images: who (user, roles, client), when, what (query, view, retrieve, store, export, delete,
  emergency access, refused attempt), from where, with what outcome;
* **user activity**: everything one user did in a period;
* **accounting of disclosures** (45 CFR 164.528, six years back by default): date, recipient,
  description, purpose, for exports (110106), break-glass access (EventTypeCode 110127 Emergency
  Override Started, on a 110113 alert or on the access event itself) and re-identification (events
  with EventTypeCode 110132 "Use of Restricted Function" naming the patient: the convention the
  re-identification workflow records with);
* **security**: denials, security alerts and refused logins (every 110113 in the period, and every
  login Keycloak refused, as imported by ``compliance audit import-logins``).

Formats: JSON and CSV (stdlib ``csv``) for all; PDF (fpdf2, core Helvetica font, no external files)
for the two a patient may receive: the patient access report and the accounting of disclosures.
Those PDFs are written for the patient: plain-language headings, the organization and the period, the
patient's own identifier only. Events that also name other patients (a query matching several)
contribute the fact of the access, never the other patients' identifiers or their studies.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from compliance.audit.documents import document_time, document_values
from compliance.audit.queries import AuditQueryService, AuditSearch
from compliance.audit.review import SqlReviewQueue
from compliance.errors import InvalidRequest

__all__ = [
    "AccessRow",
    "DisclosureRow",
    "Report",
    "ReportFormat",
    "ReportKind",
    "ReportService",
    "SecurityRow",
    "render",
    "six_years_before",
]

#: Events that are an access to a patient's images (PS3.15 A.5.3 event IDs).
ACCESS_EVENT_IDS = ("110103", "110104", "110105", "110106", "110107", "110112")
SECURITY_ALERT = "110113"
EXPORT = "110106"
EMERGENCY_OVERRIDE = "110127"
USE_OF_RESTRICTED_FUNCTION = "110132"
PATIENT_RECORD = "110110"
ACCESS_CONTROL_DECISION = "110147"
#: Subjects of the alerts raised by detections (compliance/audit/detection/): internal review
#: material, never an access or a disclosure, so the patient-facing reports leave them out.
DETECTION_RESOURCE_PREFIX = "urn:compliance:detection:"
_NOT_A_DETECTION = {"bool": {"must_not": {"prefix": {"object.ids": DETECTION_RESOURCE_PREFIX}}}}
#: The document fields the rows are made of (fetching only these keeps large reports fast).
ROW_FIELDS = ("@timestamp", "event.uuid", "event.id", "event.name", "event.action", "event.outcome",
              "event.outcome_description", "event.type_codes", "event.type_names", "user.id", "user.name",
              "user.roles", "user.unverified_claim", "client.id", "source.address", "patient.ids", "study.uids",
              "purpose_of_use", "recipient", "object.ids")
#: Rows one report may hold; a longer report is cut and flagged ``truncated`` (narrow the period).
MAX_ROWS = 50_000


class ReportKind(enum.StrEnum):
    PATIENT_ACCESS = "patient-access"
    USER_ACTIVITY = "user-activity"
    DISCLOSURES = "disclosures"
    SECURITY = "security"


class ReportFormat(enum.StrEnum):
    JSON = "json"
    CSV = "csv"
    PDF = "pdf"


PDF_KINDS = frozenset({ReportKind.PATIENT_ACCESS, ReportKind.DISCLOSURES})

_OUTCOME_TEXT = {0: "Success", 4: "Refused or minor failure", 8: "Failed", 12: "Failed (major)"}
_PLAIN_OUTCOME = {0: "Completed", 4: "Refused", 8: "Failed", 12: "Failed"}
_ACTION_VERB = {"C": "Stored", "R": "Viewed", "U": "Changed", "D": "Deleted", "E": "Used"}


def six_years_before(moment: datetime) -> datetime:
    """45 CFR 164.528(a): the accounting covers the six years before the request."""
    try:
        return moment.replace(year=moment.year - 6)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year - 6, day=28)




def describe_access(doc: dict[str, Any]) -> str:
    """What happened, in plain words (the patient reads this in the PDF)."""
    event_id = str(doc.get("event.id"))
    types = document_values(doc, "event.type_codes")
    emergency = " (emergency access)" if EMERGENCY_OVERRIDE in types else ""
    if event_id == "110112":
        return "Searched the image archive" + emergency
    if event_id == "110103":
        return f"{_ACTION_VERB.get(str(doc.get('event.action')), 'Used')} images" + emergency
    if event_id == "110104":
        return "Opened images (copy sent to the viewer)" + emergency
    if event_id == "110107":
        return "Stored new images"
    if event_id == "110105":
        return "Deleted images"
    if event_id == EXPORT:
        return "Exported images"
    if event_id == SECURITY_ALERT:
        if EMERGENCY_OVERRIDE in types:
            return "Emergency access started (break-the-glass)"
        if ACCESS_CONTROL_DECISION in types:
            return "Attempted access, refused"
        return "Security alert: " + ", ".join(document_values(doc, "event.type_names"))
    return str(doc.get("event.name") or event_id)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class AccessRow:
    """One access (patient access report, user activity report)."""

    time: str
    event_uuid: str
    event_id: str
    event_name: str
    what: str
    user_id: str
    user_name: str
    roles: str
    client_id: str
    source_address: str
    outcome: int
    outcome_text: str
    patients: str
    studies: str
    purpose_of_use: str
    emergency: bool

    @classmethod
    def from_document(cls, doc: dict[str, Any], *, only_patient: str | None = None) -> AccessRow:
        patients = document_values(doc, "patient.ids")
        studies = document_values(doc, "study.uids")
        if only_patient is not None:
            # Other patients named by the same event (a query matching several) are not this
            # patient's data: keep the fact of the access, drop their identifiers and studies.
            studies = studies if patients == [only_patient] else []
            patients = [only_patient]
        return cls(
            time=document_time(doc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            event_uuid=str(doc.get("event.uuid") or ""),
            event_id=str(doc.get("event.id") or ""),
            event_name=str(doc.get("event.name") or ""),
            what=describe_access(doc),
            user_id=str(doc.get("user.id") or ""),
            user_name=str(doc.get("user.name") or doc.get("user.id") or doc.get("user.unverified_claim") or ""),
            roles=" ".join(document_values(doc, "user.roles")),
            client_id=str(doc.get("client.id") or ""),
            source_address=str(doc.get("source.address") or ""),
            outcome=int(doc.get("event.outcome") or 0),
            outcome_text=_OUTCOME_TEXT.get(int(doc.get("event.outcome") or 0), str(doc.get("event.outcome"))),
            patients=" ".join(patients),
            studies=" ".join(studies),
            purpose_of_use=" ".join(document_values(doc, "purpose_of_use")),
            emergency=EMERGENCY_OVERRIDE in document_values(doc, "event.type_codes"),
        )


@dataclass(frozen=True)
class DisclosureRow:
    """One entry of the accounting of disclosures (45 CFR 164.528(b)(2))."""

    date: str
    kind: str
    recipient: str
    description: str
    purpose: str
    disclosed_by: str
    event_uuid: str

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> DisclosureRow:
        event_id = str(doc.get("event.id"))
        types = document_values(doc, "event.type_codes")
        user = str(doc.get("user.name") or doc.get("user.id") or "")
        purposes = ", ".join(document_values(doc, "purpose_of_use"))
        note = str(doc.get("event.outcome_description") or "")
        if event_id == EXPORT:
            n = len(document_values(doc, "study.uids"))
            kind = "export"
            recipient = str(doc.get("recipient") or "")
            description = f"Copy of {n} imaging stud{'y' if n == 1 else 'ies'} exported"
            purpose = purposes or "not stated"
        elif EMERGENCY_OVERRIDE in types:
            kind = "break-glass"
            recipient = user
            description = "Emergency access to images without prior authorization (break-the-glass)"
            purpose = purposes or "emergency treatment"
        else:
            kind = "re-identification"
            recipient = user
            description = "A research pseudonym was linked back to the patient (re-identification)"
            purpose = purposes or "not stated"
        if note and kind != "export":
            description = f"{description}: {note}"
        return cls(date=document_time(doc).isoformat(timespec="seconds").replace("+00:00", "Z"), kind=kind,
                   recipient=recipient, description=description, purpose=purpose, disclosed_by=user,
                   event_uuid=str(doc.get("event.uuid") or ""))


@dataclass(frozen=True)
class SecurityRow:
    """One denial or security alert (110113), or one login Keycloak refused (110114, imported)."""

    time: str
    event_uuid: str
    alert_type: str
    user_name: str
    unverified_claim: str
    source_address: str
    resource: str
    description: str
    outcome: int
    patients: str

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> SecurityRow:
        objects = document_values(doc, "object.ids")
        patients = document_values(doc, "patient.ids")
        studies = set(document_values(doc, "study.uids"))
        resource = next((o for o in objects if o not in patients and o not in studies), "")
        return cls(
            time=document_time(doc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            event_uuid=str(doc.get("event.uuid") or ""),
            alert_type=", ".join(document_values(doc, "event.type_names")),
            user_name=str(doc.get("user.name") or doc.get("user.id") or ""),
            unverified_claim=str(doc.get("user.unverified_claim") or ""),
            source_address=str(doc.get("source.address") or ""),
            resource=resource,
            description=str(doc.get("event.outcome_description") or ""),
            outcome=int(doc.get("event.outcome") or 0),
            patients=" ".join(patients),
        )


Row = AccessRow | DisclosureRow | SecurityRow


@dataclass
class Report:
    kind: ReportKind
    title: str
    organization: str
    period_start: datetime
    period_end: datetime
    generated_at: datetime
    rows: list[Row]
    #: What the report is about: ``{"patient": "..."}``, ``{"user": "..."}`` or ``{}``.
    subject: dict[str, str] = field(default_factory=dict)
    truncated: bool = False

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "report": self.kind.value,
            "title": self.title,
            "organization": self.organization,
            "subject": self.subject,
            "period": {"from": _iso(self.period_start), "to": _iso(self.period_end)},
            "generated_at": _iso(self.generated_at),
            "count": len(self.rows),
            "truncated": self.truncated,
            "rows": [asdict(r) for r in self.rows],
        }


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- the service


class ReportService:
    """Builds the reports from the audit repository. Reading is audited by the caller (110101)."""

    def __init__(self, queries: AuditQueryService, *, organization: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), max_rows: int = MAX_ROWS) -> None:
        self._queries = queries
        self.organization = organization
        self._clock = clock
        self._max_rows = max_rows

    def run(self, kind: ReportKind | str, *, patient: str | None = None, user: str | None = None,
            start: datetime | None = None, end: datetime | None = None) -> Report:
        try:
            kind = ReportKind(kind)
        except ValueError as exc:
            raise InvalidRequest(f"unknown report {kind!r}; one of {', '.join(k.value for k in ReportKind)}") from exc
        if kind in (ReportKind.PATIENT_ACCESS, ReportKind.DISCLOSURES) and not patient:
            raise InvalidRequest(f"the {kind.value} report needs a patient")
        if kind is ReportKind.USER_ACTIVITY and not user:
            raise InvalidRequest("the user-activity report needs a user")
        now = self._clock()
        end = end or now
        if kind in (ReportKind.PATIENT_ACCESS, ReportKind.DISCLOSURES):
            start = start or six_years_before(end)
        else:
            start = start or end - timedelta(days=30)
        if kind is ReportKind.PATIENT_ACCESS:
            return self.patient_access(str(patient), start, end)
        if kind is ReportKind.USER_ACTIVITY:
            return self.user_activity(str(user), start, end)
        if kind is ReportKind.DISCLOSURES:
            return self.disclosures(str(patient), start, end)
        return self.security(start, end)

    def patient_access(self, patient_id: str, start: datetime, end: datetime) -> Report:
        search = AuditSearch(patients=(patient_id,), start=start, end=end, extra_filters=(
            {"bool": {"should": [
                {"terms": {"event.id": list(ACCESS_EVENT_IDS)}},
                {"bool": {"filter": [{"term": {"event.id": SECURITY_ALERT}},
                                     {"terms": {"event.type_codes": [ACCESS_CONTROL_DECISION, EMERGENCY_OVERRIDE]}}]}},
            ], "minimum_should_match": 1}}, _NOT_A_DETECTION))
        rows, truncated = self._rows(search, lambda d: AccessRow.from_document(d, only_patient=patient_id))
        return self._report(ReportKind.PATIENT_ACCESS, "Record of access to your medical images", rows, truncated,
                            start, end, {"patient": patient_id})

    def user_activity(self, user: str, start: datetime, end: datetime) -> Report:
        search = AuditSearch(users=(user,), start=start, end=end)
        rows, truncated = self._rows(search, AccessRow.from_document)
        return self._report(ReportKind.USER_ACTIVITY, f"Activity of user {user}", rows, truncated, start, end,
                            {"user": user})

    def disclosures(self, patient_id: str, start: datetime, end: datetime) -> Report:
        search = AuditSearch(patients=(patient_id,), start=start, end=end, extra_filters=(
            {"bool": {"should": [
                # an export as it left (a push's failure follow-up, outcome 4/8, is no second disclosure)
                {"bool": {"filter": [{"term": {"event.id": EXPORT}}, {"term": {"event.outcome": 0}}]}},
                {"terms": {"event.type_codes": [EMERGENCY_OVERRIDE, USE_OF_RESTRICTED_FUNCTION]}},
                # a pseudonym linked back to this patient (compliance/exports/audit.py: 110110, action R)
                {"bool": {"filter": [{"term": {"event.id": PATIENT_RECORD}}, {"term": {"event.action": "R"}}]}},
            ], "minimum_should_match": 1}}, _NOT_A_DETECTION))
        rows, truncated = self._rows(search, DisclosureRow.from_document)
        return self._report(ReportKind.DISCLOSURES, "Accounting of disclosures of your medical images", rows,
                            truncated, start, end, {"patient": patient_id})

    def security(self, start: datetime, end: datetime) -> Report:
        # Every 110113, and every login Keycloak refused (imported by compliance audit import-logins;
        # one row per Keycloak event, compliance.audit.logins.refused_logins_query).
        from compliance.audit.logins import refused_logins_query

        search = AuditSearch(start=start, end=end, extra_filters=({"bool": {"minimum_should_match": 1, "should": [
            {"term": {"event.id": SECURITY_ALERT}}, refused_logins_query()]}},))
        rows, truncated = self._rows(search, SecurityRow.from_document)
        return self._report(ReportKind.SECURITY, "Denials, refused logins and security alerts", rows, truncated,
                            start, end, {})

    # ------------------------------------------------------------------ helpers

    def _rows(self, search: AuditSearch, make: Callable[[dict[str, Any]], Row]) -> tuple[list[Row], bool]:
        rows: list[Row] = []
        for doc in self._queries.iterate(search, order="asc", limit=self._max_rows + 1, source_fields=ROW_FIELDS):
            if len(rows) == self._max_rows:
                return rows, True
            rows.append(make(doc))
        return rows, False

    def _report(self, kind: ReportKind, title: str, rows: list[Row], truncated: bool, start: datetime,
                end: datetime, subject: dict[str, str]) -> Report:
        return Report(kind=kind, title=title, organization=self.organization, period_start=start,
                      period_end=end, generated_at=self._clock(), rows=rows, subject=subject, truncated=truncated)


# --------------------------------------------------------------------------- rendering

MEDIA_TYPES = {ReportFormat.JSON: "application/json", ReportFormat.CSV: "text/csv; charset=utf-8",
               ReportFormat.PDF: "application/pdf"}


def render(report: Report, fmt: ReportFormat | str) -> bytes:
    try:
        fmt = ReportFormat(fmt)
    except ValueError as exc:
        raise InvalidRequest(f"unknown format {fmt!r}; one of json, csv, pdf") from exc
    if fmt is ReportFormat.JSON:
        return json.dumps(report.to_json_obj(), ensure_ascii=False, indent=1).encode("utf-8")
    if fmt is ReportFormat.CSV:
        return to_csv(report)
    if report.kind not in PDF_KINDS:
        raise InvalidRequest(f"PDF is offered for the patient access report and the accounting of disclosures, "
                             f"not for {report.kind.value}")
    return to_pdf(report)


def _row_type(kind: ReportKind) -> type:
    return {ReportKind.PATIENT_ACCESS: AccessRow, ReportKind.USER_ACTIVITY: AccessRow,
            ReportKind.DISCLOSURES: DisclosureRow, ReportKind.SECURITY: SecurityRow}[kind]


def to_csv(report: Report) -> bytes:
    """One header line (the row model's field names), then one line per row; UTF-8, RFC 4180 quoting."""
    out = io.StringIO(newline="")
    names = [f.name for f in fields(_row_type(report.kind))]
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(names)
    for row in report.rows:
        values = asdict(row)
        writer.writerow([_csv_safe(values[n]) for n in names])
    return out.getvalue().encode("utf-8")


def _csv_safe(value: object) -> object:
    # A cell starting with = + - @ is a formula to spreadsheets (CSV injection): user-controlled
    # values (claimed usernames, descriptions) must not run when the officer opens the file.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _latin1(text: str) -> str:
    """Core PDF fonts are Latin-1: keep accents where possible, replace what cannot be shown."""
    normalized = unicodedata.normalize("NFC", text)
    try:
        normalized.encode("latin-1")
        return normalized
    except UnicodeEncodeError:
        stripped = unicodedata.normalize("NFKD", normalized)
        return stripped.encode("latin-1", "replace").decode("latin-1")


_PDF_COLUMNS: dict[ReportKind, list[tuple[str, str, float]]] = {
    ReportKind.PATIENT_ACCESS: [
        ("time", "Date and time (UTC)", 1.3), ("user_name", "Who", 1.0), ("roles", "Their role", 1.0),
        ("what", "What they did", 2.0), ("source_address", "From where (network address)", 1.3),
        ("outcome", "Result", 0.8),
    ],
    ReportKind.DISCLOSURES: [
        ("date", "Date (UTC)", 1.2), ("recipient", "Given to", 1.5), ("description", "What was disclosed", 2.6),
        ("purpose", "Why", 1.1),
    ],
}

_PDF_INTRO = {
    ReportKind.PATIENT_ACCESS: (
        "This report lists every time a person or a computer system of {org} looked at, searched for, copied, "
        "stored or tried to open your medical images during the period shown, as recorded in our audit log. "
        "It contains your own information only."
    ),
    ReportKind.DISCLOSURES: (
        "This is the accounting of disclosures of your medical images by {org} required by the HIPAA "
        "Privacy Rule (45 CFR 164.528): each time your images were given to someone outside your care, "
        "opened in an emergency without the usual authorization, or linked back to you from research data. "
        "It contains your own information only."
    ),
}


def to_pdf(report: Report) -> bytes:
    """A PDF a patient can be handed: organization, period, plain headings, their own data only."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    columns = _PDF_COLUMNS[report.kind]
    pdf = FPDF(orientation="landscape", format="A4")
    pdf.set_creation_date(report.generated_at)
    pdf.set_title(_latin1(report.title))
    pdf.set_author(_latin1(report.organization))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.alias_nb_pages()
    pdf.add_page()
    pdf.set_font("helvetica", "B", 16)
    pdf.cell(0, 10, _latin1(report.title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", size=11)
    patient = report.subject.get("patient", "")
    for line in (f"Organization: {report.organization}",
                 f"Patient identifier: {patient}",
                 f"Period: {report.period_start:%d %B %Y} to {report.period_end:%d %B %Y} (UTC)",
                 f"Prepared on: {report.generated_at:%d %B %Y}"):
        pdf.cell(0, 6, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.multi_cell(0, 5, _latin1(_PDF_INTRO[report.kind].format(org=report.organization)),
                   new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    if not report.rows:
        pdf.set_font("helvetica", "I", 11)
        pdf.cell(0, 8, "Nothing was recorded for this period.", new_x="LMARGIN", new_y="NEXT")
    else:
        pdf.set_font("helvetica", size=9)
        widths = tuple(w for _, _, w in columns)
        with pdf.table(col_widths=widths, headings_style=FontFace(emphasis="BOLD"), line_height=5,
                       text_align="LEFT") as table:
            table.row([_latin1(h) for _, h, _ in columns])
            for row in report.rows:
                values = asdict(row)
                cells = []
                for key, _, _ in columns:
                    value = values[key]
                    if key == "outcome":
                        value = _PLAIN_OUTCOME.get(int(value), str(value))
                    cells.append(_latin1(str(value or "-")))
                table.row(cells)
    if report.truncated:
        pdf.ln(2)
        pdf.cell(0, 6, "This report is incomplete: ask for a shorter period.", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    pdf.set_font("helvetica", "I", 9)
    pdf.multi_cell(0, 4, _latin1(
        f"{len(report.rows)} entr{'y' if len(report.rows) == 1 else 'ies'}. Times are in Coordinated Universal "
        f"Time (UTC). Questions about this report: contact the privacy office of {report.organization}."),
        new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def iter_rows(report: Report) -> Iterator[dict[str, Any]]:
    for row in report.rows:
        yield asdict(row)


def rows_of(report: Report, keys: Iterable[str]) -> list[tuple[Any, ...]]:
    """The rows projected on ``keys`` (tests and the CLI's table output)."""
    names = list(keys)
    return [tuple(asdict(r)[k] for k in names) for r in report.rows]


# --------------------------------------------------------------------------- wiring


@dataclass
class AuditReadServices:
    """What the privacy officer's API needs, built once by the composition root (:mod:`compliance.wiring`)."""

    queries: AuditQueryService
    reports: ReportService
    review: SqlReviewQueue
    #: The audit log as named in 110101 Audit Log Used events (ParticipantObjectID, a URI).
    audit_log_uri: str
