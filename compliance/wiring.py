"""The composition root: every service of the gateway is built here, once per process, from one
:class:`~compliance.config.Settings`. The app (:mod:`compliance.app`), the CLIs (:mod:`compliance.cli`)
and the export workers (:mod:`compliance.worker`) build what they need through :class:`Wiring` and
nothing else; no domain module builds another domain's services.
"""

from __future__ import annotations

from dataclasses import dataclass

from compliance.archive.operations import KeyOperations
from compliance.archive.shred import ShredRequests
from compliance.audit.recorder import AuditRecorder
from compliance.audit.reports import AuditReadServices
from compliance.auth.interfaces import TokenVerifier
from compliance.config import Settings
from compliance.dicomweb.service import DicomwebService
from compliance.exports.workers import ExportComponents
from compliance.policy.interfaces import PolicyDecisionPoint


@dataclass
class Services:
    """What the API routes use, built once at start-up (:func:`compliance.app.create_app`)."""

    settings: Settings
    verifier: TokenVerifier
    auditor: AuditRecorder
    dicomweb: DicomwebService
    policy: PolicyDecisionPoint
    #: The privacy officer's audit search, reports and review queue (compliance/api/audit.py).
    audit_read: AuditReadServices | None = None
    #: Research exports and re-identification.
    exports: ExportComponents | None = None
    #: Archive key operations; None when the archive is not encrypted.
    archive_keys: KeyOperations | None = None
    #: Two-person crypto-shred requests; None when the archive is not encrypted.
    shred_requests: ShredRequests | None = None
