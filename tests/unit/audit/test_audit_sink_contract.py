"""The AuditSink contract (tests/unit/audit/sink_contract.py) on the sinks that need no server of the
stack: syslog over TLS against a receiver of the test's own on loopback, and the fan-out (on a SQLite
database) in front of it. Elasticsearch runs it in tests/integration/test_audit_sink_contract.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from compliance.audit.fanout import FanOutAuditSink
from compliance.audit.syslog import BOM, SD_ID, SyslogTlsAuditSink
from compliance.db.migrate import upgrade
from compliance.db.session import make_engine
from tests.unit.audit.sink_contract import AuditSinkContract, SinkHarness

_SD_UUID = re.compile(rf'\[{re.escape(SD_ID)} uuid="([^"]+)"')


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA: (certificate file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "receiver.crt", directory / "receiver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class SyslogReceiver:
    """A syslog/TLS receiver on loopback (RFC 5425 octet counting) that keeps every message it reads."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(str(cert_file), str(key_file))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        #: (uuid from the structured data, the ATNA XML) per message, in arrival order.
        self.messages: list[tuple[str, str]] = []
        self._last_read = time.monotonic()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: socket.socket) -> None:
        try:
            conn = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        buffer = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, rest = buffer.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    message, buffer = rest[:int(length)], rest[int(length):]
                    header, xml = message.split(BOM, 1)
                    found = _SD_UUID.search(header.decode("utf-8"))
                    with self._lock:
                        self.messages.append((found.group(1) if found else "", xml.decode("utf-8")))
                        self._last_read = time.monotonic()

    def stored(self, event_uuid: str) -> list[str]:
        with self._lock:
            return [xml for message_uuid, xml in self.messages if message_uuid == event_uuid]

    def settle(self, quiet: float = 0.3, limit: float = 10.0) -> None:
        """Wait until nothing has arrived for ``quiet`` seconds (what was sent has been read)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and time.monotonic() - self._last_read < quiet:
            time.sleep(0.05)

    def close(self) -> None:
        self._listener.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _xml_of(document: dict[str, Any]) -> str:
    return str(document["atna.xml"])


@pytest.fixture(params=["syslog", "fanout"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SinkHarness]:
    cert_file, key_file = _self_signed(tmp_path)
    receiver = SyslogReceiver(cert_file, key_file)

    def syslog_sink(port: int) -> SyslogTlsAuditSink:
        return SyslogTlsAuditSink("127.0.0.1", port, ca_file=cert_file, timeout=5)

    sink = syslog_sink(receiver.port)
    if request.param == "syslog":
        yield SinkHarness(sink=sink, stored=receiver.stored, as_stored=_xml_of,
                          unreachable=lambda: syslog_sink(_closed_port()), settle=receiver.settle,
                          deduplicates=False)
    else:
        url = f"sqlite:///{tmp_path / 'fanout.db'}"
        upgrade(url)
        engine = make_engine(url)
        yield SinkHarness(sink=FanOutAuditSink({"syslog": sink}, engine), stored=receiver.stored,
                          as_stored=_xml_of,
                          unreachable=lambda: FanOutAuditSink({"syslog": syslog_sink(_closed_port())}, engine),
                          settle=receiver.settle, checks_backend_when_readied=False)
        engine.dispose()
    sink.close()
    receiver.close()


class TestAuditSinkContract(AuditSinkContract):
    pass
