"""SyslogTlsAuditSink: ships audit messages to an external Audit Record Repository (IHE ATNA ITI-20).

One message per event, RFC 5424 section 6:

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID IHE+RFC-3881 - BOM ATNA-XML

* PRI: facility 10 (security/authorization) and severity 5 (notice), or 4 (warning) when the event's
  outcome is a failure (IHE ITI TF-2 3.20.6.1);
* TIMESTAMP: the event's own time (``@timestamp``, UTC, milliseconds);
* MSGID ``IHE+RFC-3881``; MSG is the DICOM PS3.15 A.5.1 XML in UTF-8, preceded by the BOM RFC 5424
  section 6.4 requires for a UTF-8 MSG;
* STRUCTURED-DATA ``[compliance@32473 uuid="..." seq="..." hash="..."]``: the event UUID (the ATNA
  message has no identifier of its own, so this is how a receiver recognises a repeated delivery) and
  the hash chain link (compliance/audit/chain.py). 32473 is the documentation enterprise number of
  RFC 5612: a site with its own IANA private enterprise number sets ``SD_ID`` to it.

Transport: TLS (RFC 5425) with the server's certificate verified against ``ca_file`` and its name
(``server_name``, default the host); a client certificate is presented when configured (ATNA
mutual node authentication). Framing: octet counting, ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425
section 4.3, RFC 6587 section 3.4.1).

Delivery: syslog over TLS has no application-level acknowledgement. A batch counts as delivered
when every message was written to the TLS connection; on any error the connection is dropped and the
whole batch is reported unavailable, so it is sent again (at least once; the receiver can tell a
repeat by the event UUID in the XML). Receivers must accept messages larger than the RFC's 8192-octet
minimum (rsyslog: ``global(maxMessageSize=...)``), since an ATNA query message can be larger.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compliance.audit.interfaces import AuditSinkUnavailable, ShipResult

__all__ = ["MSGID", "SyslogTlsAuditSink", "frame", "rfc5424_message"]

MSGID = "IHE+RFC-3881"
SD_ID = "compliance@32473"
FACILITY_AUTH = 10
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
BOM = b"\xef\xbb\xbf"


def _printusascii(value: str, limit: int) -> str:
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return cleaned or "-"


def _sd_value(value: object) -> str:
    # RFC 5424 section 6.3.3: '"', '\\' and ']' are escaped in PARAM-VALUE.
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def structured_data(document: dict[str, Any]) -> str:
    params = [("uuid", document.get("event.uuid")), ("seq", document.get("chain.seq")),
              ("hash", document.get("chain.hash"))]
    inner = " ".join(f'{k}="{_sd_value(v)}"' for k, v in params if v is not None)
    return f"[{SD_ID} {inner}]" if inner else "-"


def rfc5424_message(document: dict[str, Any], *, hostname: str, app_name: str, procid: str) -> bytes:
    """The SYSLOG-MSG of one audit document (RFC 5424 section 6)."""
    severity = SEVERITY_NOTICE if int(document.get("event.outcome") or 0) == 0 else SEVERITY_WARNING
    pri = FACILITY_AUTH * 8 + severity
    timestamp = str(document["@timestamp"])
    header = (f"<{pri}>1 {timestamp} {_printusascii(hostname, 255)} {_printusascii(app_name, 48)} "
              f"{_printusascii(procid, 128)} {MSGID} {structured_data(document)}")
    return header.encode("utf-8") + b" " + BOM + str(document["atna.xml"]).encode("utf-8")


def frame(message: bytes) -> bytes:
    """Octet-counting framing (RFC 5425 section 4.3)."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogTlsAuditSink:
    """An :class:`~compliance.audit.interfaces.AuditSink` speaking syslog over TLS (RFC 5425)."""

    name = "syslog"

    def __init__(self, host: str, port: int, *, ca_file: Path, cert_file: Path | None = None,
                 key_file: Path | None = None, server_name: str | None = None, hostname: str | None = None,
                 app_name: str = "compliance-gateway", timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self.server_name = server_name or host
        self.hostname = hostname or socket.gethostname()
        self.app_name = app_name
        self._timeout = timeout
        self._context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            self._context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        self._conn: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        if self._conn is not None:
            # The receiver never sends anything: a readable socket means it closed (or reset) the
            # connection, and a write now could be lost without an error. Reconnect instead.
            readable, _, _ = select.select([self._conn], [], [], 0)
            if not readable:
                return self._conn
            self.close()
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self._timeout)
        except OSError as exc:
            raise AuditSinkUnavailable(f"syslog receiver {self.host}:{self.port} is unreachable: {exc}") from exc
        try:
            self._conn = self._context.wrap_socket(raw, server_hostname=self.server_name)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise AuditSinkUnavailable(f"TLS with the syslog receiver {self.host}:{self.port} failed: {exc}") from exc
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # ------------------------------------------------------------------ AuditSink

    def ensure_ready(self) -> None:
        self._connect()

    def ship(self, batch: Sequence[tuple[str, dict[str, Any]]]) -> ShipResult:
        if not batch:
            return ShipResult()
        procid = str(os.getpid())
        failed: dict[str, str] = {}
        payload = bytearray()
        sent: list[str] = []
        for uuid, document in batch:
            try:
                payload += frame(rfc5424_message(document, hostname=self.hostname, app_name=self.app_name,
                                                 procid=procid))
            except (KeyError, ValueError) as exc:
                failed[uuid] = f"invalid document for syslog: {exc}"
                continue
            sent.append(uuid)
        if sent:
            conn = self._connect()
            try:
                conn.sendall(payload)
            except (OSError, ssl.SSLError) as exc:
                self.close()
                raise AuditSinkUnavailable(f"sending to the syslog receiver failed: {exc}") from exc
        return ShipResult(shipped=tuple(sent), failed=failed)
