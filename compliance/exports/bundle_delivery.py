"""Bundle delivery: the released instances of a request, sealed into an encrypted zip for its requester.

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
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

from compliance.audit.message import UserRef
from compliance.crypto.files import EncryptingFile
from compliance.crypto.streaming import StreamEncryptor
from compliance.exports.bundles import bundle_aad
from compliance.exports.interfaces import InstanceReport
from compliance.exports.keys import PseudonymMap, bundle_key_id
from compliance.exports.models import ExportRequest
from compliance.exports.pipeline import (
    Cohort,
    Counters,
    JobError,
    JobSteps,
    Lease,
    Transferred,
    deidentify_instance,
    refuse_identifiers,
    report_json,
)
from compliance.exports.recovery import LeaseLost, bundle_file_name, partial_file_name

log = logging.getLogger(__name__)


class ManifestFile(TypedDict):
    """A released file in the bundle's ``manifest.json``."""

    path: str
    sha256: str
    size: int
    sop_class_uid: str


class BundleDelivery:
    def __init__(self, steps: JobSteps, pseudonyms: PseudonymMap, *, bundles_dir: Path) -> None:
        self._steps = steps
        self._pseudonyms = pseudonyms
        self._dir = bundles_dir

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

    def run(self, row: ExportRequest, counters: Counters, attempt: int, lease: Lease) -> None:
        steps, ledger = self._steps, self._steps.ledger
        request_id = row.id
        engine = steps.engine(row)
        requester = UserRef(user_id=row.requester_id, username=row.requester_name)
        self._dir.mkdir(parents=True, exist_ok=True)
        final = self._dir / bundle_file_name(request_id, attempt)
        partial = self._dir / partial_file_name(request_id, attempt)
        if self.discard_leftovers(request_id, keep={final.name, partial.name}):
            log.info("export job %s, attempt %s: removed the files an interrupted attempt left", request_id, attempt)
        archive = steps.archive_factory()
        transferred: Transferred = {}  # what was read from the archive: audited however the job ends
        try:
            plan = steps.plan(row, archive, counters, attempt)
            encryptor = StreamEncryptor(data_key=steps.keys.key(row.project, "bundle"),
                                        key_id=bundle_key_id(row.project), associated_data=bundle_aad(request_id))
            cohort = Cohort()
            report: list[InstanceReport] = []
            files: list[ManifestFile] = []
            last = time.monotonic()
            with partial.open("wb") as out:
                sink = EncryptingFile(out, encryptor)
                with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:
                    for n, (study, series, sop) in enumerate(plan, start=1):
                        lease.check()
                        instance = deidentify_instance(engine, archive, n, study, series, sop, cohort, transferred)
                        if instance.data is not None:
                            zf.writestr(instance.path, instance.data)
                            cohort.disclosed(instance)
                            files.append(ManifestFile(
                                path=instance.path, sha256=hashlib.sha256(instance.data).hexdigest(),
                                size=len(instance.data), sop_class_uid=instance.sop_class))
                        report.append(instance.entry)
                        counters.count(instance.entry)
                        if time.monotonic() - last >= steps.progress_every_seconds:
                            steps.progress(request_id, attempt, counters)
                            last = time.monotonic()
                    if not counters.released:
                        raise JobError("no instance passed de-identification and the leak gate")
                    manifest = {
                        "export_request": request_id, "project": row.project, "protocol": row.protocol,
                        "purpose": row.purpose, "profile": row.profile,
                        "created_at": datetime.now(UTC).isoformat(), "deidentification": "PS3.15 Annex E",
                        "summary": {"instances": counters.total, "released": counters.released,
                                    "held_back": counters.held_back, "errors": counters.errors},
                        "files": files,
                    }
                    texts = {"manifest.json": report_json(manifest),
                             "deid-report.json": report_json({"profile": row.profile, "project": row.project,
                                                              "files": report})}
                    for name, data in texts.items():
                        refuse_identifiers(name, data, cohort.identifiers)
                        zf.writestr(name, data)
                size, checksum = sink.finish()
                out.flush()
                os.fsync(out.fileno())
            # complete: it takes the bundle's name only while this attempt still owns the request
            lease.check()
            if not ledger.owns(request_id, attempt):
                raise LeaseLost("the request was handed to another attempt before the bundle was complete")
            os.replace(partial, final)
            _fsync_dir(self._dir)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            archive.close()
            steps.audit_transfers(requester, row.purpose, transferred)
        self._pseudonyms.record(row.project, cohort.pseudonyms)
        patients, studies = cohort.disclosure()
        if not ledger.finish(request_id, bundle_path=final, bundle_size=size, checksum=checksum,
                             patients=patients, studies=studies, counters=counters.as_dict(), attempt=attempt):
            final.unlink(missing_ok=True)  # this attempt's own name: never the file the request points to
            raise LeaseLost("the request was handed to another attempt before the bundle was recorded")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
