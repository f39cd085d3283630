"""Where an approved export may go: the downloadable bundle, or a named DICOMweb research archive.

The allow-list is server-side: ``policies/export-destinations.yaml`` (``COMPLIANCE_EXPORTS_DESTINATIONS_FILE``)
names each research archive, its STOW-RS base URL and how the gateway authenticates to it. A request
names a destination (``{"kind": "dicomweb", "name": "research-pacs"}``), never a URL: the URL is
resolved from the list when the job runs, so a request can neither send data anywhere else nor keep
using a destination that was removed from the list. Secrets never live in the file: a destination
names the environment variable that holds its password or token.

Pushing (``DicomwebStowClient``) is STOW-RS (PS3.18 10.5): ``POST {url}/studies`` with a
``multipart/related; type="application/dicom"`` body of several instances; the answer (a
dicom+json dataset with Referenced SOP Sequence and Failed SOP Sequence) is read per instance, so
a partial failure is reported per file. Redirects are never followed (a redirect could send the data
somewhere the list does not name); transport errors and 502/503/504 are retried twice.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Collection, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from compliance.dicomweb.stow import multipart_related, parse_stow_answer
from compliance.errors import ConfigurationError
from compliance.exports.interfaces import DestinationNotAllowed, InvalidExportRequest, PublicDestination
from compliance.exports.projects import ProjectRegistry

log = logging.getLogger(__name__)

BUNDLE = "bundle"
DICOMWEB = "dicomweb"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_AUTH = ("none", "basic", "bearer")
_RETRY_STATUS = (502, 503, 504)


@dataclass(frozen=True)
class DicomwebDestination:
    """A research archive reached with STOW-RS (one entry of the allow-list)."""

    name: str
    url: str
    description: str = ""
    auth: str = "none"
    username: str = ""
    password_env: str = ""
    token_env: str = ""
    projects: frozenset[str] | None = None
    timeout_seconds: float = 60.0
    ca_file: str = ""

    kind = DICOMWEB

    @property
    def stow_url(self) -> str:
        return self.url.rstrip("/") + "/studies"

    def allows(self, project: str) -> bool:
        return self.projects is None or project in self.projects

    def public(self) -> PublicDestination:
        """What researchers and stewards see: never a credential, nor the name of its variable."""
        return PublicDestination(name=self.name, kind=self.kind, description=self.description, url=self.url,
                                 projects=sorted(self.projects) if self.projects is not None else None)

    def credentials(self) -> httpx.Auth | None:
        if self.auth == "none":
            return None
        secret_env = self.password_env if self.auth == "basic" else self.token_env
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise ConfigurationError(f"export destination {self.name!r}: the environment variable {secret_env} "
                                     "holding its credential is not set")
        if self.auth == "basic":
            return httpx.BasicAuth(self.username, secret)
        return _Bearer(secret)


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class DestinationRegistry:
    """The allow-list, loaded once; ``resolve`` turns what a request names into a stored destination."""

    def __init__(self, destinations: Sequence[DicomwebDestination] = ()) -> None:
        self._by_name = {d.name: d for d in destinations}

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def public(self, projects: Collection[str] | None = None) -> list[PublicDestination]:
        """The allow-list as shown; with ``projects`` (a researcher's), only the destinations those projects
        may use, naming no other project (a restriction would otherwise tell which projects exist)."""
        out = []
        for name in self.names():
            dest = self._by_name[name].public()
            if projects is not None and dest["projects"] is not None:
                dest["projects"] = sorted(set(dest["projects"]) & set(projects))
                if not dest["projects"]:
                    continue
            out.append(dest)
        return out

    def get(self, name: str) -> DicomwebDestination:
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidExportRequest(f"no export destination named {name!r}; configured: {self.names()}") from None

    def resolve(self, destination: str | Mapping[str, object], project: str) -> dict[str, str]:
        """The destination JSON stored on the request: ``{"kind": "bundle"}`` or ``{"kind": "dicomweb", "name": N}``."""
        if destination == BUNDLE or destination == {"kind": BUNDLE}:
            return {"kind": BUNDLE}
        name = destination.get("name") if isinstance(destination, dict) else None
        if not isinstance(destination, dict) or set(destination) != {"kind", "name"} \
                or destination.get("kind") != DICOMWEB or not isinstance(name, str):
            raise InvalidExportRequest('the destination is "bundle" or {"kind": "dicomweb", "name": <a configured '
                                       'research archive>} (a URL is never accepted)')
        dest = self.get(name)
        if not dest.allows(project):
            raise DestinationNotAllowed(f"project {project!r} may not export to {dest.name!r}")
        return {"kind": DICOMWEB, "name": dest.name}


def load_destinations(path: Path | None, *, environment: str = "development",
                      projects: ProjectRegistry | None = None) -> DestinationRegistry:
    """Read and validate the allow-list; a missing file is an empty list (bundles only).

    With ``projects`` (the registry, as the gateway and workers load it), a destination restricted to a
    project that is not registered is refused: a misspelt name there would otherwise wait for whoever
    registers that name later."""
    if path is None or not path.is_file():
        return DestinationRegistry()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML ({exc})") from exc
    entries = data.get("destinations") or {}
    if not isinstance(entries, dict):
        raise ConfigurationError(f"{path}: 'destinations' must be a mapping of name -> destination")
    out = []
    for name, spec in entries.items():
        dest = _destination(str(name), spec or {}, path, environment)
        unknown = sorted(p for p in dest.projects or () if projects is not None and not projects.is_registered(p))
        if unknown:
            raise ConfigurationError(f"{path}: destination {dest.name!r} names projects that are not "
                                     f"registered (policies/projects.yaml): {unknown}")
        out.append(dest)
    return DestinationRegistry(out)


def _destination(name: str, spec: dict[str, Any], path: Path, environment: str) -> DicomwebDestination:
    where = f"{path}: destination {name!r}"
    if not _NAME.match(name) or name == BUNDLE:
        raise ConfigurationError(f"{where}: names are lower-case letters, digits, '.', '_', '-' (and not 'bundle')")
    known = {"kind", "description", "url", "auth", "username", "password_env", "token_env", "projects",
             "timeout_seconds", "ca_file"}
    if unknown := set(spec) - known:
        raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
    if spec.get("kind") != DICOMWEB:
        raise ConfigurationError(f"{where}: kind must be {DICOMWEB!r}")
    url = str(spec.get("url") or "")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.query or parts.fragment:
        raise ConfigurationError(f"{where}: url must be an http(s) DICOMweb base URL without credentials or query")
    if environment != "development" and parts.scheme != "https":
        raise ConfigurationError(f"{where}: outside development a research archive is reached over HTTPS only")
    auth = str(spec.get("auth", "none"))
    if auth not in _AUTH:
        raise ConfigurationError(f"{where}: auth must be one of {list(_AUTH)}")
    if auth == "basic" and not (spec.get("username") and spec.get("password_env")):
        raise ConfigurationError(f"{where}: auth basic needs username and password_env")
    if auth == "bearer" and not spec.get("token_env"):
        raise ConfigurationError(f"{where}: auth bearer needs token_env")
    projects = spec.get("projects")
    if projects is not None and (not isinstance(projects, list) or not all(isinstance(p, str) for p in projects)):
        raise ConfigurationError(f"{where}: projects must be a list of project names")
    ca_file = str(spec.get("ca_file") or "")
    if ca_file and not Path(ca_file).is_file():
        raise ConfigurationError(f"{where}: ca_file {ca_file} does not exist")
    dest = DicomwebDestination(
        name=name, url=url.rstrip("/"), description=str(spec.get("description") or ""), auth=auth,
        username=str(spec.get("username") or ""), password_env=str(spec.get("password_env") or ""),
        token_env=str(spec.get("token_env") or ""),
        projects=frozenset(projects) if projects is not None else None,
        timeout_seconds=float(spec.get("timeout_seconds", 60.0)), ca_file=ca_file)
    secret_env = dest.password_env or dest.token_env
    if secret_env and not os.environ.get(secret_env):
        log.warning("export destination %r: %s is not set; pushes to it will fail", name, secret_env)
    return dest


#: Per-instance outcomes of a push. "unconfirmed": the data may have reached the destination (a
#: timeout after sending, an instance the answer does not mention): reported as not stored, and
#: counted as disclosed in the audit, which must never under-report a disclosure.
STORED, FAILED, UNCONFIRMED = "stored", "failed", "unconfirmed"
Outcome = tuple[str, str | None]


class DicomwebStowClient:
    """STOW-RS to one destination. ``store`` answers, per SOP Instance UID, (outcome, reason)."""

    def __init__(self, destination: DicomwebDestination, *, retries: int = 2, backoff_seconds: float = 1.0) -> None:
        self.destination = destination
        self._retries = retries
        self._backoff = backoff_seconds
        self._client = httpx.Client(auth=destination.credentials(), follow_redirects=False,
                                    timeout=httpx.Timeout(destination.timeout_seconds, connect=10.0),
                                    verify=destination.ca_file or True)

    def close(self) -> None:
        self._client.close()

    def store(self, instances: Sequence[tuple[str, bytes]]) -> dict[str, Outcome]:
        """STOW ``(SOP Instance UID, PS3.10 bytes)`` in one request."""
        uids = [uid for uid, _ in instances]
        body, content_type = multipart_related([data for _, data in instances])
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        outcome: Outcome = (FAILED, "not sent")
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff * attempt)
            try:
                resp = self._client.post(self.destination.stow_url, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                outcome = (FAILED, f"destination unreachable ({type(exc).__name__})")
                continue
            except httpx.TransportError as exc:  # sent (perhaps in part): it may have been stored
                outcome = (UNCONFIRMED, f"no answer from the destination ({type(exc).__name__})")
                continue
            if resp.status_code in _RETRY_STATUS:
                outcome = (UNCONFIRMED if resp.status_code == 504 else FAILED,
                           f"destination answered HTTP {resp.status_code}")
                continue
            return _per_instance(resp, uids)
        return dict.fromkeys(uids, outcome)


def _per_instance(resp: httpx.Response, uids: list[str]) -> dict[str, Outcome]:
    status = resp.status_code
    if status in (401, 403):
        return dict.fromkeys(uids, (FAILED, f"destination refused the gateway's credentials (HTTP {status})"))
    if 300 <= status < 400:
        return dict.fromkeys(uids, (FAILED, f"destination answered HTTP {status} (redirects are not followed)"))
    if status not in (200, 202, 409):
        return dict.fromkeys(uids, (FAILED, f"destination answered HTTP {status}"))
    try:
        answer = parse_stow_answer(resp.content)
    except ValueError:
        if status == 200:  # an unreadable body after 200 OK: the request as a whole succeeded
            return dict.fromkeys(uids, (STORED, None))
        return dict.fromkeys(uids, (UNCONFIRMED, f"destination answered HTTP {status} with an unreadable body"))
    stored = answer.stored
    failed = {uid: f"destination refused the instance: {text}" for uid, text in answer.failed.items()}
    out: dict[str, Outcome] = {}
    for uid in uids:
        if uid in failed:
            out[uid] = (FAILED, failed[uid])
        elif uid in stored or status == 200:
            out[uid] = (STORED, None)
        else:
            out[uid] = (UNCONFIRMED, f"not acknowledged by the destination (HTTP {status})")
    return out
