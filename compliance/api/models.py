"""What the JSON routes answer, as pydantic models: the OpenAPI document (``/api/openapi.json``)
describes each answer from these.

The models only describe and order what the services return; they add, drop and rename nothing.
Each declares its fields in the order the body has always had them, and a field the body always
carries is declared even when its value is ``null``. A value the gateway passes through without
shaping it (an audit document, a request's cohort, a delivery record) is a ``JsonValue``. Errors
are not here: they go through :mod:`compliance.api.errors`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, JsonValue

JsonObject = dict[str, JsonValue]


# --------------------------------------------------------------------------- health

class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok"]
    #: None when this process ships no audit events; "degraded" after a failed delivery attempt.
    audit_shipper: Literal["ok", "degraded"] | None


# --------------------------------------------------------------------------- audit (privacy officer)

class AuditEventPage(BaseModel):
    events: list[JsonObject] = Field(description="The audit documents as stored in the repository.")
    count: int
    total: int
    total_is_exact: bool
    next_cursor: str | None


class ReviewItem(BaseModel):
    """A detection finding in the review queue (``compliance.audit.review.ReviewItem.to_json_obj``)."""

    id: int
    rule: str
    alert_uuid: str
    detected_at: str | None
    user: str | None
    patient: str | None
    summary: str
    evidence: list[str]
    status: str
    acknowledged_by: str | None
    acknowledged_at: str | None
    note: str | None


class ReviewQueuePage(BaseModel):
    alerts: list[ReviewItem]
    count: int
    next_after: int | None


# --------------------------------------------------------------------------- exports

class Person(BaseModel):
    id: str
    username: str | None


class Requester(Person):
    #: How the requester belonged to the project when asking (``"user rob"``, ``"group /research"``).
    membership: str | None


class ExportProgress(BaseModel):
    percent: float
    total: int
    processed: int
    released: int
    held_back: int
    errors: int


class ExportRequestView(BaseModel):
    """An export request as the API shows it (``compliance.exports.requests.ExportRequests.present``)."""

    id: str
    state: str
    project: str
    protocol: str
    purpose: str
    profile: str
    cohort: JsonObject
    destination: JsonObject
    requester: Requester
    approver: Person | None
    comment: str | None
    created_at: str | None
    decided_at: str | None
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    progress: ExportProgress
    checksum_sha256: str | None
    bundle_size: int | None
    error: str | None
    delivery: JsonObject | None
    attempts: int
    dispatched_at: str | None
    project_registration: JsonObject


class Dispatch(BaseModel):
    status: str
    detail: str


class ApprovedExport(ExportRequestView):
    """An approved request, and what became of handing it to the job queue."""

    dispatch: Dispatch


class ExportRequestList(BaseModel):
    items: list[ExportRequestView]


class BundleDestination(BaseModel):
    name: Literal["bundle"]
    kind: Literal["bundle"]
    description: str


class ArchiveDestination(BaseModel):
    """A research archive of the server's allow-list (``DicomwebDestination.public``): never a credential."""

    name: str
    kind: Literal["dicomweb"]
    description: str
    url: str
    #: The projects that may use it; None: any project.
    projects: list[str] | None


class DestinationList(BaseModel):
    items: list[Annotated[BundleDestination | ArchiveDestination, Field(discriminator="kind")]]


class ProjectMembers(BaseModel):
    groups: list[str]
    users: list[str]


class ProjectView(BaseModel):
    """A registered project (``compliance.exports.projects.Project.public``)."""

    id: str
    registered: bool
    title: str
    description: str
    protocols: list[str]
    closed: bool
    members: ProjectMembers


class ProjectList(BaseModel):
    items: list[ProjectView]


class ReidentificationView(BaseModel):
    """A re-identification request (``compliance.exports.reidentification.reidentification_status``)."""

    id: str
    state: str
    project: str
    kind: str
    pseudonym: str
    reason: str
    requester: Person
    approver: Person | None
    comment: str | None
    created_at: str | None
    decided_at: str | None
    revealed_at: str | None


class RevealedReidentification(ReidentificationView):
    #: The original value the pseudonym stands for; revealed once, to the requester.
    original: str


# --------------------------------------------------------------------------- archive keys

class KekView(BaseModel):
    id: str
    provider: str
    state: str
    created_at: str | None
    retired_at: str | None
    destroyed_at: str | None
    data_keys: int
    in_provider: bool


class KeyStatus(BaseModel):
    provider: JsonObject
    keks: list[KekView]
    live_data_keys: int
    shredded_data_keys: int
    integrity_failures: int


class KeyRotation(BaseModel):
    active_kek_id: str


class KeyRewrap(BaseModel):
    rewrapped: int
    already_current: int
    active_kek_id: str


class KekStateChange(BaseModel):
    kek_id: str
    state: str


class ShredRequestView(BaseModel):
    """A two-person crypto-shred request (``compliance.archive.shred.ShredRequests.as_json``)."""

    id: str
    state: str
    patient_id: str
    reason: str
    requested_by: Person
    requested_at: str | None
    decided_by: Person | None
    decided_at: str | None
    comment: str | None
    executed_at: str | None


class ShredOutcome(BaseModel):
    patient_id: str
    #: Data keys destroyed; None when the archive's answer was lost and the state was read back.
    destroyed: int | None
    state: str
    studies: list[str]
    index_removed: bool


class ExecutedShred(ShredRequestView):
    shred: ShredOutcome


class ShredRequestList(BaseModel):
    requests: list[ShredRequestView]
