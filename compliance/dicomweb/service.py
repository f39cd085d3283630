"""The DICOMweb proxy: decide, forward, audit, stream (DESIGN.md "The request path").

For every request, in this order:

1. the caller is already authenticated (``compliance.api.deps``); refused tokens are audited there;
2. the permission of the transaction (``routing.PERMISSIONS``) is decided by the policy; a denial is
   audited as a 110113 Security Alert and raised as :class:`PermissionDenied`;
3. the request goes to the archive with the gateway's credentials (never the caller's token);
4. the audit event is committed to the outbox *before* the first byte of the response goes back;
   if it cannot be recorded the upstream response is dropped and the request fails (fail closed);
5. the archive's response is streamed back unchanged (content type, multipart boundary), so
   DICOMweb clients work against the gateway as they do against the archive.

Event mapping (PS3.15 A.5.3): QIDO -> 110112 Query; WADO of whole instances -> 110104 Instances
Transferred (archive to the requesting application); WADO of metadata, frames, bulk data, rendered
or thumbnails -> 110103 Instances Accessed (Read); STOW -> 110107 Import; denial -> 110113.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from compliance import dicom_json
from compliance.audit.events import (
    Action,
    AuditEvent,
    Outcome,
    PatientRef,
    StudyRef,
    UserRef,
    import_event,
    instances_accessed_event,
    instances_transferred_event,
    query_event,
)
from compliance.audit.recorder import AuditRecorder
from compliance.auth.interfaces import Principal
from compliance.dicomweb.interfaces import ArchiveBackend, StudySummary, UpstreamResponse
from compliance.dicomweb.routing import Route, Transaction
from compliance.dicomweb.stow import StowInstance, StowStreamValidator, reconcile_stow, unvalidated_uids
from compliance.errors import ComplianceError, UpstreamError, status_of
from compliance.policy.enforce import enforce, user_ref
from compliance.policy.interfaces import PolicyDecisionPoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestContext:
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


@dataclass
class BufferedResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes


#: Seconds added to a failed search's duration when asking the archive which files failed in it.
FAILURE_WINDOW_MARGIN = 2.0


def _failure_reason(report: Mapping[str, Any]) -> str | None:
    """What the archive's verification of a study says: "integrity" (a file does not authenticate or
    is missing), "erased" (its key was destroyed), or None (its files are fine)."""
    results = {f.get("result") for f in report.get("failures", [])}
    if "decryption_failed" in results or "missing" in results:
        return "integrity"
    if "key_destroyed" in results:
        return "erased"
    return None


def _study_patient(summary: StudySummary | None) -> tuple[PatientRef, ...]:
    """The patient of a study, as the archive's index names it (none when it does not)."""
    if summary is None or not summary.patient_id:
        return ()
    return (PatientRef(patient_id=summary.patient_id, name=summary.patient_name),)


def outcome_of(status: int) -> Outcome:
    if status == 202:  # PS3.18: accepted with warnings or failures (a STOW that stored only some)
        return Outcome.MINOR_FAILURE
    if status < 300:
        return Outcome.SUCCESS
    if status < 500:
        return Outcome.MINOR_FAILURE
    return Outcome.SERIOUS_FAILURE


#: Response headers passed back to the client from the archive.
RESPONSE_HEADERS = ("content-type", "content-length", "etag", "last-modified", "warning", "content-location")


def response_headers(upstream: UpstreamResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() in RESPONSE_HEADERS}


