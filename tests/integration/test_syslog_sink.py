"""The syslog TLS sink against a real rsyslog (Debian's rsyslog + rsyslog-gnutls) on loopback.

The test makes its own CA, a server certificate for rsyslog and a client certificate for the gateway
(mutual TLS, as IHE ATNA asks of secure nodes), starts ``rsyslogd`` on a free port with an ``imtcp``
TLS listener that writes every message as one JSON line, and runs a gateway whose sinks are
Elasticsearch and syslog.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from compliance.audit.interfaces import AuditSinkUnavailable
from compliance.audit.syslog import MSGID, SyslogTlsAuditSink

from .conftest import AuditIndex, Stack, _free_port, _reset_database, drop_prefix, start_gateway, stop_gateway

pytestmark = pytest.mark.integration



RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, issuer_key, issuer_name, public_key, *, ca: bool, sans=(), usage=None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(d: Path, name: str = "test-audit-ca") -> Pki:
    import ipaddress

    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = _cert(name, ca_key, ca_name, ca_key.public_key(), ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out = {}
    for who, sans, usage in [
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
         ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", [x509.DNSName("compliance-gateway")], ExtendedKeyUsageOID.CLIENT_AUTH),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"{who}.test", ca_key, ca_name, key.public_key(), ca=False, sans=sans, usage=usage)
        (d / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{who}.key", key)
        out[who] = (d / f"{who}.pem", d / f"{who}.key")
    return Pki(d / "ca.pem", *out["server"], *out["client"])


class Rsyslog:
    """rsyslogd in the foreground with a TLS (gtls) imtcp listener; every message is one JSON line."""

    def __init__(self, workdir: Path, pki: Pki, port: int) -> None:
        self.dir, self.pki, self.port = workdir, pki, port
        self.output = workdir / "received.jsonl"
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        d = self.dir
        return f"""
global(workDirectory="{d}" maxMessageSize="1m" parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{self.pki.ca}"
       defaultNetstreamDriverCertFile="{self.pki.server_cert}" defaultNetstreamDriverKeyFile="{self.pki.server_key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid"
       maxSessions="50")
template(name="jsonl" type="list") {{
  constant(value="{{\\"pri\\":\\"") property(name="pri")
  constant(value="\\",\\"version\\":\\"") property(name="protocol-version")
  constant(value="\\",\\"timestamp\\":\\"") property(name="timestamp" dateFormat="rfc3339")
  constant(value="\\",\\"app\\":\\"") property(name="app-name" format="json")
  constant(value="\\",\\"msgid\\":\\"") property(name="msgid" format="json")
  constant(value="\\",\\"sd\\":\\"") property(name="structured-data" format="json")
  constant(value="\\",\\"msg\\":\\"") property(name="msg" format="json")
  constant(value="\\"}}\\n")
}}
input(type="imtcp" port="{self.port}" address="127.0.0.1" ruleset="audit")
ruleset(name="audit") {{ action(type="omfile" file="{self.output}" template="jsonl") }}
"""

    def start(self) -> None:
        conf = self.dir / "rsyslog.conf"
        conf.write_text(self.config())
        log = open(self.dir / "rsyslogd.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"rsyslogd exited: {(self.dir / 'rsyslogd.log').read_text()[-3000:]}", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail("rsyslogd did not listen", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def messages(self) -> list[dict]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text(encoding="utf-8").splitlines() if line.strip()]

    def wait_for(self, predicate, within: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + within
        msgs = self.messages()
        while time.monotonic() < deadline and not predicate(msgs):
            time.sleep(0.2)
            msgs = self.messages()
        return msgs


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def rsyslog(tmp_path, pki):
    if not os.path.exists(RSYSLOGD):
        pytest.fail("rsyslogd is missing: deploy/local/up installs rsyslog and rsyslog-gnutls", pytrace=False)
    r = Rsyslog(tmp_path, pki, _free_port())
    yield r
    r.stop()


def uuid_of(message: dict) -> str:
    """The event UUID from the message's structured data, after checking its MSG is ATNA XML."""
    root = ElementTree.fromstring(message["msg"].lstrip("\ufeff").encode("utf-8"))  # noqa: S314 - our own XML
    assert root.tag == "AuditMessage", root.tag
    m = re.search(r'\[compliance@32473 uuid="([^"]+)"', message["sd"])
    assert m, message["sd"]
    return m.group(1)


