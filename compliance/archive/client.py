"""The gateway's side of the archive's key custody: Orthanc's ``/compliance/`` routes over HTTP.

Requests carry the gateway's archive credentials (the same as its DICOMweb proxying); the routes
are served by the storage plugin (:mod:`compliance.archive.control`). Errors are translated into
the gateway's error tree here, at the boundary.
"""

from __future__ import annotations

from typing import Any

import httpx

from compliance import dicom_json
from compliance.crypto.interfaces import DataKeyNotFound, KeyProviderError, KeyStateConflict
from compliance.errors import ComplianceError, InvalidRequest, UpstreamError, UpstreamUnavailable

__all__ = ["ArchiveKeyClient"]


class ArchiveKeyClient:
    def __init__(self, base_url: str, *, username: str, password: str, dicomweb_path: str = "/dicom-web",
                 timeout: float = 120.0, client: httpx.AsyncClient | None = None) -> None:
        """``client``: the gateway passes its archive client (``OrthancArchive.http_client``, same
        URL and credentials) so both share one connection pool; the CLI lets this make its own."""
        self._dicomweb = dicomweb_path.rstrip("/")
        self._timeout = httpx.Timeout(timeout, connect=5.0)
        self._owned = client is None
        self._client = client or httpx.AsyncClient(base_url=base_url.rstrip("/"),
                                                   auth=httpx.BasicAuth(username, password), timeout=self._timeout)

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = await self._client.request(method, path, json=body, timeout=self._timeout)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("the archive's key service cannot be reached") from exc
        if resp.status_code == 200:
            return dict(resp.json())
        try:
            err = resp.json()
            message = str(err.get("message") or err.get("Message") or resp.status_code)
        except ValueError:
            message = f"status {resp.status_code}"
        error: type[ComplianceError] = {400: InvalidRequest, 404: DataKeyNotFound, 409: KeyStateConflict,
                                        502: KeyProviderError}.get(resp.status_code, UpstreamError)
        if resp.status_code in (401, 403):
            message = "the archive refused the gateway's credentials"
        if error is UpstreamError and resp.status_code == 404:
            message = "the archive does not serve key operations (is the storage plugin loaded?)"
        raise error(message)

    # --- operator operations -------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        return await self._call("GET", "/compliance/keys/status")

    async def rotate(self) -> dict[str, Any]:
        return await self._call("POST", "/compliance/keys/rotate", {})

    async def rewrap(self) -> dict[str, Any]:
        return await self._call("POST", "/compliance/keys/rewrap", {})

    async def confirm_kek_retired(self, kek_id: str) -> dict[str, Any]:
        return await self._call("POST", "/compliance/keys/retire", {"kek_id": kek_id})

    async def destroy(self, kek_id: str) -> dict[str, Any]:
        return await self._call("POST", "/compliance/keys/destroy", {"kek_id": kek_id})

    async def shred(self, patient_id: str, study_uids: list[str]) -> dict[str, Any]:
        return await self._call("POST", "/compliance/keys/shred",
                                {"patient_id": patient_id, "study_uids": study_uids})

    async def remove_patient_from_index(self, patient_id: str) -> int:
        """Delete a (shredded) patient from Orthanc: its index rows (names, ids, dates in plaintext)
        and its files (undecryptable by now). Returns how many patient resources were deleted."""
        removed = 0
        for item in await self._lookup(patient_id):
            if item.get("Type") != "Patient":
                continue
            patient = await self._get(f"/patients/{item['ID']}")
            # /tools/lookup matches any identifier: delete only the patient whose PatientID this is.
            if str((patient.get("MainDicomTags") or {}).get("PatientID", "")) != patient_id:
                continue
            try:
                resp = await self._client.delete(f"/patients/{item['ID']}", timeout=self._timeout)
            except httpx.TransportError as exc:
                raise UpstreamUnavailable("the archive cannot be reached") from exc
            if resp.status_code not in (200, 404):
                raise UpstreamError(f"the archive answered {resp.status_code} to the deletion of a patient")
            removed += resp.status_code == 200
        return removed

    # --- the request path ----------------------------------------------------------------------
    async def _lookup(self, identifier: str) -> list[dict[str, Any]]:
        """Orthanc's resources with this DICOM identifier (PatientID or a UID), any level."""
        try:
            found = await self._client.post("/tools/lookup", content=identifier, timeout=self._timeout)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("the archive cannot be reached") from exc
        if found.status_code != 200:
            raise UpstreamError(f"the archive answered {found.status_code} to a lookup")
        return list(found.json())

    async def _study(self, study_uid: str) -> str | None:
        return next((str(i["ID"]) for i in await self._lookup(study_uid) if i.get("Type") == "Study"), None)

    async def _get(self, path: str) -> Any:
        try:
            resp = await self._client.get(path, timeout=self._timeout)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("the archive cannot be reached") from exc
        if resp.status_code != 200:
            raise UpstreamError(f"the archive answered {resp.status_code} to {path.split('/')[1]}")
        return resp.json()

    async def study_state(self, study_uid: str) -> str:
        """``live``, ``shredded`` (also: erased and gone from the index), ``none`` (no key: nothing
        stored) or ``unknown_study``.

        The study's patient is looked up in Orthanc's index here (REST), never by the plugin.
        """
        orthanc_id = await self._study(study_uid)
        if orthanc_id is None:
            # A shredded study has left the index; its tombstone still says it was erased.
            return str((await self._call("POST", "/compliance/keys/state", {"study_uid": study_uid}))["state"])
        study = await self._get(f"/studies/{orthanc_id}")
        return await self.patient_state(str((study.get("PatientMainDicomTags") or {}).get("PatientID", "")))

    async def patient_state(self, patient_id: str) -> str:
        return str((await self._call("POST", "/compliance/keys/state", {"patient_id": patient_id}))["state"])

    async def verify_study(self, study_uid: str) -> dict[str, Any]:
        """Ask the custodian to decrypt every DICOM file of the study; report the failures."""
        orthanc_id = await self._study(study_uid)
        attachments = []
        if orthanc_id is not None:
            for inst in await self._get(f"/studies/{orthanc_id}/instances"):
                info = await self._get(f"/instances/{inst['ID']}/attachments/dicom/info")
                attachments.append({"instance": inst["ID"], "uuid": info["Uuid"], "content_type": info["ContentType"]})
        report = await self._call("POST", "/compliance/archive/verify", {"attachments": attachments})
        return {"study_uid": study_uid, **report}

    async def recent_failures(self, within_seconds: float) -> list[dict[str, Any]]:
        """Files the custodian failed to authenticate on a read in the last ``within_seconds`` (its clock)."""
        report = await self._call("POST", "/compliance/archive/failures", {"within_seconds": within_seconds})
        return list(report.get("failures") or [])

    async def patient_studies(self, patient_id: str) -> list[tuple[str, str | None, str | None]]:
        """(study uid, patient name, accession) of the patient's studies in the archive's index."""
        try:
            resp = await self._client.get(f"{self._dicomweb}/studies", params=[
                ("PatientID", patient_id), ("includefield", "00100010"), ("includefield", "00080050")],
                headers={"Accept": "application/dicom+json"}, timeout=self._timeout)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("the archive cannot be reached") from exc
        if resp.status_code == 204 or not resp.content:
            return []
        if resp.status_code != 200:
            raise UpstreamError(f"the archive answered {resp.status_code} to a study search")
        out = []
        for item in resp.json():
            uid = dicom_json.first_value(item, "0020000D")
            # QIDO matching may be fuzzy for some archives: keep exact patient id matches only.
            if uid and (dicom_json.first_value(item, "00100020") in (None, patient_id)):
                accession = dicom_json.first_value(item, "00080050")
                out.append((str(uid), dicom_json.person_name(dicom_json.first_value(item, "00100010")),
                            str(accession) if accession else None))
        return out