class DicomwebService:
    def __init__(
        self,
        archive: ArchiveBackend,
        policy: PolicyDecisionPoint,
        auditor: AuditRecorder,
        *,
        gateway_id: str,
        archive_id: str = "archive",
        qido_max_response_bytes: int = 64 * 1024 * 1024,
        stow_max_sequence_depth: int = 32,
        erasure: Any = None,
        archive_dicomweb_path: str = "/dicom-web",
    ) -> None:
        #: ``compliance.archive.client.ArchiveKeyClient`` when the archive is encrypted: WADO checks
        #: the study's erasure state and explains archive read failures (410 / integrity alert).
        self._erasure = erasure
        self._archive = archive
        self._policy = policy
        self._auditor = auditor
        self._gateway_id = gateway_id
        self._archive_id = archive_id
        self._qido_max = qido_max_response_bytes
        self._stow_max_depth = stow_max_sequence_depth
        #: cleanups of refused STOW requests whose task was cancelled (kept until they finish)
        self._cleanups: set[asyncio.Task[None]] = set()
        self._archive_root = archive_dicomweb_path.rstrip("/")

    # -- authorization ------------------------------------------------------------------------
    async def authorize(self, ctx: RequestContext, route: Route) -> None:
        await enforce(self._policy, self._auditor, ctx.principal, route.permission,
                      action=f"{route.transaction.value} {ctx.method} {ctx.target}",
                      resource=f"dicomweb:{ctx.target}", source_address=ctx.source_address,
                      gateway_id=self._gateway_id)

    # -- QIDO-RS ------------------------------------------------------------------------------
    async def search(self, ctx: RequestContext, route: Route) -> BufferedResponse:
        """QIDO-RS, read whole (at most ``qido_max_response_bytes``) so that its 110112 event names the
        patients it returns before it is answered. A search the gateway cannot answer is audited too,
        as a failed 110112 before the error: no answer from the archive, an answer over the limit, or
        one that is not a DICOM JSON array of objects (PS3.18 F.2), which is 502."""
        await self.authorize(ctx, route)
        started = time.monotonic()
        try:
            upstream = await self._archive.send("GET", ctx.path, query=ctx.query, headers=ctx.headers)
            try:
                body = await _read_bounded(upstream, self._qido_max)
            finally:
                await upstream.aclose()
        except Exception as exc:
            await self._fail_search(ctx, route, exc)
        if upstream.status_code >= 500 and self._erasure is not None:
            if route.study_uid:
                # A study-scoped search reads the study's files: say why the archive failed, as WADO does.
                await self._explain_failed_search(ctx, route, upstream.status_code)
            else:
                await self._explain_failed_broad_search(ctx, upstream.status_code, time.monotonic() - started)
        patients: dict[tuple[str | None, str | None], PatientRef] = {}
        studies: dict[str, StudyRef] = {}
        if upstream.status_code == 200 and body:
            try:
                items = _dicom_json_array(body)
            except UpstreamError as exc:
                await self._fail_search(ctx, route, exc)
            for item in items:
                pid = dicom_json.first_text(item, "00100020")
                pname = dicom_json.first_text(item, "00100010")
                if pid:
                    patients.setdefault((pid, pname), PatientRef(patient_id=pid, name=pname))
                suid = dicom_json.first_text(item, "0020000D") or route.study_uid
                if suid:
                    accession = dicom_json.first_text(item, "00080050")
                    studies.setdefault(suid, StudyRef(study_uid=suid, accession=accession))
        if route.study_uid and upstream.status_code == 200:
            # Series/instance-level results carry no patient attributes: name the study's patient.
            try:
                summary = await self._archive.study_summary(route.study_uid)
            except Exception as exc:
                await self._fail_search(ctx, route, exc)
            if summary is not None and summary.patient_id:
                patients.setdefault(
                    (summary.patient_id, summary.patient_name),
                    PatientRef(patient_id=summary.patient_id, name=summary.patient_name),
                )
                studies.setdefault(route.study_uid, StudyRef(study_uid=route.study_uid, accession=summary.accession))
        await self._auditor.record(self._search_event(
            ctx, upstream.status_code,
            None if upstream.status_code < 300 else f"archive status {upstream.status_code}",
            tuple(patients.values()), tuple(studies.values())))
        return BufferedResponse(upstream.status_code, response_headers(upstream), body)

    async def _fail_search(self, ctx: RequestContext, route: Route, exc: Exception) -> NoReturn:
        """Record the failed 110112 of a search the archive did not answer usably, then raise (502/503)."""
        error = exc if isinstance(exc, ComplianceError) else UpstreamError("the archive's answer could not be read")
        studies = (StudyRef(study_uid=route.study_uid),) if route.study_uid else ()
        await self._auditor.record(self._search_event(
            ctx, status_of(error), f"the archive's answer was not passed on: {error.message}"[:1024], (), studies))
        if error is exc:
            raise exc
        raise error from exc

    # -- WADO-RS ------------------------------------------------------------------------------
    async def retrieve(self, ctx: RequestContext, route: Route) -> UpstreamResponse:
        """Return the archive's response with its body unread; the caller streams then closes it."""
        await self.authorize(ctx, route)
        assert route.study_uid is not None
        summary_task = asyncio.ensure_future(self._archive.study_summary(route.study_uid))
        results = await asyncio.gather(
            self._archive.send("GET", ctx.path, query=ctx.query, headers=ctx.headers), summary_task,
            return_exceptions=True)
        upstream, summary = results[0], results[1]
        if self._erasure is not None and not isinstance(upstream, BaseException) and upstream.status_code >= 300:
            # Only a refused retrieve needs the key custodian: a 2xx means Orthanc just decrypted the
            # study's files with a live key (the plugin refuses to run with Orthanc's storage cache,
            # so nothing is served from memory). Erased studies answer 404 (they left the index) or 5xx.
            known = None if isinstance(summary, BaseException) else summary
            try:
                state = await self._study_state(route.study_uid, summary_task)
            except BaseException as exc:
                await upstream.aclose()
                await self._auditor.record(self._retrieve_event(ctx, route, 502, known))
                if isinstance(exc, ComplianceError):
                    raise
                raise UpstreamError("the archive's key custodian could not be asked") from exc
            # Before the lookup's error: a study lookup may itself fail on a shredded or corrupted file.
            await self._check_stored_objects(ctx, route, upstream, known, state)
        if isinstance(upstream, BaseException) or isinstance(summary, BaseException):  # results holds just these two
            if not isinstance(upstream, BaseException):
                await upstream.aclose()
            err = next(r for r in results if isinstance(r, BaseException))
            # nothing was sent, but the attempt on the patient's images is audited like any other
            await self._auditor.record(self._retrieve_event(
                ctx, route, 502, None if isinstance(summary, BaseException) else summary))
            if isinstance(err, ComplianceError):
                raise err
            raise UpstreamError("the archive request failed") from err
        try:
            await self._auditor.record(self._retrieve_event(ctx, route, upstream.status_code, summary))
        except BaseException:
            await upstream.aclose()
            raise
        return upstream

    async def release(self, ctx: RequestContext, route: Route) -> str | None:
        """Decide and audit a retrieve whose bytes the nginx front will push (compliance/dicomweb/front.py).

        The same decision and the same 110104/110103 event as :meth:`retrieve`, committed before
        anything is released; returns the ``X-Accel-Redirect`` target naming the event. Returns
        ``None`` (nothing recorded) when the study's patient cannot be named from the index, so the
        caller relays the request itself and audits whatever the archive answers.
        """
        await self.authorize(ctx, route)
        assert route.study_uid is not None
        try:
            summary = await self._archive.study_summary(route.study_uid)
        except Exception:  # noqa: BLE001 - the relayed request reports and audits the failure
            return None
        if summary is None or not summary.patient_id:
            return None
        event = self._retrieve_event(ctx, route, 200, summary)
        await self._auditor.record(event)
        from compliance.dicomweb.front import accel_redirect

        return accel_redirect(str(event.uuid), self._archive_root + ctx.path, ctx.raw_query)

    async def _study_state(self, study_uid: str, summary_task: asyncio.Future[Any]) -> str:
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
            return str(await self._erasure.patient_state(summary.patient_id))
        return str(await self._erasure.study_state(study_uid))

    async def _check_stored_objects(self, ctx: RequestContext, route: Route, upstream: UpstreamResponse,
                                    summary: Any, state: Any) -> None:
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
                report = await self._erasure.verify_study(route.study_uid or "")
            except BaseException:
                await upstream.aclose()
                await self._auditor.record(self._retrieve_event(ctx, route, upstream.status_code, summary))
                raise
            reason = _failure_reason(report)
        if reason is None:
            return
        await upstream.aclose()
        from compliance.archive.interfaces import ArchiveIntegrityError
        from compliance.crypto.interfaces import KeyDestroyed

        study = route.study_uid or ""
        if reason == "erased":
            await self._auditor.record(self._retrieve_event(ctx, route, 410, summary))
            raise KeyDestroyed("the study was permanently erased: its patient's data key was destroyed",
                               detail={"study_uid": study, "reason": "crypto-shredded"})
        await self._integrity_alert(ctx, study, summary)
        await self._auditor.record(self._retrieve_event(ctx, route, 500, summary))
        raise ArchiveIntegrityError("a stored object of the study failed its integrity check and was not returned",
                                    detail={"study_uid": study})

    async def _integrity_alert(self, ctx: RequestContext, study: str, summary: StudySummary | None) -> None:
        from compliance.audit.events import EventTypeCode, security_alert_event

        patients = _study_patient(summary)
        await self._auditor.record(security_alert_event(
            user=ctx.user, gateway_id=self._gateway_id, alert_type=EventTypeCode.OBJECT_SECURITY_ATTRIBUTES_CHANGED,
            description=f"integrity failure: a stored file of study {study} does not authenticate; not returned",
            resource=f"dicomweb:{ctx.target}", outcome=Outcome.SERIOUS_FAILURE, source_address=ctx.source_address,
            patients=patients, studies=(StudyRef(study_uid=study),)))

    async def _explain_failed_search(self, ctx: RequestContext, route: Route, status: int) -> None:
        """A study-scoped QIDO the encrypted archive failed: 410 for an erased study, 500 and a 110113
        alert for a file that does not authenticate; otherwise return (the caller answers 502)."""
        from compliance.archive.interfaces import ArchiveIntegrityError
        from compliance.crypto.interfaces import KeyDestroyed

        study = route.study_uid or ""
        try:
            report = await self._erasure.verify_study(study)
        except Exception:  # noqa: BLE001 - the search's own failure is reported and audited by the caller
            log.warning("could not ask the archive why a search of study %s failed", study, exc_info=True)
            return
        reason = _failure_reason(report)
        if reason is None:
            return
        answer = 500 if reason == "integrity" else 410
        try:
            summary = await self._archive.study_summary(study)
        except Exception:  # noqa: BLE001 - the patient is named when the index still knows it
            summary = None
        patients = _study_patient(summary)
        if reason == "integrity":
            await self._integrity_alert(ctx, study, summary)
        await self._auditor.record(self._search_event(
            ctx, answer, f"archive status {status}: {reason}", patients, (StudyRef(study_uid=study),)))
        if reason == "erased":
            raise KeyDestroyed("the study was permanently erased: its patient's data key was destroyed",
                               detail={"study_uid": study, "reason": "crypto-shredded"})
        raise ArchiveIntegrityError("a stored object of the study failed its integrity check and was not returned",
                                    detail={"study_uid": study})

    async def _explain_failed_broad_search(self, ctx: RequestContext, status: int, elapsed: float) -> None:
        """A search across studies the encrypted archive failed: if the custodian failed to
        authenticate a stored file while the search ran, answer 500 with a 110113 alert naming the
        file(s); otherwise return (the caller answers 502).

        The study is unknown here (the archive's read callback sees only the file's uuid), so the
        alert names the files; a request scoped to the study (WADO, or QIDO of its series) names the
        study. A failure of another request in the same seconds is attributed here too: the search
        read the archive while it was failing integrity checks, which is what the alert says.
        """
        from compliance.archive.interfaces import MAX_FAILURE_WINDOW, ArchiveIntegrityError
        from compliance.audit.events import EventTypeCode, security_alert_event

        try:
            window = min(round(elapsed + FAILURE_WINDOW_MARGIN, 3), MAX_FAILURE_WINDOW)
            failures = await self._erasure.recent_failures(window)
        except Exception:  # noqa: BLE001 - the search's own failure is reported and audited by the caller
            log.warning("could not ask the archive why a search failed", exc_info=True)
            return
        files = sorted({str(f.get("uuid")) for f in failures})
        if not files:
            return
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        await self._auditor.record(security_alert_event(
            user=ctx.user, gateway_id=self._gateway_id, alert_type=EventTypeCode.OBJECT_SECURITY_ATTRIBUTES_CHANGED,
            description=f"integrity failure: stored file(s) {shown} did not authenticate while the archive "
                        f"answered a search; nothing was returned",
            resource=f"dicomweb:{ctx.target}", outcome=Outcome.SERIOUS_FAILURE, source_address=ctx.source_address))
        await self._auditor.record(self._search_event(ctx, 500, f"archive status {status}: integrity", (), ()))
        raise ArchiveIntegrityError("a stored object failed its integrity check while the archive answered the "
                                    "search; nothing was returned", detail={"files": len(files)})

    def _search_event(self, ctx: RequestContext, status: int, description: str | None,
                      patients: tuple[PatientRef, ...], studies: tuple[StudyRef, ...]) -> AuditEvent:
        """The 110112 Query event of a search, with the outcome of the status it is answered with."""
        return query_event(user=ctx.user, gateway_id=self._gateway_id, outcome=outcome_of(status),
                           outcome_description=description, query=f"{ctx.method} {ctx.target}".encode(),
                           sop_class_uid=None, patients=patients, studies=studies)

    def _retrieve_event(self, ctx: RequestContext, route: Route, status: int, summary: StudySummary | None):
        patients = _study_patient(summary)
        studies = (
            StudyRef(study_uid=route.study_uid or "", accession=summary.accession if summary else None),
        )
        description = None if status < 300 else f"archive status {status}"
        if ctx.released_event and description:
            description += f"; the transfer released by event {ctx.released_event} was not delivered"
        if route.transaction is Transaction.RETRIEVE:
            return instances_transferred_event(
                user=ctx.user,
                gateway_id=self._gateway_id,
                source_id=self._archive_id,
                outcome=outcome_of(status),
                outcome_description=description,
                patients=patients,
                studies=studies,
            )
        return instances_accessed_event(
            user=ctx.user,
            gateway_id=self._gateway_id,
            action=Action.READ,
            outcome=outcome_of(status),
            outcome_description=description,
            patients=patients,
            studies=studies,
        )

    # -- STOW-RS ------------------------------------------------------------------------------
    async def store(self, ctx: RequestContext, route: Route, body: AsyncIterator[bytes]) -> BufferedResponse:
        """Validate the request as it streams and send the archive a body rebuilt from the validated
        parts (``stow.StowStreamValidator``): the archive never frames the client's bytes.

        The archive only ever receives a complete body once every part has been validated. A failure
        aborts the upload and is audited; parts the archive had already received whole (Orthanc
        stores a part as soon as it has parsed it) are removed first, so a refused request stores
        nothing. An instance the archive's answer names that the gateway did not validate is a 110113
        alert and is removed. The caller has authorized the request; ``body`` raises PayloadTooLarge
        past the limit.
        """
        started = datetime.now(UTC)
        try:
            validator = StowStreamValidator(ctx.headers.get("content-type"), route.study_uid,
                                            max_sequence_depth=self._stow_max_depth)
        except ComplianceError as exc:
            await self.audit_rejected_store(ctx, exc.message)
            raise
        failure: list[Exception] = []

        async def validated_body() -> AsyncIterator[bytes]:
            try:
                async for chunk in body:
                    out = validator.feed(chunk)
                    if out:
                        yield out
                yield validator.finish()
            except Exception as exc:  # refused, too large, or the client went away
                failure.append(exc)
                if not validator.forwarded:
                    raise  # the archive has nothing it could store: abort the upload
                # Let the archive finish with what it has (no further part), so that what it stored can
                # be found and removed once it has answered: an aborted upload races the removal.
                yield validator.abandon()

        headers = {"content-type": validator.content_type, "accept": "application/dicom+json"}
        payload: bytes | None = None
        try:
            upstream = await self._archive.send("POST", ctx.path, query=ctx.query, headers=headers,
                                                content=validated_body())
            try:
                payload = await upstream.aread()
            finally:
                await upstream.aclose()
        except asyncio.CancelledError:
            # The request's task is going away: undo and audit in a task of its own.
            task = asyncio.ensure_future(self._refused_store(ctx, "the request was cancelled", validator, started))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            raise
        except Exception as exc:
            failure.append(exc)
        if failure:
            error = failure[0]
            reason = error.message if isinstance(error, ComplianceError) else \
                f"the upload broke off ({type(error).__name__})"
            if payload is not None:  # the archive answered the ended body: what it names is checked too
                await self._check_unvalidated(ctx, payload, validator.instances, started)
            await self._refused_store(ctx, reason, validator, started)
            raise error
        assert payload is not None
        instances = validator.instances
        forget = getattr(self._archive, "forget", None)
        for inst in instances:
            if forget is not None:
                forget(inst.study_uid)
        await self._check_unvalidated(ctx, payload, instances, started)
        status, headers = upstream.status_code, response_headers(upstream)
        outcome = outcome_of(status)
        description = None if status == 200 else f"archive status {status}"
        checked = reconcile_stow(status, payload, instances)
        if checked is not None:
            status, payload, not_stored = checked
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["content-type"] = "application/dicom+json"
            outcome = Outcome.SERIOUS_FAILURE if len(not_stored) == len(instances) else Outcome.MINOR_FAILURE
            named = "; ".join(f"{uid}: {why}" for uid, why in list(not_stored.items())[:10])
            description = (f"the archive stored {len(instances) - len(not_stored)} of {len(instances)} instances; "
                           f"not stored: {named}")[:1024]
            # UIDs identify a patient's images: they go to the audit trail, not to the application log
            log.warning("STOW-RS: the archive stored %d of %d instances", len(instances) - len(not_stored),
                        len(instances))
        await self._auditor.record(
            import_event(
                user=ctx.user,
                gateway_id=self._gateway_id,
                outcome=outcome,
                outcome_description=description,
                patients=_patients_of(instances),
                studies=_studies_of(instances),
            )
        )
        return BufferedResponse(status, headers, payload)

    async def _remove(self, uids: list[str], started: datetime) -> dict[str, str]:
        """Remove from the archive what it received of these instances since ``started``."""
        remove = getattr(self._archive, "remove_instances", None)
        if remove is None:
            return {uid: "error: the archive cannot remove instances" for uid in uids}
        try:
            return dict(await remove(uids, received_since=started))
        except Exception as exc:  # noqa: BLE001 - reported per instance, audited by the caller
            return {uid: f"error: {type(exc).__name__}" for uid in uids}

    async def _refused_store(self, ctx: RequestContext, reason: str, validator: StowStreamValidator,
                             started: datetime) -> None:
        """Undo what a refused STOW left in the archive, then record its failed 110107 event."""
        if not validator.forwarded:
            await self.audit_rejected_store(ctx, reason)
            return
        # Any validated instance may have reached the archive whole (those in validator.committed did).
        sent = list(validator.instances)
        results = await self._remove([i.sop_instance_uid for i in sent], started)
        removed = sum(1 for r in results.values() if r == "removed")
        left = {uid: r for uid, r in results.items() if r.startswith("error")}
        if not removed and not left:
            await self.audit_rejected_store(ctx, reason)
            return
        stored = [i for i in sent if i.sop_instance_uid in left or results.get(i.sop_instance_uid) == "removed"]
        note = (f"; the archive had stored {removed + len(left)} of its instances before the refusal: "
                f"{removed} removed")
        if left:
            note += "; NOT REMOVED: " + "; ".join(f"{uid} ({why})" for uid, why in list(left.items())[:10])
            log.error("STOW-RS: %d instances of a refused request could not be removed from the archive", len(left))
        await self.audit_rejected_store(ctx, reason + note, stored,
                                        Outcome.MAJOR_FAILURE if left else Outcome.SERIOUS_FAILURE)

    async def _check_unvalidated(self, ctx: RequestContext, payload: bytes, instances: list[StowInstance],
                                 started: datetime) -> None:
        """A 110113 alert for every SOP Instance UID the archive's answer names that the gateway did not
        validate, and its removal: the archive must hold only what the gateway checked and recorded."""
        stored, failed = unvalidated_uids(payload, instances)
        if not stored and not failed:
            return
        from compliance.audit.events import EventTypeCode, security_alert_event

        results = await self._remove(stored, started) if stored else {}
        left = [uid for uid, r in results.items() if r.startswith("error")]
        shown = "; ".join(f"{uid}: {results.get(uid, 'reported failed')}" for uid in [*stored, *failed][:10])
        await self._auditor.record(security_alert_event(
            user=ctx.user, gateway_id=self._gateway_id, alert_type=EventTypeCode.USE_OF_RESTRICTED_FUNCTION,
            description=(f"STOW-RS: the archive reported {len(stored) + len(failed)} instance(s) the gateway did "
                         f"not validate ({len(stored)} as stored); removal: {shown}")[:1024],
            resource=f"dicomweb:{ctx.target}",
            outcome=Outcome.MAJOR_FAILURE if left else Outcome.SERIOUS_FAILURE,
            source_address=ctx.source_address))
        log.error("STOW-RS: the archive reported %d instances the gateway did not validate (%d not removed)",
                  len(stored) + len(failed), len(left))

    async def audit_rejected_store(self, ctx: RequestContext, reason: str, instances: list[StowInstance] | None = None,
                                   outcome: Outcome = Outcome.SERIOUS_FAILURE) -> None:
        """The failed 110107 of a refused STOW; ``instances``: those the archive had received before."""
        await self._auditor.record(
            import_event(
                user=ctx.user,
                gateway_id=self._gateway_id,
                outcome=outcome,
                outcome_description=f"refused by the gateway: {reason}"[:1024],
                patients=_patients_of(instances or []),
                studies=_studies_of(instances or []),
            )
        )


