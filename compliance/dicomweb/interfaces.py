"""Contracts of the DICOMweb proxy: the archive behind the gateway, and what it tells the audit."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


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
    headers: Any  # a case-insensitive mapping of the response headers
    content: bytes  # after aread()

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
