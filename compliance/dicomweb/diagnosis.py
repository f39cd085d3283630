"""Why the encrypted archive refused a read: erasure (410) or a stored file that does not authenticate
(500 and a 110113 alert), asked of the archive's key custodian (:class:`KeyCustodian`).

Orthanc answers 5xx when the storage plugin refuses a file (it reads a study's files before
answering), and 404 for a study erased from its index; only then is the custodian asked. A read the
archive answered 2xx needs no diagnosis: it has just decrypted the files with a live key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from compliance.archive.interfaces import MAX_FAILURE_WINDOW, ArchiveIntegrityError
from compliance.audit.message import StudyRef
from compliance.audit.recorder import AuditRecorder
from compliance.crypto.interfaces import KeyDestroyed
from compliance.dicomweb.audit_mapping import DicomwebEvents, study_patient
from compliance.dicomweb.interfaces import (
    ArchiveBackend,
    KeyCustodian,
    RequestContext,
    StudySummary,
    UpstreamResponse,
)
from compliance.dicomweb.routing import Route

log = logging.getLogger(__name__)

#: Seconds added to a failed search's duration when asking the archive which files failed in it.
FAILURE_WINDOW_MARGIN = 2.0


def failure_reason(report: Mapping[str, Any]) -> str | None:
    """What the archive's verification of a study says: "integrity" (a file does not authenticate or
    is missing), "erased" (its key was destroyed), or None (its files are fine)."""
    results = {f.get("result") for f in report.get("failures", [])}
    if "decryption_failed" in results or "missing" in results:
        return "integrity"
    if "key_destroyed" in results:
        return "erased"
    return None


def _erased(study: str) -> KeyDestroyed:
    return KeyDestroyed("the study was permanently erased: its patient's data key was destroyed",
                        detail={"study_uid": study, "reason": "crypto-shredded"})


def _corrupted(study: str) -> ArchiveIntegrityError:
    return ArchiveIntegrityError("a stored object of the study failed its integrity check and was not returned",
                                 detail={"study_uid": study})


class ArchiveDiagnosis:
    """Tells erasure from corruption for the proxy, and audits what it finds."""

    def __init__(self, custodian: KeyCustodian, archive: ArchiveBackend, auditor: AuditRecorder,
                 events: DicomwebEvents) -> None:
        self._custodian = custodian
        self._archive = archive
        self._auditor = auditor
        self._events = events

    async def study_state(self, study_uid: str, summary_task: asyncio.Future[StudySummary | None]) -> str:
        """The study's erasure state: one request to the key custodian once the patient is known.

        The patient comes from the study lookup the audit event needs anyway (usually cached), so the
        state costs a single call; without it (an erased study has left the index) the custodian
        client resolves the study itself, down to its tombstone.
        """
        try:
            summary = await asyncio.shield(summary_task)
        except Exception:  # noqa: BLE001 - the lookup's own error is reported by the caller
            summary = None
        if summary is not None and summary.patient_id:
            return str(await self._custodian.patient_state(summary.patient_id))
        return str(await self._custodian.study_state(study_uid))

    async def check_stored_objects(self, ctx: RequestContext, route: Route, upstream: UpstreamResponse,
                                   summary: StudySummary | None, state: str) -> None:
        """Encrypted archive: 410 for a shredded patient's study; an integrity alert for a bad file.

        Orthanc answers 5xx when the storage plugin refuses a file (it reads a study's files before
        answering), so only then does the gateway ask the archive to verify the study's files and
        tell erasure (410) from corruption (500 + 110113). Nothing of the upstream body is sent.
        """
        reason: str | None = None
        if state == "shredded":
            reason = "erased"
        elif upstream.status_code >= 500:
            try:
                report = await self._custodian.verify_study(route.study_uid or "")
            except BaseException:
                await upstream.aclose()
                await self._auditor.record(self._events.retrieve(ctx, route, upstream.status_code, summary))
                raise
            reason = failure_reason(report)
        if reason is None:
            return
        await upstream.aclose()
        study = route.study_uid or ""
        if reason == "erased":
            await self._auditor.record(self._events.retrieve(ctx, route, 410, summary))
            raise _erased(study)
        await self._integrity_alert(ctx, study, summary)
        await self._auditor.record(self._events.retrieve(ctx, route, 500, summary))
        raise _corrupted(study)

    async def _integrity_alert(self, ctx: RequestContext, study: str, summary: StudySummary | None) -> None:
        await self._auditor.record(self._events.integrity_alert(
            ctx, f"integrity failure: a stored file of study {study} does not authenticate; not returned",
            study_patient(summary), (StudyRef(study_uid=study),)))

    async def explain_failed_search(self, ctx: RequestContext, route: Route, status: int) -> None:
        """A study-scoped QIDO the encrypted archive failed: 410 for an erased study, 500 and a 110113
        alert for a file that does not authenticate; otherwise return (the caller answers 502)."""
        study = route.study_uid or ""
        try:
            report = await self._custodian.verify_study(study)
        except Exception:  # noqa: BLE001 - the search's own failure is reported and audited by the caller
            log.warning("could not ask the archive why a search of study %s failed", study, exc_info=True)
            return
        reason = failure_reason(report)
        if reason is None:
            return
        answer = 500 if reason == "integrity" else 410
        try:
            summary = await self._archive.study_summary(study)
        except Exception:  # noqa: BLE001 - the patient is named when the index still knows it
            summary = None
        patients = study_patient(summary)
        if reason == "integrity":
            await self._integrity_alert(ctx, study, summary)
        await self._auditor.record(self._events.search(
            ctx, answer, f"archive status {status}: {reason}", patients, (StudyRef(study_uid=study),)))
        if reason == "erased":
            raise _erased(study)
        raise _corrupted(study)

    async def explain_failed_broad_search(self, ctx: RequestContext, status: int, elapsed: float) -> None:
        """A search across studies the encrypted archive failed: if the custodian failed to
        authenticate a stored file while the search ran, answer 500 with a 110113 alert naming the
        file(s); otherwise return (the caller answers 502).

        The study is unknown here (the archive's read callback sees only the file's uuid), so the
        alert names the files; a request scoped to the study (WADO, or QIDO of its series) names the
        study. A failure of another request in the same seconds is attributed here too: the search
        read the archive while it was failing integrity checks, which is what the alert says.
        """
        try:
            window = min(round(elapsed + FAILURE_WINDOW_MARGIN, 3), MAX_FAILURE_WINDOW)
            failures = await self._custodian.recent_failures(window)
        except Exception:  # noqa: BLE001 - the search's own failure is reported and audited by the caller
            log.warning("could not ask the archive why a search failed", exc_info=True)
            return
        files = sorted({str(f.get("uuid")) for f in failures})
        if not files:
            return
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        await self._auditor.record(self._events.integrity_alert(
            ctx, f"integrity failure: stored file(s) {shown} did not authenticate while the archive "
                 f"answered a search; nothing was returned"))
        await self._auditor.record(self._events.search(ctx, 500, f"archive status {status}: integrity", (), ()))
        raise ArchiveIntegrityError("a stored object failed its integrity check while the archive answered the "
                                    "search; nothing was returned", detail={"files": len(files)})
