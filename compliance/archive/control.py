"""The key operations the archive's custodian serves (under Orthanc's ``/compliance/`` REST routes).

The storage plugin registers these on Orthanc's REST API, so they are protected exactly like the
rest of the archive: Orthanc's HTTP authentication (only the gateway's generated credentials are
registered) and loopback-only access. They are not reachable through the gateway's DICOMweb proxy
(it forwards PS3.18 shapes only). Auditing is the caller's job (the gateway API or the CLI,
:mod:`compliance.archive.operations`), which knows the human behind the request.

Routes (all JSON; bodies carry ids so no patient id ever sits in a URL or an access log):

    GET  /compliance/keys/status                      KEKs, state, data keys each wraps, integrity counter
    POST /compliance/keys/rotate                      new active KEK                     -> {"active_kek_id"}
    POST /compliance/keys/rewrap                      all live data keys under the active KEK
    POST /compliance/keys/retire   {"kek_id"}         check a KEK is retired (rotation retires)
    POST /compliance/keys/destroy  {"kek_id"}         destroy a retired KEK that wraps nothing
    POST /compliance/keys/shred    {"patient_id", "study_uids"}
                                                      destroy the patient's data key(s); tombstone
                                                      the studies (they still answer 410 once the
                                                      gateway removed them from Orthanc's index)
    POST /compliance/keys/state    {"patient_id"}     live | shredded | none
                                   {"study_uid"}      shredded (a tombstone) | unknown_study
    POST /compliance/archive/verify {"attachments": [{"instance", "uuid", "content_type"}]}
                                                      decrypt each file, report failures
    POST /compliance/archive/failures {"within_seconds"}
                                                      files that failed to authenticate on a read
                                                      in that many seconds (the plugin's journal,
                                                      its own clock): {"failures": [{"uuid",
                                                      "content_type", "at"}], "count"}

The handlers never call back into Orthanc's REST API: a Python REST callback that calls
``orthanc.RestApiGet`` holds the GIL while Orthanc serves the inner request, and a storage callback
waiting for the GIL under Orthanc's locks then deadlocks the archive (seen with orthanc-python 4.0).
The caller (the gateway) looks study -> patient and study -> attachments up in Orthanc itself and
passes them in; uuids are validated by the storage before any path is built.

Errors come back as ``{"error": code, "message": ...}`` with the status of the error tree
(``compliance.errors.status_of``: 404 unknown KEK, 409 state conflict, 502 key provider failure).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from compliance.archive.interfaces import MAX_FAILURE_WINDOW
from compliance.archive.storage import EncryptedFilesystemStorage
from compliance.crypto.keys import KeyService
from compliance.crypto.models import CryptoDataKey
from compliance.errors import ComplianceError, InvalidRequest, status_of

__all__ = ["Attachment", "KeyControl", "Response"]


@dataclass(frozen=True)
class Attachment:
    instance_id: str
    uuid: str
    content_type: int


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), default=str).encode()


class KeyControl:
    """Route handlers, independent of Orthanc: the plugin injects how to look things up in its index."""

    def __init__(
        self,
        keys: KeyService,
        storage: EncryptedFilesystemStorage,
    ) -> None:
        self._keys = keys
        self._storage = storage

    def handle(self, method: str, path: str, body: bytes) -> Response:
        try:
            payload = json.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise InvalidRequest("the body must be a JSON object")
            return self._dispatch(method, path, payload)
        except ValueError as exc:
            return Response(400, {"error": "invalid_request", "message": f"bad JSON body: {exc}"})
        except ComplianceError as exc:
            return Response(status_of(exc), {"error": exc.code, "message": exc.message, "detail": exc.detail})

    def _dispatch(self, method: str, path: str, p: dict[str, Any]) -> Response:
        route = (method.upper(), path.rstrip("/"))
        if route == ("GET", "/compliance/keys/status"):
            return Response(200, self.status())
        if method.upper() != "POST":
            return Response(405, {"error": "method_not_allowed", "message": f"{method} {path}"})
        if route[1] == "/compliance/keys/rotate":
            return Response(200, {"active_kek_id": self._keys.rotate()})
        if route[1] == "/compliance/keys/rewrap":
            r = self._keys.rewrap()
            return Response(200, {"rewrapped": r.rewrapped, "already_current": r.already_current,
                                  "active_kek_id": r.active_kek_id})
        if route[1] == "/compliance/keys/retire":
            self._keys.confirm_kek_retired(_required(p, "kek_id"))
            return Response(200, {"kek_id": p["kek_id"], "state": "retired"})
        if route[1] == "/compliance/keys/destroy":
            self._keys.destroy_kek(_required(p, "kek_id"))
            return Response(200, {"kek_id": p["kek_id"], "state": "destroyed"})
        if route[1] == "/compliance/keys/shred":
            patient_id = _required(p, "patient_id", allow_empty=True)
            studies = p.get("study_uids", [])
            if not isinstance(studies, list) or not all(isinstance(u, str) and u for u in studies):
                raise InvalidRequest("'study_uids' must be a list of non-empty strings")
            destroyed = self._keys.shred_patient(patient_id, studies)
            return Response(200, {"destroyed": destroyed, "state": self.patient_state(patient_id)})
        if route[1] == "/compliance/keys/state":
            if "study_uid" in p:
                erased = self._keys.study_erased(_required(p, "study_uid"))
                return Response(200, {"state": "shredded" if erased else "unknown_study"})
            return Response(200, {"state": self.patient_state(_required(p, "patient_id", allow_empty=True))})
        if route[1] == "/compliance/archive/verify":
            items = p.get("attachments")
            if not isinstance(items, list):
                raise InvalidRequest("'attachments' (a list) is required")
            try:
                attachments = [Attachment(str(a["instance"]), str(a["uuid"]), int(a["content_type"])) for a in items]
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidRequest("each attachment needs instance, uuid and content_type") from exc
            return Response(200, self.verify(attachments))
        if route[1] == "/compliance/archive/failures":
            within = p.get("within_seconds")
            if isinstance(within, bool) or not isinstance(within, int | float) or not 0 < within <= MAX_FAILURE_WINDOW:
                raise InvalidRequest(f"'within_seconds' must be a number in (0, {MAX_FAILURE_WINDOW}]")
            return Response(200, self.failures(float(within)))
        return Response(404, {"error": "not_found", "message": f"no route {path}"})

    # --- the operations ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self._keys.status()
        return {
            "provider": dict(st.provider),
            "keks": [
                {"id": k.id, "provider": k.provider, "state": k.state, "created_at": k.created_at,
                 "retired_at": k.retired_at, "destroyed_at": k.destroyed_at, "data_keys": k.data_keys,
                 "in_provider": k.in_provider}
                for k in st.keks
            ],
            "live_data_keys": st.live_data_keys,
            "shredded_data_keys": st.shredded_data_keys,
            "integrity_failures": self._storage.integrity_failures,
        }

    def patient_state(self, patient_id: str) -> str:
        """``live`` (a live data key), ``shredded`` (only destroyed keys), ``none`` (no key ever)."""
        patient_key = self._keys.patient_key(patient_id)
        with self._keys._sessions() as session:  # noqa: SLF001 - same domain, read-only query
            rows = session.execute(
                select(CryptoDataKey.destroyed_at).where(CryptoDataKey.patient_key == patient_key)
            ).all()
        if any(r.destroyed_at is None for r in rows):
            return "live"
        return "shredded" if rows else "none"

    def failures(self, within_seconds: float) -> dict[str, Any]:
        """Reads that failed authentication in the last ``within_seconds``: what made a search fail
        when the gateway cannot tell which study it touched."""
        recent = self._storage.recent_failures(timedelta(seconds=within_seconds))
        return {"failures": [{"uuid": f.uuid, "content_type": f.content_type, "at": f.at.isoformat()}
                             for f in recent],
                "count": self._storage.integrity_failures}

    def verify(self, attachments: Sequence[Attachment]) -> dict[str, Any]:
        failures = []
        for a in attachments:
            try:
                result = self._storage.check(a.uuid, a.content_type)
            except ValueError:
                result = "invalid_uuid"
            if result != "ok":
                failures.append({"instance": a.instance_id, "uuid": a.uuid, "content_type": a.content_type,
                                 "result": result})
        return {"checked": len(attachments), "failures": failures}


def _required(p: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = p.get(name)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise InvalidRequest(f"'{name}' (a string) is required")
    return value
