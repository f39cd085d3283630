"""The nginx front: nginx listens where clients connect and pushes the retrieved bytes; the gateway decides.

Python relaying a 0.5 MB WADO-RS answer costs more CPU than Orthanc spends serving it
(docs/benchmarks/gateway-overhead.md), so the deployed gateway sits behind nginx (Debian
``nginx-light``), as the request path of docs/design.md ("Who pushes the bytes") describes: nginx may
push the bytes, the gateway keeps the decision and the audit. The protocol between the two, all on loopback:

1. nginx passes every request to the gateway (``compliance serve``), adding
   ``X-Compliance-Front: <secret>`` (``COMPLIANCE_FRONT_SECRET``, known to nginx and the gateway
   only) and the client's address in ``X-Forwarded-For``; it overwrites both, so a client cannot set
   them through nginx, and a client talking to the gateway's own port does not know the secret.
2. For a WADO-RS retrieve of whole instances (``Transaction.RETRIEVE``) that carries the secret, with
   ``COMPLIANCE_RETRIEVE_DELEGATION`` on, the gateway verifies the token, decides, looks the
   study's patient up (cached) and commits the 110104 event to the outbox, exactly as when it
   relays itself. Then, instead of fetching, it answers with an empty body and
   ``X-Accel-Redirect: /_archive/{event uuid}/dicom-web/...``.
3. nginx follows that internal location (no client can request it): it asks Orthanc with the
   gateway's archive credentials and the client's ``Accept`` only (no token, no cookie, no other
   header), and streams the answer back without spooling it to disk.
4. If Orthanc answers anything but 2xx, nginx sends the original request back to the gateway with
   the secret, ``X-Compliance-Archive-Status`` and ``X-Compliance-Released-Event`` set (the gateway
   believes the released event only next to the secret, and never releases such a request again).
   The gateway then handles it as if undelegated: it asks the archive itself, answers
   404/410/integrity failure with its JSON body, and records a second 110104 with the failure
   outcome naming the released event. A delegated retrieve the archive refuses thus leaves two
   events: the release (outcome 0) and the refusal.

Anything nginx itself must refuse (gateway down, a body too large) is answered in JSON. nginx keeps no
access log (request lines carry study UIDs and QIDO queries can carry patient names) and buffers
request and response bodies in memory only (``proxy_request_buffering off``,
``proxy_max_temp_file_size 0``). It refuses bodies over the gateway's own limits with 413 before
passing anything on: STOW-RS (``POST /dicom-web/...``) over ``COMPLIANCE_STOW_MAX_BYTES``, any other
body over ``COMPLIANCE_API_MAX_BODY_BYTES``; the gateway enforces both again (compliance/api/edge.py).

The client's address reaches the gateway in ``X-Forwarded-For`` (nginx's ``$remote_addr``,
overwriting whatever the client sent); the gateway believes it only next to the secret.

``compliance front`` renders the configuration (mode 0600: it holds the archive credentials and the
front secret) under ``{stack_dir}/front/`` and runs nginx in the foreground; ``deploy/local/gateway``
starts it.
"""

from __future__ import annotations

import base64
import hmac
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit

#: Set by nginx on every request it passes to the gateway (overwriting any client value), to the
#: secret it shares with the gateway (``COMPLIANCE_FRONT_SECRET``).
FRONT_HEADER = "x-compliance-front"
#: Set by nginx when it hands a retrieve the archive refused back to the gateway.
ARCHIVE_STATUS_HEADER = "x-compliance-archive-status"
RELEASED_EVENT_HEADER = "x-compliance-released-event"
#: The internal location nginx streams archive answers from.
INTERNAL_PREFIX = "/_archive/"


def is_front(request_value: str | None, secret: str) -> bool:
    """Whether a request came through the front: it carries the shared secret (constant-time compare)."""
    return bool(secret) and request_value is not None and hmac.compare_digest(request_value.encode(), secret.encode())


def released_event(value: str | None) -> str | None:
    """The released event a refused hand-back names (a UUID), or None when absent or malformed."""
    try:
        return str(uuid.UUID(value)) if value else None
    except ValueError:
        return None


def accel_redirect(event_uuid: str, archive_path: str, raw_query: str) -> str:
    """The ``X-Accel-Redirect`` target for a released retrieve (``archive_path`` includes the DICOMweb root)."""
    return f"{INTERNAL_PREFIX}{event_uuid}{archive_path}" + (f"?{raw_query}" if raw_query else "")