def test_sink_refuses_a_receiver_its_ca_does_not_vouch_for(rsyslog, tmp_path):
    rsyslog.start()
    stranger = make_pki(tmp_path / "other", name="someone-else")
    sink = SyslogTlsAuditSink("127.0.0.1", rsyslog.port, ca_file=stranger.ca, cert_file=stranger.client_cert,
                              key_file=stranger.client_key)
    with pytest.raises(AuditSinkUnavailable, match="TLS"):
        sink.ensure_ready()


def test_gateway_ships_every_event_to_syslog_and_elasticsearch_once_syslog_is_up(stack: Stack, rsyslog,
                                                                                 pki, tmp_path):
    prefix = f"test-syslog-{uuid.uuid4().hex[:10]}"
    db = f"sqlite:///{tmp_path / 'syslog.db'}"
    _reset_database(db)
    env = {
        "COMPLIANCE_AUDIT_SINKS": "elasticsearch,syslog",
        "COMPLIANCE_AUDIT_SYSLOG_HOST": "127.0.0.1",
        "COMPLIANCE_AUDIT_SYSLOG_PORT": str(rsyslog.port),
        "COMPLIANCE_AUDIT_SYSLOG_CA_FILE": str(pki.ca),
        "COMPLIANCE_AUDIT_SYSLOG_CERT_FILE": str(pki.client_cert),
        "COMPLIANCE_AUDIT_SYSLOG_KEY_FILE": str(pki.client_key),
        "COMPLIANCE_AUDIT_SYSLOG_SERVER_NAME": "localhost",
    }
    # The receiver is down when the gateway starts: events wait in the outbox for it.
    gw = start_gateway(stack, tmp_path, database_url=db, index_prefix=prefix, extra_env=env)
    audit = AuditIndex(stack.es_url, prefix)
    try:
        token = stack.token("alice")
        for i in range(20):
            r = httpx.get(f"{gw.url}/dicom-web/studies", params={"PatientID": f"SYSLOG-{i}"},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
            assert r.status_code in (200, 204)
        admin = {"Authorization": f"Bearer {stack.token('ada')}"}  # /metrics needs system:status:read
        status = httpx.get(f"{gw.url}/metrics", headers=admin, timeout=30).text
        backlog = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("compliance_audit_outbox_backlog ")))
        assert backlog >= 21  # start + 20 queries, not all sinks have them
        assert 'compliance_audit_sink_up{sink="syslog"} 0' in status, status
        assert 'compliance_audit_sink_up{sink="elasticsearch"} 1' in status, status
        rsyslog.start()
        msgs = rsyslog.wait_for(lambda m: sum(x["msgid"] == MSGID and "110112" in x["msg"] for x in m) >= 20)
        queries = [m for m in msgs if "110112" in m["msg"]]
        assert len(queries) == 20
        assert all(m["msgid"] == MSGID and m["version"] == "1" and m["pri"] == "85" for m in queries)
        assert all(m["app"] == "compliance-gateway" for m in queries)
        syslog_uuids = [uuid_of(m) for m in msgs]
        assert len(syslog_uuids) == len(set(syslog_uuids)), "a message was delivered twice"
        es_docs = audit.wait_for(20, **{"event.id": "110112"})
        es_uuids = {d["event.uuid"] for d in es_docs}
        assert es_uuids <= set(syslog_uuids)
        # the gateway's start event (110100) went to both sinks too
        assert any("110100" in m["msg"] for m in msgs)
        # every event counts as shipped only now that both sinks have it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = httpx.get(f"{gw.url}/metrics", headers=admin, timeout=30).text
            if "compliance_audit_outbox_backlog 0" in text:
                break
            time.sleep(0.3)
        assert "compliance_audit_outbox_backlog 0" in text
        assert 'compliance_audit_sink_up{sink="syslog"} 1' in text, text
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)
    # after a clean stop the 110100 stop event was delivered to syslog as well
    final = rsyslog.messages()
    assert sum("110100" in m["msg"] for m in final) >= 2
