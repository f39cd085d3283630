"""The one error tree of the gateway.

Services raise these; :func:`status_of` below is the one table from error to HTTP/DICOMweb status,
used by the gateway's API (``compliance/api/errors.py``, which writes the JSON body) and by the key
custodian's routes inside Orthanc (``compliance/archive/control.py``). Lower-layer exceptions
(httpx, SQLAlchemy, PyJWT, pydicom) are translated at the boundary with ``raise ... from exc`` so
callers never see them.

    ComplianceError
    ├── AuthenticationError          the caller is not who they claim (no, bad, expired token)  -> 401
    ├── PermissionDenied             the caller is known but not allowed                         -> 403
    ├── InvalidRequest               bad input from the caller                                   -> 400
    │   ├── UnsupportedMediaType     a part or body of the wrong media type                      -> 415
    │   └── PayloadTooLarge          a body over the configured limit                            -> 413
    ├── NotFound                     no such resource                                            -> 404
    ├── Gone                         the resource existed and was permanently erased             -> 410
    ├── Conflict                     state does not allow the operation                          -> 409
    ├── UpstreamError                the archive, Keycloak or Elasticsearch failed               -> 502
    │   └── UpstreamUnavailable      it could not be reached                                     -> 503
    ├── AuditFailure                 the audit event could not be recorded (fail closed)         -> 503
    ├── IntegrityError               stored data failed an integrity check                       -> 500
    └── ConfigurationError           the deployment is misconfigured (refused at start-up)
"""

from __future__ import annotations

from typing import Any


class ComplianceError(Exception):
    """Base of every error the gateway raises on purpose."""

    #: A short machine-readable code that ends up in the JSON error body.
    code: str = "error"

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class AuthenticationError(ComplianceError):
    code = "unauthenticated"

    def __init__(self, message: str, *, reason: str = "invalid_token", detail: dict[str, Any] | None = None):
        super().__init__(message, detail=detail)
        #: The RFC 6750 error code for the WWW-Authenticate header.
        self.reason = reason


class PermissionDenied(ComplianceError):
    code = "forbidden"


class InvalidRequest(ComplianceError):
    code = "invalid_request"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class NotFound(ComplianceError):
    code = "not_found"


class Gone(ComplianceError):
    code = "gone"


class Conflict(ComplianceError):
    code = "conflict"


class UpstreamError(ComplianceError):
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class AuditFailure(ComplianceError):
    code = "audit_unavailable"


class IntegrityError(ComplianceError):
    code = "integrity_failure"


class ConfigurationError(ComplianceError):
    code = "configuration_error"


STATUS: list[tuple[type[ComplianceError], int]] = [
    # Most specific first.
    (UnsupportedMediaType, 415),
    (PayloadTooLarge, 413),
    (InvalidRequest, 400),
    (AuthenticationError, 401),
    (PermissionDenied, 403),
    (NotFound, 404),
    (Gone, 410),
    (Conflict, 409),
    (UpstreamUnavailable, 503),
    (UpstreamError, 502),
    (AuditFailure, 503),
    (IntegrityError, 500),
    (ConfigurationError, 500),
]


def status_of(exc: ComplianceError) -> int:
    """The HTTP status of an error of the tree (500 for anything unlisted)."""
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500
