"""Contracts of the DICOMweb proxy: the request it serves, the archive behind the gateway and what it
tells the audit, and the encrypted archive's key custodian."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from compliance.audit.message import UserRef
from compliance.auth.interfaces import Principal
from compliance.policy.enforce import user_ref


@dataclass(frozen=True)
class RequestContext:
    """A DICOMweb request as the proxy sees it, once the API has authenticated its caller."""

    principal: Principal
    source_address: str | None
    method: str
    #: Path relative to the DICOMweb root, e.g. ``/studies/1.2.3/metadata``.
    path: str
    query: list[tuple[str, str]]
    raw_query: str
    headers: Mapping[str, str]
    #: A retrieve the nginx front released and the archive then refused: the release's event uuid
    #: (set by the API only for requests carrying the front's secret).
    released_event: str | None = None

    @property
    def target(self) -> str:
        return self.path + (f"?{self.raw_query}" if self.raw_query else "")

    @property
    def user(self) -> UserRef:
        return user_ref(self.principal, self.source_address)


@dataclass(frozen=True)
class StudySummary:
    """The identifying facts of a study that its audit events must name (PS3.15 A.5.3)."""

    study_uid: str
    patient_id: str | None
    patient_name: str | None
    accession: str | None = None
    modalities: tuple[str, ...] = ()
    sop_classes: Mapping[str, int] = field(default_factory=dict)


class UpstreamResponse(Protocol):
    """The archive's answer with its body unread: what the proxy uses of it (``httpx.Response`` has it)."""

    status_code: int
    content: bytes  # after aread()

    @property
    def headers(self) -> Mapping[str, str]:
        """The response headers, a case-insensitive mapping (``httpx.Headers``, aiohttp's ``CIMultiDictProxy``)."""
        ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    def json(self) -> Any: ...

    async def aclose(self) -> None: ...


class ArchiveBackend(Protocol):
    """A DICOMweb origin server the gateway proxies to (OrthancArchive)."""

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send a DICOMweb request; the response body is left unread (streamed by the caller)."""
        ...

    async def study_summary(self, study_uid: str) -> StudySummary | None:
        """The patient and accession of a study, or None when the archive does not hold it."""
        ...

    async def aclose(self) -> None: ...


class KeyCustodian(Protocol):
    """The encrypted archive's key custodian, as the proxy asks it why a read failed
    (:class:`compliance.archive.client.ArchiveKeyClient` is one, structurally).

    States: ``live``, ``shredded`` (its patient's data key was destroyed), ``none`` (no key: nothing
    stored) or ``unknown_study``. Reports are the custodian's JSON answers.
    """

    async def patient_state(self, patient_id: str) -> str:
        """The erasure state of a patient's data key."""
        ...

    async def study_state(self, study_uid: str) -> str:
        """The erasure state of a study's patient, resolved by the custodian (down to a tombstone)."""
        ...

    async def verify_study(self, study_uid: str) -> dict[str, Any]:
        """Decrypt every DICOM file of the study; ``{"failures": [{"result": ...}, ...], ...}``."""
        ...

    async def recent_failures(self, within_seconds: float) -> list[dict[str, Any]]:
        """Files that failed to authenticate on a read in the last ``within_seconds``; each with its ``uuid``."""
        ...
