"""``local`` key provider: KEKs in a keyring file on the gateway's own disk.

The keyring is JSON, mode 0600, owned by the gateway's user::

    {"format": "compliance-keyring", "version": 1,
     "keks": {"<kek id>": {"key": "<base64 of 32 bytes>", "created_at": "<ISO 8601>"}}}

It holds KEKs in the clear, so it protects data at rest only as well as the file is protected:
it is meant for development and for sites without an HSM, and it is refused outside
``environment=development`` unless the operator named its path explicitly. It refuses to open a
keyring readable or writable by anyone but its owner.

Wrapping is AES-256-GCM under the KEK::

    wrapped = 0x01 || nonce (12) || AES-256-GCM_{KEK}(nonce, data key, aad) (32 + 16)
    aad     = b"compliance local wrap v1\\x00" || kek id || 0x00 || context

Every write replaces the file atomically (temporary file in the same directory, fsync, rename,
fsync of the directory) under an exclusive ``flock`` on ``<keyring>.lock``, so a CLI rotating keys
and running gateway processes never see a half-written keyring. A destroyed KEK is gone from the
file, but not from earlier backups of it or from blocks the filesystem has not reused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance.crypto.interfaces import DecryptionError, KeyProviderError
from compliance.errors import ConfigurationError

__all__ = ["LocalKeyProvider"]

log = logging.getLogger(__name__)

_WRAP_VERSION = b"\x01"
_AAD_LABEL = b"compliance local wrap v1\x00"
_NONCE = 12


class LocalKeyProvider:
    name = "local"

    def __init__(
        self,
        keyring_path: Path | str,
        *,
        environment: str,
        explicit_path: bool,
        create_if_missing: bool = False,
    ) -> None:
        """Open (or, with ``create_if_missing``, create) the keyring at ``keyring_path``.

        ``explicit_path`` says the operator configured the path; a defaulted path is refused outside
        development so a demo keyring cannot end up guarding production data unnoticed.
        """
        self.path = Path(keyring_path)
        if environment != "development" and not explicit_path:
            raise ConfigurationError(
                "the local keyring needs an explicitly configured path outside development"
            )
        if environment != "development":
            log.warning("local key provider in %s: KEKs are stored in a file, not an HSM", environment)
        self._lock = threading.Lock()
        self._keks: dict[str, dict[str, str]] = {}
        if not self.path.exists():
            if not create_if_missing:
                raise ConfigurationError(f"keyring {self.path} does not exist; run the key set-up")
            self._create()
        self._load()

    # --- file handling -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _create(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._file_lock():
            if not self.path.exists():
                self._write({})

    def _check_permissions(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise KeyProviderError(f"keyring {self.path} cannot be read") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"keyring {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"keyring {self.path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600"
            )
        if st.st_uid != os.geteuid():
            raise ConfigurationError(f"keyring {self.path} is not owned by the gateway's user")

    def _load(self) -> None:
        self._check_permissions()
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            if document.get("format") != "compliance-keyring" or document.get("version") != 1:
                raise ValueError("not a version 1 keyring")
            keks = document["keks"]
            for entry in keks.values():
                if len(base64.b64decode(entry["key"], validate=True)) != 32:
                    raise ValueError("a KEK is not 32 bytes")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise KeyProviderError(f"keyring {self.path} is unreadable or corrupt") from exc
        self._keks = keks

    def _write(self, keks: Mapping[str, Mapping[str, str]]) -> None:
        document = {"format": "compliance-keyring", "version": 1, "keks": dict(keks)}
        data = json.dumps(document, indent=1, sort_keys=True).encode("utf-8")
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _kek(self, kek_id: str) -> bytes:
        entry = self._keks.get(kek_id)
        if entry is None:
            # Another process (the CLI rotating keys) may have added it since we loaded.
            with self._file_lock():
                self._load()
            entry = self._keks.get(kek_id)
        if entry is None:
            raise KeyProviderError(f"KEK {kek_id} is not in the keyring")
        return base64.b64decode(entry["key"])

    # --- KeyProvider -----------------------------------------------------------------------------

    def kek_ids(self) -> list[str]:
        with self._lock, self._file_lock():
            self._load()
            return sorted(self._keks)

    def create_kek(self) -> str:
        kek_id = f"local-{uuid.uuid4().hex}"
        key = AESGCM.generate_key(bit_length=256)
        with self._lock, self._file_lock():
            self._load()
            keks = dict(self._keks)
            keks[kek_id] = {
                "key": base64.b64encode(key).decode("ascii"),
                "created_at": datetime.now(UTC).isoformat(),
            }
            self._write(keks)
            self._keks = keks
        return kek_id

    def wrap(self, kek_id: str, data_key: bytes, *, context: bytes) -> bytes:
        with self._lock:
            kek = self._kek(kek_id)
        nonce = os.urandom(_NONCE)
        aad = _AAD_LABEL + kek_id.encode() + b"\x00" + context
        return _WRAP_VERSION + nonce + AESGCM(kek).encrypt(nonce, data_key, aad)

    def unwrap(self, kek_id: str, wrapped: bytes, *, context: bytes) -> bytes:
        with self._lock:
            kek = self._kek(kek_id)
        if len(wrapped) < 1 + _NONCE + 16 or wrapped[:1] != _WRAP_VERSION:
            raise DecryptionError()
        aad = _AAD_LABEL + kek_id.encode() + b"\x00" + context
        try:
            return AESGCM(kek).decrypt(wrapped[1 : 1 + _NONCE], wrapped[1 + _NONCE :], aad)
        except InvalidTag:
            raise DecryptionError() from None

    def destroy_kek(self, kek_id: str) -> None:
        with self._lock, self._file_lock():
            self._load()
            if kek_id not in self._keks:
                raise KeyProviderError(f"KEK {kek_id} is not in the keyring")
            keks = {k: v for k, v in self._keks.items() if k != kek_id}
            self._write(keks)
            self._keks = keks

    def describe(self) -> Mapping[str, Any]:
        return {
            "provider": self.name,
            "keyring": str(self.path),
            "kek_ids": self.kek_ids(),
            "note": "KEKs are stored in a file (mode 0600), not in an HSM",
        }
