"""A synchronous DICOMweb reader of the archive, for export jobs (workers have no event loop).

It reads with the gateway's own archive credentials (HTTP Basic), never a user's: QIDO-RS to find
the studies and instances of a cohort, WADO-RS to retrieve one instance at a time into memory. It
satisfies the export domain's ``ArchiveReader`` contract (:mod:`compliance.exports.interfaces`)
without importing it: ``dicomweb`` sits below ``exports``.

Its errors never name the path of a request: the UIDs in it are source identifiers, and the message
reaches the requester of an export.
"""

from __future__ import annotations

import httpx

from compliance import dicom_json
from compliance.dicomweb.stow import parse_content_type, split_parts
from compliance.errors import ComplianceError, UpstreamError, UpstreamUnavailable

DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"
SOP_INSTANCE_UID = "00080018"


def _kind_of(path: str) -> str:
    """``search`` or ``retrieve``: what an archive request was, without its UIDs."""
    return "retrieve" if "/instances/" in path else "search"


class DicomwebArchiveReader:
    """A synchronous DICOMweb client for jobs (workers have no event loop); Basic auth, the gateway's."""

    def __init__(self, base_url: str, dicomweb_path: str, *, username: str, password: str,
                 timeout: float = 60.0) -> None:
        self._root = dicomweb_path.rstrip("/")
        self._http = httpx.Client(base_url=base_url.rstrip("/"), auth=httpx.BasicAuth(username, password),
                                  timeout=httpx.Timeout(timeout, connect=5.0))

    def _get(self, path: str, *, params: list[tuple[str, str | int | float | bool | None]] | None = None,
             accept: str) -> httpx.Response:
        try:
            resp = self._http.get(self._root + path, params=params, headers={"Accept": accept})
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("the archive cannot be reached") from exc
        if resp.status_code in (401, 403):
            raise UpstreamError("the archive refused the gateway's credentials")
        if resp.status_code not in (200, 204):
            # never the path: its UIDs are source identifiers, and this message reaches the requester
            raise UpstreamError(f"the archive answered {resp.status_code} to a {_kind_of(path)} request")
        return resp

    def find_studies(self, filters: dict[str, str]) -> list[str]:
        resp = self._get("/studies", params=[*filters.items(), ("includefield", STUDY_INSTANCE_UID)],
                         accept="application/dicom+json")
        found = resp.json() if resp.content else []
        return [str(uid) for study in found if (uid := dicom_json.first_value(study, STUDY_INSTANCE_UID)) is not None]

    def find_instances(self, study_uid: str) -> list[tuple[str, str]]:
        resp = self._get(f"/studies/{study_uid}/instances", accept="application/dicom+json")
        found = resp.json() if resp.content else []
        return sorted((_required_uid(instance, SERIES_INSTANCE_UID), _required_uid(instance, SOP_INSTANCE_UID))
                      for instance in found)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        resp = self._get(f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", accept=DICOM_ACCEPT)
        parts = multipart_parts(resp.headers.get("content-type", ""), resp.content)
        if len(parts) != 1:
            raise UpstreamError(f"the archive returned {len(parts)} parts for one instance")
        return parts[0]

    def close(self) -> None:
        self._http.close()


def _required_uid(instance: dict[str, object], tag: str) -> str:
    """The UID ``tag`` of an instance of a QIDO-RS answer; a KeyError (as the job has always reported
    it) when the archive left it out."""
    uid = dicom_json.first_value(instance, tag)
    if uid is None:
        raise KeyError(tag)
    return str(uid)


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related response of the archive (the STOW-RS parser's own splitting)."""
    try:
        return [bytes(payload) for _, payload in split_parts(body, parse_content_type(content_type))]
    except ComplianceError as exc:
        raise UpstreamError(f"the archive's multipart response is malformed: {exc.message}") from exc
