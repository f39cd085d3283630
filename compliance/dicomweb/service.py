"""The DICOMweb proxy: decide, forward, audit, stream (docs/design.md, "The request path").

For every request, in this order:

1. the caller is already authenticated (``compliance.api.deps``); refused tokens are audited there;
2. the permission of the transaction (``routing.PERMISSIONS``) is decided by the policy; a denial is
   audited as a 110113 Security Alert and raised as :class:`PermissionDenied`;
3. the request goes to the archive with the gateway's credentials (never the caller's token);
4. the audit event is committed to the outbox *before* the first byte of the response goes back;
   if it cannot be recorded the upstream response is dropped and the request fails (fail closed);
5. the archive's response is streamed back unchanged (content type, multipart boundary), so
   DICOMweb clients work against the gateway as they do against the archive.

Which event each request records: :mod:`compliance.dicomweb.audit_mapping`. Why an encrypted
archive refused a read (erased: 410, or a file that does not authenticate: 500 and an alert):
:mod:`compliance.dicomweb.diagnosis`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from compliance import dicom_json
from compliance.audit.codes import Outcome
from compliance.audit.message import PatientRef, StudyRef
from compliance.audit.recorder import AuditRecorder
from compliance.dicomweb.audit_mapping import DicomwebEvents, outcome_of
from compliance.dicomweb.diagnosis import ArchiveDiagnosis
from compliance.dicomweb.interfaces import ArchiveBackend, KeyCustodian, RequestContext, UpstreamResponse
from compliance.dicomweb.routing import Route
from compliance.dicomweb.stow import StowInstance, StowStreamValidator, reconcile_stow, unvalidated_uids
from compliance.errors import ComplianceError, UpstreamError, status_of
from compliance.policy.enforce import enforce
from compliance.policy.interfaces import PolicyDecisionPoint

log = logging.getLogger(__name__)


@dataclass
class BufferedResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes


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
        erasure: KeyCustodian | None = None,
        archive_dicomweb_path: str = "/dicom-web",
    ) -> None:
        self._archive = archive
        self._policy = policy
        self._auditor = auditor
        self._gateway_id = gateway_id
        self._events = DicomwebEvents(gateway_id=gateway_id, archive_id=archive_id)
        #: ``erasure`` (``compliance.archive.client.ArchiveKeyClient``) when the archive is encrypted: WADO
        #: checks the study's erasure state and archive read failures are explained (410 / integrity alert).
        self._diagnosis = None if erasure is None else ArchiveDiagnosis(erasure, archive, auditor, self._events)
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
        if upstream.status_code >= 500 and self._diagnosis is not None:
            if route.study_uid:
                # A study-scoped search reads the study's files: say why the archive failed, as WADO does.
                await self._diagnosis.explain_failed_search(ctx, route, upstream.status_code)
            else:
                await self._diagnosis.explain_failed_broad_search(ctx, upstream.status_code,
                                                                  time.monotonic() - started)
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
        await self._auditor.record(self._events.search(
            ctx, upstream.status_code,
            None if upstream.status_code < 300 else f"archive status {upstream.status_code}",
            tuple(patients.values()), tuple(studies.values())))
        return BufferedResponse(upstream.status_code, response_headers(upstream), body)

    async def _fail_search(self, ctx: RequestContext, route: Route, exc: Exception) -> NoReturn:
        """Record the failed 110112 of a search the archive did not answer usably, then raise (502/503)."""
        error = exc if isinstance(exc, ComplianceError) else UpstreamError("the archive's answer could not be read")
        studies = (StudyRef(study_uid=route.study_uid),) if route.study_uid else ()
        await self._auditor.record(self._events.search(
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
        if self._diagnosis is not None and not isinstance(upstream, BaseException) and upstream.status_code >= 300:
            # Only a refused retrieve needs the key custodian: a 2xx means Orthanc just decrypted the
            # study's files with a live key (the plugin refuses to run with Orthanc's storage cache,
            # so nothing is served from memory). Erased studies answer 404 (they left the index) or 5xx.
            known = None if isinstance(summary, BaseException) else summary
            try:
                state = await self._diagnosis.study_state(route.study_uid, summary_task)
            except BaseException as exc:
                await upstream.aclose()
                await self._auditor.record(self._events.retrieve(ctx, route, 502, known))
                if isinstance(exc, ComplianceError):
                    raise
                raise UpstreamError("the archive's key custodian could not be asked") from exc
            # Before the lookup's error: a study lookup may itself fail on a shredded or corrupted file.
            await self._diagnosis.check_stored_objects(ctx, route, upstream, known, state)
        if isinstance(upstream, BaseException) or isinstance(summary, BaseException):  # results holds just these two
            if not isinstance(upstream, BaseException):
                await upstream.aclose()
            err = next(r for r in results if isinstance(r, BaseException))
            # nothing was sent, but the attempt on the patient's images is audited like any other
            await self._auditor.record(self._events.retrieve(
                ctx, route, 502, None if isinstance(summary, BaseException) else summary))
            if isinstance(err, ComplianceError):
                raise err
            raise UpstreamError("the archive request failed") from err
        try:
            await self._auditor.record(self._events.retrieve(ctx, route, upstream.status_code, summary))
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
        event = self._events.retrieve(ctx, route, 200, summary)
        await self._auditor.record(event)
        from compliance.dicomweb.front import accel_redirect

        return accel_redirect(str(event.uuid), self._archive_root + ctx.path, ctx.raw_query)

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
        await self._auditor.record(self._events.store(ctx, outcome, description, instances))
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
        results = await self._remove(stored, started) if stored else {}
        left = [uid for uid, r in results.items() if r.startswith("error")]
        shown = "; ".join(f"{uid}: {results.get(uid, 'reported failed')}" for uid in [*stored, *failed][:10])
        await self._auditor.record(self._events.unvalidated_alert(
            ctx, (f"STOW-RS: the archive reported {len(stored) + len(failed)} instance(s) the gateway did "
                  f"not validate ({len(stored)} as stored); removal: {shown}")[:1024],
            Outcome.MAJOR_FAILURE if left else Outcome.SERIOUS_FAILURE))
        log.error("STOW-RS: the archive reported %d instances the gateway did not validate (%d not removed)",
                  len(stored) + len(failed), len(left))

    async def audit_rejected_store(self, ctx: RequestContext, reason: str, instances: list[StowInstance] | None = None,
                                   outcome: Outcome = Outcome.SERIOUS_FAILURE) -> None:
        """The failed 110107 of a refused STOW; ``instances``: those the archive had received before."""
        await self._auditor.record(self._events.store(
            ctx, outcome, f"refused by the gateway: {reason}"[:1024], instances or []))


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
