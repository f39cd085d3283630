"""Orthanc storage-area plugin: every file Orthanc writes is encrypted by ``compliance.crypto``.

Loaded by Debian's ``orthanc-python`` (4.0, which offers ``orthanc.RegisterStorageArea(create,
read, remove)``: whole-file callbacks) as ``"PythonScript"``; ``deploy/local/up`` enables it by
default. It runs inside Orthanc under Debian's system Python 3.11 and imports this checkout plus
the project's virtualenv site-packages (same CPython minor version, so the venv's compiled wheels,
``cryptography`` among them, are ABI-compatible; checked at load, refused otherwise).

What it registers:

- the storage area (:class:`compliance.archive.storage.EncryptedFilesystemStorage` over Orthanc's
  ``StorageDirectory``): the DICOM file and every attachment are stored encrypted under the
  patient's data key (format and patient attribution documented there). When the C storage shim
  (``deploy/orthanc/compliance_storage_shim.c``, loaded before this plugin) has registered a storage
  area with range reads, this plugin publishes the storage to it instead
  (``compliance.archive.storage.ACTIVE_STORAGE``), so Orthanc stores one file per instance rather
  than two; without the shim it registers orthanc-python's whole-file storage area itself;
- ``/compliance/keys/*``, ``/compliance/archive/verify`` and ``/compliance/archive/failures`` REST routes
  (:mod:`compliance.archive.control`) through which the gateway and the operator CLI run key
  operations. They sit behind Orthanc's own HTTP authentication (the gateway's generated
  credentials; ``RemoteAccessAllowed: false``).

Key custody and authentication (details in :mod:`compliance.archive.keystore`): this process is
the custodian of the archive's keys. It opens the KEK provider itself, authenticated as the
archive's operating-system user (the ``local`` keyring is 0600 in a 0700 directory owned by that
user, outside the storage directory) or with the token's user PIN (``pkcs11``); it reads the patient
index key and any PIN from its environment (set by ``deploy/local/up`` from ``secrets.env``),
never from a file beside the data. Unwrapped data keys exist only in this process's memory (a
bounded cache, :mod:`compliance.archive.key_service`, emptied by shred, rewrap, rotate and destroy).

Fail closed: if the key store cannot be opened the plugin stops Orthanc (exit status 78) rather
than let Orthanc fall back to its built-in plaintext storage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol, SupportsInt, cast

_CHECKOUT = Path(__file__).resolve().parents[2]


def _prepare_path() -> None:
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"the storage plugin needs CPython 3.11 (the project's venv); this is {sys.version}")
    here = str(Path(__file__).resolve().parent)
    # orthanc-python puts the script's directory first; its module names (setup, storage, ...) must
    # not shadow top-level packages.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    site = os.environ.get("COMPLIANCE_PLUGIN_SITE_PACKAGES") or str(_CHECKOUT / ".venv/lib/python3.11/site-packages")
    for entry in (site, str(_CHECKOUT)):
        if entry not in sys.path:
            sys.path.insert(0, entry)


class RestOutput(Protocol):
    """The ``output`` Orthanc's Python plugin hands a REST callback (orthanc-python 4.0)."""

    def AnswerBuffer(self, buffer: bytes, mime_type: str) -> None: ...

    def SendHttpStatus(self, status: int, body: str, size: int) -> None: ...


def _install() -> None:
    import orthanc  # type: ignore[import-not-found]

    from compliance.archive.control import KeyControl
    from compliance.archive.keystore import open_key_store
    from compliance.archive.storage import EncryptedFilesystemStorage
    from compliance.config import Settings

    config = json.loads(orthanc.GetConfiguration())
    if config.get("MaximumStorageCacheSize", 128) != 0:
        # Orthanc's storage cache keeps decrypted files in memory: a shredded patient's images would
        # still be served from it, and the gateway trusts a 2xx retrieve to mean a live key.
        raise RuntimeError("MaximumStorageCacheSize must be 0 with the encrypting storage area")
    storage_dir = Path(config.get("StorageDirectory") or "OrthancStorage")
    settings = Settings()
    store = open_key_store(settings)
    storage = EncryptedFilesystemStorage(storage_dir, store.keys)

    control = KeyControl(store.keys, storage)

    def on_rest(output: RestOutput, uri: str, **request: object) -> None:
        response = control.handle(str(request.get("method", "GET")), uri,
                                  bytes(cast(bytes, request.get("body") or b"")))
        if response.status == 200:
            output.AnswerBuffer(response.encode(), "application/json")
        else:
            body = response.encode()
            # orthanc-python 4.0 takes the body as str plus its size
            output.SendHttpStatus(response.status, body.decode(), len(body))

    def on_create(uuid: str, content_type: SupportsInt, data: bytes) -> None:
        storage.create(uuid, int(content_type), data)

    def on_read(uuid: str, content_type: SupportsInt) -> bytes:
        try:
            return storage.read(uuid, int(content_type))
        except Exception as exc:
            orthanc.LogError(f"compliance storage: cannot read attachment {uuid}: {type(exc).__name__}")
            raise

    def on_remove(uuid: str, content_type: SupportsInt) -> None:
        storage.remove(uuid, int(content_type))

    if os.environ.get("COMPLIANCE_STORAGE_SHIM") == "registered":
        # The C shim (loaded before this plugin) registered a storage area with range reads and
        # calls this storage for every file: one file per instance instead of two.
        import compliance.archive.storage as storage_module

        storage_module.ACTIVE_STORAGE = storage
        orthanc.LogWarning("compliance storage: served through the storage shim (range reads)")
    else:
        orthanc.RegisterStorageArea(on_create, on_read, on_remove)
    orthanc.RegisterRestCallback("/compliance/keys/.*", on_rest)
    orthanc.RegisterRestCallback("/compliance/archive/verify", on_rest)
    orthanc.RegisterRestCallback("/compliance/archive/failures", on_rest)
    orthanc.LogWarning(f"compliance storage: encrypting {storage_dir} with provider {store.provider.name}")


def _main() -> None:
    try:
        _prepare_path()
        _install()
    except BaseException as exc:  # noqa: BLE001 - fail closed, never fall back to plaintext storage
        try:
            import orthanc  # type: ignore[import-not-found]

            orthanc.LogError(f"compliance storage plugin failed to start, stopping Orthanc: {exc!r}")
        finally:
            sys.stderr.write(f"compliance storage plugin failed to start: {exc!r}\n")
            sys.stderr.flush()
            os._exit(78)


try:
    import orthanc  # type: ignore[import-not-found]  # noqa: F401
except ImportError:
    pass  # imported outside Orthanc (tests, tools): nothing to register
else:
    _main()
