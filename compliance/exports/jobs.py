"""The export job: archive -> de-identification -> leak gate -> encrypted bundle, or STOW-RS to an archive.

No plaintext reaches the disk: instances are fetched (QIDO-RS, WADO-RS, with the gateway's own
archive credentials) into memory, de-identified in memory (the engine's leak gate checks every
element of every output), written into a zip that is streamed straight into the streaming AEAD
(:mod:`compliance.crypto.streaming`, the project's bundle key, associated data = the request id)
and only ciphertext is written, to ``<exports dir>/<id>.bundle`` (``<id>.<n>.bundle`` for a re-run,
attempt n >= 2), via a per-attempt temporary name (``.<id>.<n>.bundle.part``), fsynced and renamed
only when complete and only while the attempt still owns the request: an interrupted attempt leaves no
bundle, and the next attempt removes what it left. The sha256 recorded is that of the plaintext zip:
it is what the requester downloads and verifies.

Bundle layout::

    dicom/<study pseudonym UID>/<series pseudonym UID>/<SOP instance pseudonym UID>.dcm
    manifest.json           request, project, protocol, purpose, profile, files with their sha256
    deid-report.json        one entry per instance: released / held_back (reasons, leak-gate findings
                            without values) / error; instances are numbered, never named by source UIDs

Before the bundle is sealed, manifest and report are checked against every source identifier of
the cohort (patient IDs and names, accession numbers, source UIDs): they must contain none.

A request whose destination is a DICOMweb research archive (``destinations.py``) gets no bundle:
each released file (de-identified, through the leak gate) is STOWed to the archive in batches as
the job goes, the outcome of every file is kept in the request's ``delivery`` (checked against the
source identifiers like the report), and a 110106 Export per batch names the archive as the recipient.
Before a batch leaves, its pseudonym-map entries are recorded, its files are recorded as ``sending``
(``export_delivery_file``) and its 110106 is durable; the destination's answer is recorded as soon as
it comes. So a push that fails or is killed mid-way keeps the list of what was delivered and the map
of what was disclosed, and a re-run (a new attempt after a crash) skips the files already stored.

Every write of a job is fenced by its attempt number (:mod:`compliance.exports.recovery`): a job whose
request was handed to another attempt stops at its next checkpoint and changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom

from compliance.audit.events import (
    Outcome,
    PatientRef,
    StudyRef,
    UserRef,
    export_event,
    instances_transferred_event,
)
from compliance.audit.recorder import AuditRecorder
from compliance.crypto.streaming import StreamEncryptor
from compliance.deid.engine import Deidentifier
from compliance.deid.profiles import load_profile
from compliance.deid.writer import encode
from compliance.dicomweb.stow import parse_content_type, split_parts
from compliance.errors import ComplianceError, UpstreamError, UpstreamUnavailable
from compliance.exports.destinations import (
    DICOMWEB,
    FAILED,
    STORED,
    UNCONFIRMED,
    DestinationRegistry,
    DicomwebDestination,
    DicomwebStowClient,
)
from compliance.exports.interfaces import ArchiveReader, InvalidExportRequest, StowClient
from compliance.exports.keys import ProviderPseudonymSecretSource, PseudonymMap, bundle_key_id
from compliance.exports.models import ExportDeliveryFile, ExportRequest
from compliance.exports.recovery import (
    LeaseKeeper,
    LeaseLost,
    NoLease,
    bundle_file_name,
    partial_file_name,
)
from compliance.exports.service import ExportService, bundle_aad

log = logging.getLogger(__name__)

DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _kind_of(path: str) -> str:
    """``search`` or ``retrieve``: what an archive request was, without its UIDs."""
    return "retrieve" if "/instances/" in path else "search"


class DicomwebArchiveReader:
    """A synchronous DICOMweb client for jobs (workers have no event loop); Basic auth, the gateway's."""

    def __init__(self, base_url: str, dicomweb_path: str, *, username: str, password: str,
                 timeout: float = 60.0) -> None:
        self._root = dicomweb_path.rstrip("/")
        self._client = httpx.Client(base_url=base_url.rstrip("/"), auth=httpx.BasicAuth(username, password),
                                    timeout=httpx.Timeout(timeout, connect=5.0))

    def _get(self, path: str, *, params: list[tuple[str, str | int | float | bool | None]] | None = None,
             accept: str) -> httpx.Response:
        try:
            resp = self._client.get(self._root + path, params=params, headers={"Accept": accept})
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("the archive cannot be reached") from exc
        if resp.status_code in (401, 403):
            raise UpstreamError("the archive refused the gateway's credentials")
        if resp.status_code not in (200, 204):
            # never the path: its UIDs are source identifiers, and this message reaches the requester
            raise UpstreamError(f"the archive answered {resp.status_code} to a {_kind_of(path)} request")
        return resp

    def find_studies(self, filters: dict[str, str]) -> list[str]:
        resp = self._get("/studies", params=[*filters.items(), ("includefield", "0020000D")],
                         accept="application/dicom+json")
        items = resp.json() if resp.content else []
        return [str(i["0020000D"]["Value"][0]) for i in items if i.get("0020000D", {}).get("Value")]

    def find_instances(self, study_uid: str) -> list[tuple[str, str]]:
        resp = self._get(f"/studies/{study_uid}/instances", accept="application/dicom+json")
        items = resp.json() if resp.content else []
        return sorted((str(i["0020000E"]["Value"][0]), str(i["00080018"]["Value"][0])) for i in items)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        resp = self._get(f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", accept=DICOM_ACCEPT)
        parts = multipart_parts(resp.headers.get("content-type", ""), resp.content)
        if len(parts) != 1:
            raise UpstreamError(f"the archive returned {len(parts)} parts for one instance")
        return parts[0]

    def close(self) -> None:
        self._client.close()


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related response of the archive (the STOW-RS parser's own splitting)."""
    try:
        return [bytes(payload) for _, payload in split_parts(body, parse_content_type(content_type))]
    except ComplianceError as exc:
        raise UpstreamError(f"the archive's multipart response is malformed: {exc.message}") from exc


class EncryptingFile:
    """A write-only, non-seekable file for ``zipfile``: plaintext in, ciphertext to ``out``, sha256 kept."""

    def __init__(self, out: io.BufferedWriter, encryptor: StreamEncryptor) -> None:
        self._out = out
        self._enc = encryptor
        self._sha = hashlib.sha256()
        self._pos = 0
        out.write(encryptor.header.raw)

    def write(self, data: bytes) -> int:
        data = bytes(data)
        self._sha.update(data)
        self._pos += len(data)
        for segment in self._enc.update(data):
            self._out.write(segment)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def finish(self) -> tuple[int, str]:
        self._out.write(self._enc.finalize())
        return self._pos, self._sha.hexdigest()


@dataclass
class _Counters:
    total: int = 0
    processed: int = 0
    released: int = 0
    held_back: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Cohort:
    patients: dict[str, str | None] = field(default_factory=dict)
    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    identifiers: set[str] = field(default_factory=set)
    pseudonyms: set[tuple[str, str, str]] = field(default_factory=set)

    def disclosed(self, p: _Processed) -> None:
        """Count an instance that left (in the bundle, or stored at a destination) for the disclosure."""
        if p.patient_id:
            self.patients.setdefault(p.patient_id, p.patient_name)
        classes = self.studies.setdefault(p.study, {})
        classes[p.sop_class] = classes.get(p.sop_class, 0) + 1

    def disclosure(self) -> tuple[list[dict[str, str | None]], list[dict[str, Any]]]:
        return ([{"id": pid, "name": name} for pid, name in sorted(self.patients.items())],
                [{"uid": uid, "sop_classes": classes} for uid, classes in sorted(self.studies.items())])


@dataclass
class _Processed:
    """One instance of the plan after de-identification: its report entry, and the file if released."""

    entry: dict[str, Any]
    study: str
    patient_id: str | None = None
    patient_name: str | None = None
    sop_class: str = ""
    data: bytes | None = None
    path: str = ""
    sop_instance_uid: str = ""
    #: (kind, original, pseudonym) of this instance, for the pseudonym map
    pseudonyms: set[tuple[str, str, str]] = field(default_factory=set)


_SOURCE_ATTRS = (("patient_id", "PatientID"), ("accession", "AccessionNumber"), ("study_uid", "StudyInstanceUID"),
                 ("series_uid", "SeriesInstanceUID"), ("sop_uid", "SOPInstanceUID"))

_Transferred = dict[str, tuple[str | None, str | None, dict[str, int]]]
Lease = LeaseKeeper | NoLease


class ExportJob:
    def __init__(self, service: ExportService, pseudonyms: PseudonymMap, auditor: AuditRecorder,
                 archive_factory: Callable[[], ArchiveReader], *, bundles_dir: Path, archive_id: str,
                 progress_every_seconds: float = 0.5, destinations: DestinationRegistry | None = None,
                 stow_client_factory: Callable[[DicomwebDestination], StowClient] = DicomwebStowClient,
                 stow_batch_instances: int = 16, stow_batch_max_bytes: int = 64 << 20) -> None:
        self._service = service
        self._map = pseudonyms
        self._auditor = auditor
        self._archive_factory = archive_factory
        self._dir = bundles_dir
        self._archive_id = archive_id
        self._every = progress_every_seconds
        self._destinations = destinations or DestinationRegistry()
        self._stow_client_factory = stow_client_factory
        self._stow_batch = max(1, stow_batch_instances)
        self._stow_bytes = stow_batch_max_bytes

    def run(self, request_id: str, attempt: int | None = None, lease: Lease | None = None) -> str:
        """Run a claimed (running) request to ready or failed; return the final state.

        ``attempt`` is what :meth:`ExportService.claim` returned (the fencing token; the row's by
        default), ``lease`` the claim's :class:`~compliance.exports.recovery.LeaseKeeper`. Returns
        ``"lost"`` when the request was handed to another attempt meanwhile: this one wrote nothing more.
        """
        counters = _Counters()
        lease = lease or NoLease()
        if attempt is None:
            attempt = self._service.load(request_id).attempts
        try:
            return self._run(request_id, attempt, lease, counters)
        except LeaseLost as exc:
            log.warning("export job %s, attempt %s, stopped: %s", request_id, attempt, exc)
            return "lost"
        except Exception as exc:
            log.exception("export job %s failed", request_id)
            message = exc.message if hasattr(exc, "message") else f"{type(exc).__name__}"
            delivery = exc.delivery if isinstance(exc, _JobError) else None
            if not self._service.fail(request_id, str(message), counters.as_dict(), delivery=delivery,
                                      attempt=attempt):
                return "lost"
            return "failed"

    def _run(self, request_id: str, attempt: int, lease: Lease, c: _Counters) -> str:
        row = self._service.load(request_id)
        if row.state != "running" or row.attempts != attempt:
            raise LeaseLost(f"request {request_id} is {row.state} (attempt {row.attempts}), not this attempt's")
        # the project registry may have changed since the approval (closed, a membership removed)
        if why := self._service.projects.still_grants(row.project, row.requester_membership):
            raise _JobError(f"the export was not run: {why}")
        destination = json.loads(row.destination)
        if destination.get("kind") == DICOMWEB:
            return self._run_push(row, destination.get("name", ""), c, attempt, lease)
        self._run_bundle(row, c, attempt, lease)
        return "ready"

    def _plan(self, row: ExportRequest, archive: ArchiveReader, c: _Counters,
              attempt: int) -> list[tuple[str, str, str]]:
        cohort_spec = json.loads(row.cohort)
        studies = cohort_spec.get("study_uids") or archive.find_studies(cohort_spec.get("filters") or {})
        plan = [(s, series, sop) for s in studies for series, sop in archive.find_instances(s)]
        if not plan:
            raise _JobError("the cohort matched no instance in the archive")
        c.total = len(plan)
        self._progress(row.id, attempt, c)
        return plan

    def _progress(self, request_id: str, attempt: int, c: _Counters) -> None:
        if not self._service.progress(request_id, attempt=attempt, **c.as_dict()):
            raise LeaseLost("the request is no longer this attempt's")

    def _engine(self, row: ExportRequest) -> Deidentifier:
        return Deidentifier(load_profile(row.profile), row.project, ProviderPseudonymSecretSource(self._service.keys))

    def _count(self, c: _Counters, entry: dict[str, Any]) -> None:
        c.processed += 1
        name = entry["status"] if entry["status"] != "error" else "errors"
        setattr(c, name, getattr(c, name) + 1)

    def discard_leftovers(self, request_id: str, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Remove what attempts of a request that never finished left in the bundles directory.

        Only for a request that is running (under the caller's attempt) or failed: its row points to
        no bundle, so every bundle-like file of it is a leftover (a partial, or a complete file whose
        attempt lost the request before it could finish).
        """
        removed = 0
        if not self._dir.is_dir():
            return 0
        for pattern in (f".{request_id}.*.bundle.part", f"{request_id}.bundle", f"{request_id}.*.bundle"):
            for path in self._dir.glob(pattern):
                if path.name not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # -- destination: the encrypted bundle -----------------------------------------------------
    def _run_bundle(self, row: ExportRequest, c: _Counters, attempt: int, lease: Lease) -> None:
        request_id = row.id
        engine = self._engine(row)
        requester = UserRef(user_id=row.requester_id, username=row.requester_name)
        self._dir.mkdir(parents=True, exist_ok=True)
        final = self._dir / bundle_file_name(request_id, attempt)
        partial = self._dir / partial_file_name(request_id, attempt)
        if self.discard_leftovers(request_id, keep={final.name, partial.name}):
            log.info("export job %s, attempt %s: removed the files an interrupted attempt left", request_id, attempt)
        archive = self._archive_factory()
        transferred: _Transferred = {}  # what was read from the archive: audited however the job ends
        try:
            plan = self._plan(row, archive, c, attempt)
            encryptor = StreamEncryptor(data_key=self._service.keys.key(row.project, "bundle"),
                                        key_id=bundle_key_id(row.project), associated_data=bundle_aad(request_id))
            cohort = _Cohort()
            report: list[dict[str, Any]] = []
            files: list[dict[str, Any]] = []
            last = time.monotonic()
            with partial.open("wb") as out:
                sink = EncryptingFile(out, encryptor)
                # the stubs want close() too, which ZipFile never calls on a file object it was given
                with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:  # type: ignore[call-overload]
                    for n, (study, series, sop) in enumerate(plan, start=1):
                        lease.check()
                        p = self._one(engine, archive, n, study, series, sop, cohort, transferred)
                        if p.data is not None:
                            zf.writestr(p.path, p.data)
                            cohort.disclosed(p)
                            files.append({"path": p.path, "sha256": hashlib.sha256(p.data).hexdigest(),
                                          "size": len(p.data), "sop_class_uid": p.sop_class})
                        report.append(p.entry)
                        self._count(c, p.entry)
                        if time.monotonic() - last >= self._every:
                            self._progress(request_id, attempt, c)
                            last = time.monotonic()
                    if not c.released:
                        raise _JobError("no instance passed de-identification and the leak gate")
                    manifest = {
                        "export_request": request_id, "project": row.project, "protocol": row.protocol,
                        "purpose": row.purpose, "profile": row.profile,
                        "created_at": datetime.now(UTC).isoformat(), "deidentification": "PS3.15 Annex E",
                        "summary": {"instances": c.total, "released": c.released, "held_back": c.held_back,
                                    "errors": c.errors},
                        "files": files,
                    }
                    texts = {"manifest.json": _json(manifest),
                             "deid-report.json": _json({"profile": row.profile, "project": row.project,
                                                        "files": report})}
                    for name, data in texts.items():
                        _refuse_identifiers(name, data, cohort.identifiers)
                        zf.writestr(name, data)
                size, checksum = sink.finish()
                out.flush()
                os.fsync(out.fileno())
            # complete: it takes the bundle's name only while this attempt still owns the request
            lease.check()
            if not self._service.owns(request_id, attempt):
                raise LeaseLost("the request was handed to another attempt before the bundle was complete")
            os.replace(partial, final)
            _fsync_dir(self._dir)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            archive.close()
            self._audit_transfers(requester, row.purpose, transferred)
        self._map.record(row.project, cohort.pseudonyms)
        patients, studies = cohort.disclosure()
        if not self._service.finish(request_id, bundle_path=final, bundle_size=size, checksum=checksum,
                                    patients=patients, studies=studies, counters=c.as_dict(), attempt=attempt):
            final.unlink(missing_ok=True)  # this attempt's own name: never the file the request points to
            raise LeaseLost("the request was handed to another attempt before the bundle was recorded")

    # -- destination: a DICOMweb research archive (STOW-RS) ------------------------------------
    def _run_push(self, row: ExportRequest, name: str, c: _Counters, attempt: int, lease: Lease) -> str:
        """De-identify, gate, and STOW released instances in batches; the status reports each file.

        ``ready``: at least one instance was stored (``delivery`` says which were not, and why);
        ``failed``: none was, or the job stopped on an error (``delivery`` then says what was delivered
        before it stopped).

        Each batch, before it leaves: its pseudonym-map entries are recorded (re-identification of
        what the destination holds must not depend on the job ending well), its 110106 Export (the
        destination as recipient, the source patients and studies of the batch) is durable in the
        outbox, and its files are recorded as ``sending`` (fenced: an attempt that lost the request
        sends nothing). The destination's answer is recorded per file as soon as it comes. A job
        killed mid-push therefore never leaves a disclosure unaudited nor a delivered file unlisted.
        A batch the destination refused or never received whole is followed by a second 110106 with
        a failure outcome naming what was not stored: the trail may over-report an attempt, never
        under-report. A re-run skips the files an earlier attempt stored: they are neither sent nor
        disclosed again.
        """
        request_id = row.id
        try:
            dest = self._destinations.get(name)
        except InvalidExportRequest as exc:  # removed from the allow-list since the request was made
            raise _JobError(f"the destination {name!r} is no longer configured") from exc
        if not dest.allows(row.project):
            raise _JobError(f"project {row.project!r} may no longer export to {name!r}")
        engine = self._engine(row)
        requester = UserRef(user_id=row.requester_id, username=row.requester_name)
        earlier = self._service.delivered_files(request_id)  # what earlier attempts sent (a re-run)
        seen: set[str] = set()
        archive = self._archive_factory()
        client: StowClient | None = None
        cohort = _Cohort()
        files: list[dict[str, Any]] = []
        tally = {STORED: 0, FAILED: 0, UNCONFIRMED: 0}
        batch: list[_Processed] = []
        batches = 0

        def disclosure_event(sent: list[_Processed], outcome: Outcome, description: str) -> Any:
            part = _Cohort()
            for p in sent:
                part.disclosed(p)
            patients, studies = part.disclosure()
            return export_event(
                user=requester, recipient=dest.name, purpose=row.purpose,
                patients=[PatientRef(p["id"], p.get("name")) for p in patients if p["id"]],
                studies=[StudyRef(s["uid"], sop_classes=s["sop_classes"]) for s in studies],
                destination_uri=dest.stow_url, anonymized=True, outcome=outcome,
                outcome_description=(f"research export {row.id} (project {row.project}, protocol {row.protocol}, "
                                     f"profile {row.profile}) to {dest.name} ({dest.stow_url}): {description}"))

        def flush() -> None:
            nonlocal batches
            assert client is not None
            lease.check()
            sent = list(batch)
            batch.clear()
            batches += 1
            pseudonyms: set[tuple[str, str, str]] = set()
            for p in sent:
                pseudonyms |= p.pseudonyms
            # the map of what is about to be disclosed, then the disclosure itself, durable before a
            # byte leaves (raises, and nothing is sent, if either cannot be recorded)
            self._map.record(row.project, pseudonyms)
            self._auditor.record_now(disclosure_event(sent, Outcome.SUCCESS, f"{len(sent)} instances sent"))
            # the files are on their way (fenced: an attempt that lost the request sends nothing)
            if not self._service.record_sending(request_id, attempt, batches,
                                                [(p.sop_instance_uid, p.entry["instance"]) for p in sent]):
                raise LeaseLost("the request was handed to another attempt; the batch was not sent")
            for p in sent:
                p.entry.update(status="sending", attempt=attempt)
            failure: Exception | None = None
            try:
                outcomes = client.store([(p.sop_instance_uid, p.data or b"") for p in sent])
            except Exception as exc:  # sent perhaps: the destination may hold it
                failure = exc
                outcomes = dict.fromkeys((p.sop_instance_uid for p in sent), (
                    UNCONFIRMED, f"the push stopped while the batch was being sent ({type(exc).__name__})"))
            results = {p.sop_instance_uid: outcomes.get(p.sop_instance_uid,
                                                        (UNCONFIRMED, "no outcome for the instance")) for p in sent}
            recorded = self._service.record_outcomes(request_id, attempt, results)
            not_stored: list[_Processed] = []
            for p in sent:
                status, reason = results[p.sop_instance_uid]
                tally[status] += 1
                p.entry["status"] = status
                if reason:
                    p.entry["reason"] = reason
                if status != FAILED:  # stored, or may have been: a disclosure either way
                    cohort.disclosed(p)
                if status != STORED:
                    not_stored.append(p)
            if not_stored:
                reasons = "; ".join(sorted({str(p.entry.get("reason")) for p in not_stored}))[:500]
                self._auditor.record_now(disclosure_event(
                    not_stored, Outcome.SERIOUS_FAILURE if len(not_stored) == len(sent) else Outcome.MINOR_FAILURE,
                    f"{len(not_stored)} of {len(sent)} instances sent were not confirmed stored ({reasons})"))
            if failure is not None:
                raise failure
            if not recorded:
                raise LeaseLost("the request was handed to another attempt while the batch was sent")

        transferred: _Transferred = {}  # what was read from the archive: audited however the job ends
        try:
            plan = self._plan(row, archive, c, attempt)
            client = self._stow_client_factory(dest)
            last = time.monotonic()
            for n, (study, series, sop) in enumerate(plan, start=1):
                lease.check()
                p = self._one(engine, archive, n, study, series, sop, cohort, transferred)
                self._count(c, p.entry)
                # digests of identifying values stay out of the status (a bundle's report has them); no bundle path
                entry = {k: v for k, v in p.entry.items() if k not in ("findings", "output")}
                p.entry = entry
                files.append(entry)
                if p.data is not None:
                    entry["sop_instance_uid"] = p.sop_instance_uid
                    seen.add(p.sop_instance_uid)
                    prior = earlier.get(p.sop_instance_uid)
                    if prior is not None and prior.status == STORED:
                        # stored by an earlier attempt (before its worker died): neither sent nor disclosed again
                        entry.update(status=STORED, attempt=prior.attempt)
                        tally[STORED] += 1
                        cohort.disclosed(p)
                    else:
                        batch.append(p)
                        if len(batch) >= self._stow_batch or \
                                sum(len(b.data or b"") for b in batch) >= self._stow_bytes:
                            flush()
                if time.monotonic() - last >= self._every:
                    self._progress(request_id, attempt, c)
                    last = time.monotonic()
            if batch:
                flush()
            if not c.released:
                raise _JobError("no instance passed de-identification and the leak gate")
        except LeaseLost:
            raise
        except Exception as exc:
            # what was delivered before the job stopped stays on the request, with the map of it
            for entry in files:
                prior = earlier.get(entry.get("sop_instance_uid", ""))
                if entry["status"] == "released" and prior is not None and prior.status in ("sending", UNCONFIRMED):
                    # an earlier attempt sent it without an answer: it may be at the destination
                    entry.update(status=UNCONFIRMED, attempt=prior.attempt,
                                 reason=prior.reason or "sent by an earlier attempt that was interrupted; the "
                                                        "destination's answer is unknown")
                    tally[UNCONFIRMED] += 1
                elif entry["status"] == "released":
                    entry.update(status="not_sent", reason="the job stopped before this file was sent")
                elif entry["status"] == "sending":  # sent, the answer not recorded
                    entry.update(status=UNCONFIRMED, reason="the job stopped before the destination's answer "
                                                            "was recorded")
                    tally[UNCONFIRMED] += 1
            message = exc.message if hasattr(exc, "message") else type(exc).__name__
            delivery: dict[str, Any] | None  # None when the report itself cannot be kept
            delivery = self._delivery(dest, c, tally, files, earlier, seen)
            if delivery["stored"] or delivery["unconfirmed"]:
                message = (f"{message} (before the job stopped: {delivery['stored']} instances stored at {dest.name}, "
                           f"{delivery['unconfirmed']} unconfirmed; see delivery.files)")
            try:
                _refuse_identifiers("the delivery report", _json(delivery), cohort.identifiers)
            except _JobError:
                delivery = None
            raise _JobError(str(message), delivery=delivery) from exc
        finally:
            archive.close()
            if client is not None:
                client.close()
            self._audit_transfers(requester, row.purpose, transferred)
        delivery = self._delivery(dest, c, tally, files, earlier, seen)
        _refuse_identifiers("the delivery report", _json(delivery), cohort.identifiers)
        self._map.record(row.project, cohort.pseudonyms)
        patients, studies = cohort.disclosure()
        if not delivery["stored"]:
            if not self._service.fail(
                    request_id, f"no instance was stored at {dest.name}: "
                    + "; ".join(sorted({str(f.get("reason")) for f in delivery["files"] if f.get("reason")}))[:1500],
                    c.as_dict(), delivery=delivery, attempt=attempt):
                raise LeaseLost("the request was handed to another attempt")
            return "failed"
        if not self._service.finish_delivery(request_id, delivery=delivery, patients=patients, studies=studies,
                                             counters=c.as_dict(), attempt=attempt):
            raise LeaseLost("the request was handed to another attempt")
        return "ready"

    @staticmethod
    def _delivery(dest: DicomwebDestination, c: _Counters, tally: dict[str, int], files: list[dict[str, Any]],
                  earlier: dict[str, ExportDeliveryFile], seen: set[str]) -> dict[str, Any]:
        """The delivery report; files an earlier attempt sent that this one did not reach are listed too."""
        tally = dict(tally)
        files = list(files)
        for uid, f in sorted(earlier.items(), key=lambda item: (item[1].instance, item[0])):
            if uid in seen:
                continue
            status = UNCONFIRMED if f.status == "sending" else f.status
            entry: dict[str, Any] = {"instance": f.instance, "sop_instance_uid": uid, "status": status,
                                     "attempt": f.attempt}
            reason = f.reason or ("the job was interrupted while this file was being sent"
                                  if f.status == "sending" else None)
            if reason:
                entry["reason"] = reason
            tally[status] += 1
            files.append(entry)
        return {"destination": dest.public(), "stow_url": dest.stow_url, "instances": c.total,
                "released": c.released + sum(1 for uid in earlier if uid not in seen),
                "stored": tally[STORED], "failed": tally[FAILED], "unconfirmed": tally[UNCONFIRMED], "files": files}

    def _one(self, engine: Deidentifier, archive: ArchiveReader, n: int, study: str, series: str, sop: str,
             cohort: _Cohort, transferred: _Transferred) -> _Processed:
        p = _Processed(entry={"instance": n}, study=study)
        cohort.identifiers.update((study, series, sop))
        try:
            ds = pydicom.dcmread(io.BytesIO(archive.retrieve_instance(study, series, sop)))
        except (UpstreamError, UpstreamUnavailable):
            raise
        except Exception as exc:
            p.entry.update(status="error", reasons=[f"unreadable: {type(exc).__name__}"])
            return p
        source = {kind: str(ds.get(attr, "") or "").strip() for kind, attr in _SOURCE_ATTRS}
        patient_name = str(ds.get("PatientName", "") or "") or None
        sop_class = str(ds.get("SOPClassUID", "") or "")
        p.patient_id, p.patient_name, p.sop_class = source["patient_id"] or None, patient_name, sop_class
        cohort.identifiers.update(v for v in (*source.values(), patient_name) if v and len(v) >= 3)
        pid_name_classes = transferred.setdefault(study, (source["patient_id"] or None, patient_name, {}))
        pid_name_classes[2][sop_class] = pid_name_classes[2].get(sop_class, 0) + 1
        if not source["patient_id"]:
            # a disclosure must name whose data left (the 110106 Export needs the patient): held back
            p.entry.update(status="held_back", reasons=["no PatientID: the disclosure could not name the patient"])
            return p
        try:
            result = engine.deidentify(ds)
        except Exception as exc:
            p.entry.update(status="error", reasons=[f"could not de-identify: {type(exc).__name__}"])
            return p
        if not result.released or result.dataset is None:
            # where and what kind, never a digest of the value: an unsalted hash of a patient ID or a
            # birth date is reversed by brute force, and this report goes to the researcher
            p.entry.update(status="held_back", reasons=result.reasons, pixels=result.pixels,
                           findings=[{"path": f.path, "kind": f.kind} for f in result.findings])
            return p
        out = result.dataset
        data = encode(out)
        target = {kind: str(out.get(attr, "") or "").strip() for kind, attr in _SOURCE_ATTRS}
        for kind, original in source.items():
            if original and target[kind] and target[kind] != original:
                p.pseudonyms.add((kind, original, target[kind]))
        cohort.pseudonyms |= p.pseudonyms
        p.path = f"dicom/{target['study_uid']}/{target['series_uid']}/{target['sop_uid']}.dcm"
        p.data, p.sop_instance_uid = data, target["sop_uid"]
        p.entry.update(status="released", output=p.path, pixels=result.pixels, notes=result.reasons)
        return p

    def _audit_transfers(self, requester: UserRef, purpose: str,
                         transferred: dict[str, tuple[str | None, str | None, dict[str, int]]]) -> None:
        for study, (pid, name, classes) in transferred.items():
            self._auditor.record_now(instances_transferred_event(
                user=requester, gateway_id=self._service.gateway_id, source_id=self._archive_id,
                destination_id=f"{self._service.gateway_id}/export-job", outcome=Outcome.SUCCESS,
                patients=[PatientRef(pid, name)] if pid else [], studies=[StudyRef(study, sop_classes=classes)],
                purpose_of_use=[purpose],
                outcome_description="read from the archive for an approved research export (de-identified in memory)"))


class _JobError(Exception):
    def __init__(self, message: str, *, delivery: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: a push's delivery report as far as it went (kept on the failed request)
        self.delivery = delivery


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _refuse_identifiers(name: str, data: bytes, identifiers: set[str]) -> None:
    """A second gate over the files the job writes itself (the leak gate covered every DICOM file).

    Bounded like the leak gate's expression, so an identifier never matches inside a longer token
    (a digest, a pseudonym UID). Short all-digit identifiers are skipped: these files carry numbers
    of their own (counts, sizes, instance numbers) and no source value is ever copied into them.
    """
    text = data.decode("utf-8").upper()
    idents = [i.upper() for i in identifiers if not (i.isdigit() and len(i) < 8)]
    if not idents:
        return
    pattern = re.compile(r"(?<![A-Z0-9_.])(?:" + "|".join(re.escape(i) for i in sorted(idents, key=len, reverse=True))
                         + r")(?![A-Z0-9_])")
    if pattern.search(text):
        raise _JobError(f"{name} would contain a source identifier; the bundle was not released")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
