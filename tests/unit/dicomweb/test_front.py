"""The nginx front (compliance/dicomweb/front.py): its configuration and the gateway's release of a retrieve.

Pure logic: the rendered configuration is checked by nginx itself (``nginx -t``) when nginx is
installed; the release runs against a fake archive and a real SQLite outbox. The front on the real
stack is tested in tests/integration/test_front.py.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import stat
import subprocess

import pytest

from compliance.audit.atna import AuditSource
from compliance.audit.outbox import SqlAuditOutbox
from compliance.audit.recorder import AuditRecorder
from compliance.auth.interfaces import Principal
from compliance.db.session import make_engine
from compliance.dicomweb.audit_mapping import DicomwebEvents
from compliance.dicomweb.front import (
    INTERNAL_PREFIX,
    accel_redirect,
    is_front,
    nginx_command,
    released_event,
    render_nginx_config,
    write_config,
)
from compliance.dicomweb.interfaces import RequestContext, StudySummary
from compliance.dicomweb.routing import classify
from compliance.dicomweb.service import DicomwebService
from compliance.errors import AuditFailure, PermissionDenied
from compliance.policy.rbac import RbacPolicy

STUDY = "1.2.3.4"
SUMMARY = StudySummary(STUDY, "PID-1", "Doe^Jane")
PATH = f"/studies/{STUDY}/series/1.2.3.4.5/instances/1.2.3.4.5.6"


def render(tmp_path, **overrides):
    kwargs = dict(listen="127.0.0.1:18080", backend="127.0.0.1:18081", archive_url="http://127.0.0.1:8042",
                  archive_username="gateway", archive_password="s3cret", front_secret="f00dcafe",
                  state_dir=tmp_path / "front")
    return render_nginx_config(**(kwargs | overrides))


def test_config_hands_the_archive_only_the_gateways_credentials_and_the_accept_header(tmp_path):
    text = render(tmp_path)
    internal = text[text.index(f'location ~ "^{INTERNAL_PREFIX}'):text.index("location @archive_refused")]
    assert "internal;" in internal
    assert "proxy_pass_request_headers off;" in internal
    assert 'proxy_set_header Authorization "Basic ' + base64.b64encode(b"gateway:s3cret").decode() + '";' in internal
    assert "proxy_set_header Accept $http_accept;" in internal
    # nothing decrypted is spooled to disk, nothing PHI-bearing is logged
    assert "proxy_max_temp_file_size 0;" in text and "proxy_request_buffering off;" in text
    assert "access_log off;" in text
    gateway = text[text.index("location / {"):text.index("location ~")]
    assert 'proxy_set_header x-compliance-front "f00dcafe";' in gateway


@pytest.mark.parametrize("field,value", [("listen", "nonsense"), ("backend", ":8081"), ("front_secret", ""),
                                         ("front_secret", 'x"; proxy_pass http://evil'),
                                         ("archive_url", "https://127.0.0.1:8042"), ("archive_url", "http://x")])
def test_bad_addresses_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError):
        render(tmp_path, **{field: value})


def test_config_file_is_private(tmp_path):
    path = write_config(render(tmp_path), tmp_path / "front")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                    reason="nginx is not installed (deploy/local/up installs nginx-light)")
def test_nginx_accepts_the_rendered_configuration(tmp_path):
    state = tmp_path / "front"
    path = write_config(render(tmp_path), state)
    done = subprocess.run([*nginx_command(path, state), "-t"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_only_the_shared_secret_marks_a_request_as_the_fronts():
    assert is_front("f00dcafe", "f00dcafe")
    assert not is_front("nginx", "f00dcafe")
    assert not is_front(None, "f00dcafe")
    assert not is_front("", "")  # no secret configured: nothing is the front


def test_accel_redirect_names_the_event_and_keeps_the_query():
    target = accel_redirect("0f8fad5b-d9cb-469f-a165-70867728950e", "/dicom-web" + PATH, "a=1&b=2")
    assert target == f"{INTERNAL_PREFIX}0f8fad5b-d9cb-469f-a165-70867728950e/dicom-web{PATH}?a=1&b=2"


class FakeArchive:
    def __init__(self, summary: StudySummary | None = SUMMARY) -> None:
        self.summary = summary
        self.sent: list[str] = []

    async def send(self, method, path, *, query=None, headers=None, content=None):  # pragma: no cover
        self.sent.append(path)
        raise AssertionError("a released retrieve is fetched by nginx, not by the gateway")

    async def study_summary(self, study_uid):
        return self.summary


def ctx(*roles: str, headers: dict | None = None) -> RequestContext:
    return RequestContext(Principal("sub", "alice", frozenset(roles), client_id="viewer"), "10.1.2.3", "GET",
                          PATH, [], "", {"accept": "application/dicom"} | (headers or {}))


def service(outbox: SqlAuditOutbox, archive: FakeArchive) -> DicomwebService:
    policy = RbacPolicy.from_mapping({"version": 1, "roles": {"clinician": ["dicomweb:study:read"]}})
    auditor = AuditRecorder(outbox, AuditSource(source_id="gw", enterprise_site_id="site"), fail_closed=True)
    return DicomwebService(archive, policy, auditor, gateway_id="gw")



async def test_release_commits_the_event_before_naming_it(outbox):
    archive = FakeArchive()
    target = await service(outbox, archive).release(ctx("clinician"), classify("GET", PATH))
    assert outbox.total() == 1
    doc = outbox.pending(10)[0][2]
    assert doc["event.id"] == "110104" and doc["event.outcome"] == 0
    assert doc["patient.ids"] == ["PID-1"] and doc["study.uids"] == [STUDY]
    assert doc["source.address"] == "10.1.2.3"
    assert target == f"{INTERNAL_PREFIX}{doc['event.uuid']}/dicom-web{PATH}"
    assert archive.sent == []


async def test_release_is_refused_and_names_nothing_when_the_event_cannot_be_recorded(tmp_path):
    outbox = SqlAuditOutbox(make_engine(f"sqlite:///{tmp_path / 'no-table.db'}"))
    with pytest.raises(AuditFailure):
        await service(outbox, FakeArchive()).release(ctx("clinician"), classify("GET", PATH))
    outbox.close()


async def test_release_denied_without_permission(outbox):
    with pytest.raises(PermissionDenied):
        await service(outbox, FakeArchive()).release(ctx("researcher"), classify("GET", PATH))
    assert [d["event.id"] for _, _, d in outbox.pending(10)] == ["110113"]


async def test_unknown_study_is_not_released(outbox):
    target = await service(outbox, FakeArchive(summary=None)).release(ctx("clinician"), classify("GET", PATH))
    assert target is None
    assert outbox.total() == 0  # the gateway relays it itself and audits what the archive answers


async def test_refused_release_is_audited_with_the_released_event(outbox):
    released = "0f8fad5b-d9cb-469f-a165-70867728950e"
    events = DicomwebEvents(gateway_id="gw", archive_id="archive")
    handed_back = dataclasses.replace(ctx("clinician"), released_event=released)
    event = events.retrieve(handed_back, classify("GET", PATH), 404, SUMMARY)
    assert event.outcome_description == (f"archive status 404; the transfer released by event {released} "
                                         "was not delivered")
    assert events.retrieve(ctx("clinician"), classify("GET", PATH), 404, None).outcome_description == (
        "archive status 404")


@pytest.mark.parametrize("value", [None, "", "<script>", "0f8fad5b"])
def test_a_malformed_released_event_is_not_believed(value):
    assert released_event(value) is None