def _host_port(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return address


def render_nginx_config(*, listen: str, backend: str, archive_url: str, archive_username: str,
                        archive_password: str, front_secret: str, state_dir: Path, workers: int = 1,
                        api_max_body_bytes: int = 1024 * 1024, stow_max_bytes: int = 256 * 1024 * 1024) -> str:
    """nginx.conf for the front; ``state_dir`` holds its pid, error log and (unused) temp directories.
    Bodies over ``stow_max_bytes`` (STOW-RS) or ``api_max_body_bytes`` (anything else) are refused here."""
    listen, backend = _host_port(listen), _host_port(backend)
    if api_max_body_bytes < 1 or stow_max_bytes < 1:
        raise ValueError("the front's body limits must be positive (0 would mean unlimited to nginx)")
    if not front_secret or not front_secret.isalnum():
        raise ValueError("the front secret must be a non-empty alphanumeric string (COMPLIANCE_FRONT_SECRET)")
    archive = urlsplit(archive_url)
    if archive.scheme != "http" or not archive.hostname or not archive.port:
        raise ValueError(f"the front reaches the archive over http://HOST:PORT, not {archive_url!r}")
    basic = base64.b64encode(f"{archive_username}:{archive_password}".encode()).decode()
    archive_hostport = f"{archive.hostname}:{archive.port}"
    state = state_dir.resolve()
    gateway_headers = """
      proxy_set_header Host $http_host;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Real-IP "";
      proxy_set_header Forwarded "";"""
    # Every location passing requests to the gateway: nginx inherits error_page only into a location
    # that sets none of its own.
    to_gateway = f"""
      proxy_pass http://compliance_gateway;{gateway_headers}
      proxy_set_header {FRONT_HEADER} "{front_secret}";
      proxy_set_header {ARCHIVE_STATUS_HEADER} "";
      proxy_set_header {RELEASED_EVENT_HEADER} "";
      error_page 413 = @body_too_large;
      error_page 502 503 504 = @gateway_unavailable;"""
    return f"""# Rendered by `compliance front` (compliance/dicomweb/front.py). Mode 0600: it holds secrets.
worker_processes {int(workers)};
daemon off;
pid {state}/nginx.pid;
error_log {state}/error.log warn;

events {{ worker_connections 4096; }}

http {{
  access_log off;
  server_tokens off;
  default_type application/json;  # nginx's own answers (return) are JSON
  client_body_temp_path {state}/client_body;
  proxy_temp_path {state}/proxy;
  fastcgi_temp_path {state}/fastcgi;
  uwsgi_temp_path {state}/uwsgi;
  scgi_temp_path {state}/scgi;

  # Bodies up to the gateway's limits (below, per location) go to it streamed, never spooled;
  # answers are buffered in memory only: a decrypted image never lands in nginx's temp files.
  client_max_body_size {int(api_max_body_bytes)};
  proxy_request_buffering off;
  proxy_max_temp_file_size 0;
  proxy_buffer_size 64k;
  proxy_buffers 32 64k;
  proxy_busy_buffers_size 128k;
  proxy_http_version 1.1;
  proxy_read_timeout 300s;
  proxy_send_timeout 300s;

  upstream compliance_gateway {{
    server {backend};
    keepalive 64;
  }}
  upstream compliance_archive {{
    server {archive_hostport};
    keepalive 64;
    keepalive_timeout 800ms;  # Orthanc closes idle connections after 1 s
  }}

  server {{
    listen {listen};

    location / {{{to_gateway}
    }}

    # DICOMweb: STOW-RS bodies up to COMPLIANCE_STOW_MAX_BYTES (the other transactions send none).
    location /dicom-web/ {{
      client_max_body_size {int(stow_max_bytes)};{to_gateway}
    }}

    # Released retrieves only: reached through the gateway's X-Accel-Redirect, never from outside.
    location ~ "^{INTERNAL_PREFIX}(?<released_event>[0-9a-f-]{{36}})(?<archive_path>/.*)$" {{
      internal;
      proxy_pass http://compliance_archive$archive_path$is_args$args;
      proxy_method GET;
      proxy_pass_request_headers off;
      proxy_pass_request_body off;
      proxy_set_header Host {archive_hostport};
      proxy_set_header Connection "";
      proxy_set_header Authorization "Basic {basic}";
      proxy_set_header Accept $http_accept;
      proxy_hide_header Set-Cookie;
      proxy_hide_header WWW-Authenticate;
      proxy_hide_header Keep-Alive;
      proxy_intercept_errors on;
      error_page 300 301 302 303 304 307 308 400 401 403 404 405 406 409 410 412 415 416 422
                 500 501 502 503 504 = @archive_refused;
    }}

    # The archive refused a released retrieve: the gateway handles the request itself (and audits the refusal).
    location @archive_refused {{
      # Only a released DICOMweb retrieve comes back here; a client asking for the internal location
      # itself is refused by it (404) and lands here too: answer it without the gateway.
      if ($request_uri !~ "^/dicom-web/") {{
        return 404 '{{"error": "not_found", "message": "no resource here"}}';
      }}
      proxy_pass http://compliance_gateway$request_uri;{gateway_headers}
      proxy_set_header {FRONT_HEADER} "{front_secret}";
      proxy_set_header {ARCHIVE_STATUS_HEADER} $upstream_status;
      proxy_set_header {RELEASED_EVENT_HEADER} $released_event;
      proxy_intercept_errors off;
      error_page 502 503 504 = @gateway_unavailable;
    }}

    location @body_too_large {{
      return 413 '{{"error": "payload_too_large",
                   "message": "the request body is larger than this server accepts; nothing was passed on"}}';
    }}

    location @gateway_unavailable {{
      return 503 '{{"error": "gateway_unavailable",
                   "message": "the gateway behind this front does not answer; nothing was served"}}';
    }}
  }}
}}
"""


def write_config(text: str, state_dir: Path) -> Path:
    """Write nginx.conf under ``state_dir`` with mode 0600 (it holds the archive credentials)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (state_dir / sub).mkdir(exist_ok=True)
    path = state_dir / "nginx.conf"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        raise FileNotFoundError("nginx is not installed (Debian package nginx-light; deploy/local/up installs it)")
    return found


def nginx_command(config: Path, state_dir: Path) -> list[str]:
    return [nginx_binary(), "-c", str(config), "-p", str(state_dir.resolve())]
