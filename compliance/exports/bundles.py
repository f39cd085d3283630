"""The bundle store: the encrypted bundles of ready requests, served to their requester until they
expire, then deleted.

A bundle is served only to its requester, only while ``ready`` and before ``expires_at``, decrypted
as it streams (:func:`compliance.crypto.streaming.iter_decrypt`, associated data :func:`bundle_aad`);
the 110106 Export of the download (the source patients and studies, from the request's sealed
disclosure) is recorded before any byte leaves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit.codes import Action
from compliance.audit.events import export_event
from compliance.audit.message import PatientRef, StudyRef, UserRef
from compliance.crypto.streaming import iter_decrypt
from compliance.db.session import rows_matched
from compliance.exports.audit import ExportAudit, destination_label
from compliance.exports.destinations import DICOMWEB
from compliance.exports.interfaces import BundleExpired, ExportNotFound, ExportStateConflict
from compliance.exports.keys import ProjectKeyStore, open_disclosure
from compliance.exports.models import ExportRequest
from compliance.exports.rows import aware, load_request


def bundle_aad(request_id: str) -> bytes:
    return b"export bundle v1\x00" + request_id.encode()


@dataclass(frozen=True)
class Bundle:
    chunks: Iterator[bytes]
    size: int
    checksum_sha256: str
    filename: str


class BundleStore:
    def __init__(self, sessions: sessionmaker[Session], audit: ExportAudit, keys: ProjectKeyStore, *,
                 clock: Callable[[], datetime]) -> None:
        self._sessions = sessions
        self._audit = audit
        self._keys = keys
        self._clock = clock

    def open_bundle(self, request_id: str, user: UserRef, *, destination_uri: str) -> Bundle:
        """The requester's decrypted bundle, streamed; the 110106 Export is recorded before any byte."""
        row = load_request(self._sessions, request_id)
        if row.requester_id != user.user_id:
            raise ExportNotFound("no such export request")
        expires = aware(row.expires_at)
        if json.loads(row.destination).get("kind") == DICOMWEB:
            raise ExportStateConflict(f"this export is delivered to {destination_label(row)}; it has no bundle")
        if row.state == "expired" or (row.state == "ready" and expires is not None and expires <= self._clock()):
            raise BundleExpired("the bundle has expired")
        if row.state != "ready" or not row.bundle_path or row.disclosure_sealed is None:
            raise ExportStateConflict(f"the export request is {row.state}; the bundle is not ready")
        disclosure = open_disclosure(self._keys, row.project, row.id, row.disclosure_sealed)
        path = Path(row.bundle_path)
        fh = path.open("rb")  # opened before the audit: a missing file fails before a disclosure is recorded
        self._audit.auditor.record_now(export_event(
            user=user, recipient=user.username or user.user_id, purpose=row.purpose,
            patients=[PatientRef(patient["id"], patient.get("name")) for patient in disclosure["patients"]],
            studies=[StudyRef(study["uid"], sop_classes=study.get("sop_classes", {}))
                     for study in disclosure["studies"]],
            destination_uri=destination_uri, anonymized=True,
            outcome_description=f"research export {row.id} (project {row.project}, protocol {row.protocol}, "
                                f"profile {row.profile}) downloaded by its requester"))

        def chunks() -> Iterator[bytes]:
            with fh:
                yield from iter_decrypt(iter(lambda: fh.read(1 << 20), b""),
                                        unwrap=self._keys.unwrap_bundle_header,
                                        associated_data=bundle_aad(row.id))

        assert row.bundle_size is not None and row.checksum_sha256 is not None
        return Bundle(chunks(), row.bundle_size, row.checksum_sha256, f"export-{row.id}.zip")

    def expire_due(self) -> int:
        """ready bundles past ``expires_at`` -> expired; the encrypted file is deleted."""
        now = self._clock()
        with self._sessions() as session:
            due = [(r.id, r.bundle_path) for r in session.scalars(
                select(ExportRequest).where(ExportRequest.state == "ready", ExportRequest.expires_at <= now))]
        expired = 0
        for request_id, path in due:
            with self._sessions() as session, session.begin():
                done = rows_matched(session.execute(update(ExportRequest).where(ExportRequest.id == request_id,
                                                                            ExportRequest.state == "ready")
                                                .values(state="expired")))
            if done:
                if path:
                    Path(path).unlink(missing_ok=True)
                self._audit.step(None, load_request(self._sessions, request_id), Action.UPDATE, "expired")
                expired += 1
        return expired
