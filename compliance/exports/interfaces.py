"""Contracts and errors of the research-export domain.

An export request moves through one state machine (``requests.py`` and ``ledger.py`` enforce it)::

    requested ──approve──> approved ──(a worker claims it)──> running ──> ready ──(expires_at)──> expired
        │                     ^                                  │
        └──reject──> rejected └──(lease expired: the sweep)──────┤
                                                                 └──> failed (an error, or the lease
                                                                      expired after the last attempt)

``approved`` is "queued": the row is the queue's truth, the task queue only a hint
(:mod:`compliance.exports.recovery`).

A re-identification request (dual control, ``reidentification.ReidentificationService``)::

    requested ──approve (a DIFFERENT data steward)──> approved ──reveal (the requester, once)──> revealed
        └──reject──> rejected

Errors (subclasses of ``compliance.errors``)::

    PermissionDenied
    └── SelfApprovalRefused      the requester tried to approve their own request       -> 403
    NotFound
    └── ExportNotFound           no such request (or not the caller's)                   -> 404
    Gone
    └── BundleExpired            the bundle existed and has expired                       -> 410
    Conflict
    └── ExportStateConflict      the request is not in a state that allows the operation -> 409
    PermissionDenied
    └── ProjectAccessDenied      not a member of a registered project of that name (the    -> 403
                                 same whether it exists or not; projects.py)
    InvalidRequest
    └── InvalidExportRequest     a malformed cohort, profile, destination (or one not on    -> 400
        │                        the server's allow-list, policies/export-destinations.yaml)
        └── DestinationNotAllowed  the destination is restricted to other projects          -> 400
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, Required, TypedDict

from compliance.errors import Conflict, Gone, InvalidRequest, NotFound, PermissionDenied

STATES = ("requested", "approved", "rejected", "running", "ready", "failed", "expired")
REID_STATES = ("requested", "approved", "rejected", "revealed")
#: Kinds of pseudonyms the map records (what the engine replaces with keyed pseudonyms).
PSEUDONYM_KINDS = ("patient_id", "accession", "study_uid", "series_uid", "sop_uid")


class SelfApprovalRefused(PermissionDenied):
    code = "self_approval_refused"


class ExportNotFound(NotFound):
    code = "export_not_found"


class BundleExpired(Gone):
    code = "bundle_expired"


class ExportStateConflict(Conflict):
    code = "export_state_conflict"


class InvalidExportRequest(InvalidRequest):
    code = "invalid_export_request"


class DestinationNotAllowed(InvalidExportRequest):
    """The destination exists but its ``projects:`` restriction does not name the request's project."""

    code = "destination_not_allowed"


class DisclosedPatient(TypedDict):
    """A source patient whose data an export disclosed (sealed on the request, for the 110106 Export)."""

    id: str
    name: str | None


class DisclosedStudy(TypedDict):
    """A source study an export disclosed, with its instances counted by SOP class."""

    uid: str
    sop_classes: dict[str, int]


class Disclosure(TypedDict):
    """What an export disclosed, sealed on its request (``export_request.disclosure_sealed``)."""

    patients: list[DisclosedPatient]
    studies: list[DisclosedStudy]


class PublicDestination(TypedDict):
    """A research archive of the allow-list as researchers and stewards see it: never a credential."""

    name: str
    kind: str
    description: str
    url: str
    #: the projects that may use it; None: any project
    projects: list[str] | None


class LeakFinding(TypedDict):
    """Where the leak gate found an identifying value, and what kind: never the value nor its digest."""

    path: str
    kind: str


class InstanceReport(TypedDict, total=False):
    """One instance of a job: its entry in a bundle's ``deid-report.json``, or in a push's
    ``delivery.files`` (without ``findings`` and ``output``). Instances are numbered, never named by
    their source UIDs."""

    instance: Required[int]
    #: released | held_back | error; in a push: sending | stored | failed | unconfirmed | not_sent
    status: str
    reasons: list[str]
    notes: list[str]
    pixels: str
    findings: list[LeakFinding]
    #: the file's path in the bundle
    output: str
    #: in a push: the pseudonymised SOP Instance UID, the attempt that sent it, why it was not stored
    sop_instance_uid: str
    attempt: int
    reason: str


class DeliveryReport(TypedDict):
    """A push's delivery, kept on its request (``export_request.delivery``) when the job ends."""

    destination: PublicDestination
    stow_url: str
    instances: int
    released: int
    stored: int
    failed: int
    unconfirmed: int
    files: list[InstanceReport]


class ArchiveReader(Protocol):
    """What an export job needs from the archive (the gateway's own credentials, never a user's)."""

    def find_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """(series UID, SOP instance UID) of every instance of the study (QIDO-RS)."""
        ...

    def find_studies(self, filters: dict[str, str]) -> list[str]:
        """Study Instance UIDs matching QIDO-RS filters."""
        ...

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """One instance as a PS3.10 file (WADO-RS), in memory."""
        ...

    def close(self) -> None: ...


class ExportQueue(Protocol):
    """Where approved requests go: the SQL database polled in-process, or a real task queue."""

    name: str

    def enqueue(self, request_id: str) -> None: ...


class StowClient(Protocol):
    """Pushes released instances to a DICOMweb destination (``destinations.DicomwebStowClient``)."""

    def store(self, instances: Sequence[tuple[str, bytes]]) -> dict[str, tuple[str, str | None]]:
        """(SOP Instance UID, PS3.10 bytes) in one STOW-RS request -> per UID (stored|failed|unconfirmed, reason)."""
        ...

    def close(self) -> None: ...


class ChunkSource(Protocol):
    def __call__(self) -> Iterator[bytes]: ...