def _patients_of(instances: list[StowInstance]) -> tuple[PatientRef, ...]:
    seen: dict[tuple[str | None, str | None], PatientRef] = {}
    for i in instances:
        if i.patient_id:
            seen.setdefault((i.patient_id, i.patient_name), PatientRef(patient_id=i.patient_id, name=i.patient_name))
    return tuple(seen.values())


def _studies_of(instances: list[StowInstance]) -> tuple[StudyRef, ...]:
    counts: dict[str, dict[str, int]] = {}
    accession: dict[str, str | None] = {}
    for i in instances:
        per = counts.setdefault(i.study_uid, {})
        per[i.sop_class_uid] = per.get(i.sop_class_uid, 0) + 1
        accession.setdefault(i.study_uid, i.accession)
    return tuple(StudyRef(study_uid=s, sop_classes=c, accession=accession[s]) for s, c in counts.items())


def _dicom_json_array(body: bytes) -> list[dict[str, Any]]:
    """A QIDO-RS answer: a JSON array of DICOM JSON objects (PS3.18 F.2); anything else is the archive's fault."""
    try:
        items = json.loads(body)
    except ValueError as exc:
        raise UpstreamError("the archive returned a QIDO-RS response that is not JSON") from exc
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise UpstreamError("the archive returned a QIDO-RS response that is not an array of DICOM JSON objects")
    return items


async def _read_bounded(resp: UpstreamResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.aiter_raw():
        total += len(chunk)
        if total > limit:
            raise UpstreamError(
                "the query result is larger than this gateway returns; narrow the query or use limit/offset",
                detail={"limit_bytes": limit},
            )
        chunks.append(chunk)
    return b"".join(chunks)
