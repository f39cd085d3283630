"""Contracts and errors of the de-identification domain.

``PseudonymSecretSource`` is what the engine needs from the key provider: one secret per project,
used as the HMAC-SHA256 key of every pseudonym (patient ID and name, accession number, UIDs, the
per-patient date offset). The key provider (``compliance/crypto``) will implement it;
``StaticPseudonymSecretSource`` is the in-memory implementation for tests and development, and
``EnvPseudonymSecretSource`` reads ``COMPLIANCE_DEID_PROJECT_SECRET_<PROJECT>``.

Errors (subclasses of ``compliance.errors``)::

    ConfigurationError
    └── DeidConfigurationError   a profile, option or policy file is missing or inconsistent
    InvalidRequest
    └── DeidInputError           an input is not DICOM, truncated, or cannot be processed
    NotFound
    └── UnknownProjectSecret     no pseudonym secret is configured for the project
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Protocol, runtime_checkable

from compliance.errors import ConfigurationError, InvalidRequest, NotFound

log = logging.getLogger(__name__)

#: Secrets shorter than this are refused: they would make pseudonyms guessable.
MIN_SECRET_BYTES = 16


class DeidConfigurationError(ConfigurationError):
    code = "deid_configuration_error"


class DeidInputError(InvalidRequest):
    code = "deid_invalid_input"


class UnknownProjectSecret(NotFound):
    code = "deid_unknown_project_secret"


@runtime_checkable
class PseudonymSecretSource(Protocol):
    """Gives the per-project pseudonym secret (the HMAC key). Never logged, never returned."""

    def secret_for_project(self, project: str) -> bytes: ...


def _check(secret: bytes, project: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise DeidConfigurationError(
            f"pseudonym secret for project {project!r} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


class StaticPseudonymSecretSource:
    """In-memory secrets (tests, development). Not a key store: secrets live in process memory."""

    def __init__(self, secrets: dict[str, bytes]) -> None:
        self._secrets = dict(secrets)

    def secret_for_project(self, project: str) -> bytes:
        try:
            return _check(self._secrets[project], project)
        except KeyError as exc:
            raise UnknownProjectSecret(f"no pseudonym secret for project {project!r}") from exc


def env_variable_for(project: str) -> str:
    return "COMPLIANCE_DEID_PROJECT_SECRET_" + re.sub(r"[^A-Z0-9]", "_", project.upper())


class EnvPseudonymSecretSource:
    """Secrets from ``COMPLIANCE_DEID_PROJECT_SECRET_<PROJECT>`` (UTF-8 text, >= 16 bytes).

    With ``allow_dev_default`` (development only) a missing secret falls back to a fixed, public
    value derived from the project name, with a loud warning: pseudonyms made that way are NOT
    protected and must never leave a developer's machine.
    """

    def __init__(self, *, allow_dev_default: bool = False) -> None:
        self._allow_dev_default = allow_dev_default

    def secret_for_project(self, project: str) -> bytes:
        value = os.environ.get(env_variable_for(project))
        if value:
            return _check(value.encode("utf-8"), project)
        if self._allow_dev_default:
            msg = (f"INSECURE: no {env_variable_for(project)} set; using the public development "
                   f"pseudonym secret for project {project!r}. Never export such data.")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            return ("compliance-dev-insecure-pseudonym-secret:" + project).encode("utf-8")
        raise UnknownProjectSecret(f"{env_variable_for(project)} is not set")
