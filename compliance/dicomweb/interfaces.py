"""Contracts of the DICOMweb proxy: the archive behind the gateway, and what it tells the audit."""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx


@dataclass(frozen=True)
class StudySummary:
    """The identifying facts of a study that its audit events must name (PS3.15 A.5.3)."""

    study_uid: str
    patient_id: str | None
    patient_name: str | None
    accession: str | None = None
    modalities: tuple[str, ...] = ()
    sop_classes: Mapping[str, int] = field(default_factory=dict)


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
    ) -> httpx.Response:
        """Send a DICOMweb request; the response body is left unread (streamed by the caller)."""
        ...

    async def study_summary(self, study_uid: str) -> StudySummary | None:
        """The patient and accession of a study, or None when the archive does not hold it."""
        ...

    async def aclose(self) -> None: ...
