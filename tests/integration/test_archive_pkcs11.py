"""The archive's encrypting storage plugin end to end with the ``pkcs11`` KEK provider (SoftHSM2).

The test starts an Orthanc of its own (free port, its own storage, index, key store and SoftHSM2
token under a temporary directory, run as the stack user when run as root), the way
``benchmarks/stow_encrypted.py`` starts its encrypted archive, but with
``COMPLIANCE_ARCHIVE_KEY_PROVIDER=pkcs11``. It does not touch the running stack's Orthanc.

What is checked is what a user (or someone holding a copy of the disk) observes: STOW answers 200;
no stored file is a DICOM file or carries the patient's id or name; every stored file is an
envelope under a data key wrapped by a KEK of the ``pkcs11`` provider (the key store's tables) that
lives on the token (the custodian's status route); WADO-RS gives back the original bytes, also after
a restart of the archive; after a shred through the custodian's route the stored files report
``key_destroyed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compliance.config import PROJECT_ROOT
from compliance.crypto.streaming import read_header
from compliance.dicomweb.stow import multipart_related

from .conftest import _free_port, stop_process
from .dicom_samples import Sample, parts_of_multipart, unique_instance

pytestmark = pytest.mark.integration

STACK_USER = "compliance-stack"
USER = "gateway"
SO_PIN = "87654321"
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _run_as() -> list[str]:
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={STACK_USER}", f"--regid={STACK_USER}", "--init-groups"]
    return []


def _chown_tree(base: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(base, STACK_USER, STACK_USER)
        for p in base.rglob("*"):
            shutil.chown(p, STACK_USER, STACK_USER)


class Pkcs11Archive:
    """An Orthanc with the encrypting storage plugin whose KEKs live in a fresh SoftHSM2 token."""

    def __init__(self, base: Path, module: str) -> None:
        self.base = base
        self.password = secrets.token_hex(16)
        self.auth = (USER, self.password)
        self.token_label = f"archive-{secrets.token_hex(6)}"
        self.pin = secrets.token_hex(8)
        for d in ("storage", "index", "tmp", "stack", "tokens"):
            (base / d).mkdir(parents=True)
        conf = base / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(base),
            "COMPLIANCE_ENVIRONMENT": "development",  # the plugin's Settings(); production is the default
            "COMPLIANCE_STACK_DIR": str(base / "stack"),
            "COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY": secrets.token_hex(32),
            "COMPLIANCE_ARCHIVE_KEY_PROVIDER": "pkcs11",
            "COMPLIANCE_ARCHIVE_PKCS11_MODULE": module,
            "COMPLIANCE_ARCHIVE_PKCS11_TOKEN_LABEL": self.token_label,
            "COMPLIANCE_ARCHIVE_PKCS11_PIN": self.pin,
            "SOFTHSM2_CONF": str(conf),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        _chown_tree(base)
        # a fresh token, created by the archive's user so its files are that user's
        subprocess.run([*_run_as(), "softhsm2-util", "--init-token", "--free", "--label", self.token_label,
                        "--pin", self.pin, "--so-pin", SO_PIN], env=self.env, check=True, capture_output=True,
                       timeout=60)
        # the key store, as deploy/local/up creates it: as the archive's user, with Debian's Python
        setup = subprocess.run(
            [*_run_as(), "env", f"PYTHONPATH={PROJECT_ROOT}:{PROJECT_ROOT}/.venv/lib/python3.11/site-packages",
             "/usr/bin/python3", "-m", "compliance.archive.keystore_setup"],
            env=self.env, cwd=base, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, f"key store set-up failed:\n{setup.stdout}\n{setup.stderr}"
        self.setup_report = json.loads(setup.stdout.strip().splitlines()[-1])

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    @property
    def keys_db(self) -> Path:
        return self.base / "stack" / "archive-keys" / "keys.db"

    def start(self) -> None:
        cfg = json.loads((PROJECT_ROOT / "deploy/orthanc/orthanc.json").read_text())
        port = _free_port()
        cfg.update(HttpPort=port, RegisteredUsers={USER: self.password}, StorageDirectory=str(self.storage),
                   IndexDirectory=str(self.base / "index"), TemporaryDirectory=str(self.base / "tmp"))
        cfg["Plugins"].append("/usr/share/orthanc/plugins/libOrthancPython.so")
        cfg.update(PythonScript=str(PROJECT_ROOT / "compliance/archive/orthanc_plugin.py"), PythonVerbose=False,
                   MaximumStorageCacheSize=0)
        conf = self.base / "orthanc.json"
        conf.write_text(json.dumps(cfg))
        _chown_tree(self.base)
        log = open(self.base / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen([*_run_as(), "/usr/sbin/Orthanc", str(conf)], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"Orthanc with the pkcs11 plugin did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, timeout=30)
        self.process = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "orthanc.log").read_text(errors="replace")[-3000:]
        return ""

    # --- what a client of this archive does --------------------------------------------------

    def stow(self, s: Sample) -> httpx.Response:
        body, content_type = multipart_related([s.data])
        return httpx.post(f"{self.url}/dicom-web/studies", content=body, auth=self.auth, timeout=60,
                          headers={"Content-Type": content_type, "Accept": "application/dicom+json"})

    def wado(self, s: Sample) -> httpx.Response:
        return httpx.get(f"{self.url}/dicom-web/studies/{s.study_uid}/series/{s.series_uid}/instances/"
                         f"{s.sop_instance_uid}", auth=self.auth, headers={"Accept": INSTANCE_ACCEPT}, timeout=60)

    def reads_back(self, s: Sample) -> bool:
        r = self.wado(s)
        assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}\n{self.log_tail()}"
        return parts_of_multipart(r.content, r.headers["content-type"]) == [s.data]

    def attachments(self, s: Sample) -> list[dict]:
        found = httpx.post(f"{self.url}/tools/lookup", content=s.sop_instance_uid, auth=self.auth, timeout=10)
        instance = next(i["ID"] for i in found.json() if i["Type"] == "Instance")
        names = httpx.get(f"{self.url}/instances/{instance}/attachments", auth=self.auth, timeout=10).json()
        out = []
        for name in names:
            info = httpx.get(f"{self.url}/instances/{instance}/attachments/{name}/info", auth=self.auth,
                             timeout=10).json()
            out.append({"instance": instance, "uuid": info["Uuid"], "content_type": info["ContentType"]})
        return out

    def custodian(self, path: str, body: dict | None = None) -> dict:
        if body is None:
            r = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=60)
        else:
            r = httpx.post(f"{self.url}{path}", json=body, auth=self.auth, timeout=60)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()


@pytest.fixture
def archive() -> Iterator[Pkcs11Archive]:
    from compliance.crypto.providers.pkcs11 import find_softhsm2_module

    module = find_softhsm2_module()
    if shutil.which("softhsm2-util") is None or module is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2: softhsm2-util and libsofthsm2.so)")
    for needed in ("/usr/sbin/Orthanc", "/usr/share/orthanc/plugins/libOrthancPython.so"):
        if not Path(needed).exists():
            pytest.skip(f"{needed} is missing (deploy/local/up installs Orthanc and orthanc-python)")
    base = Path(tempfile.mkdtemp(prefix="archive-pkcs11-"))
    os.chmod(base, 0o755)  # noqa: S103 - the archive runs as the stack user and must traverse it
    a: Pkcs11Archive | None = None
    try:
        a = Pkcs11Archive(base, module)
        a.start()
        yield a
    finally:
        if a is not None:
            a.stop()
        shutil.rmtree(base, ignore_errors=True)


def _key_rows(db_path: Path, key_id: str) -> tuple[bytes | None, str, str, str]:
    """(wrapped key, KEK id, KEK provider, KEK state) of a data key, read from the key store."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT d.wrapped_key, d.kek_id, k.provider, k.state FROM crypto_data_key d "
            "JOIN crypto_kek k ON k.id = d.kek_id WHERE d.id = ?", (key_id,)).fetchall()
    assert len(rows) == 1, f"data key {key_id} is not in the key store"
    return rows[0]


def test_archive_with_pkcs11_kek_encrypts_reads_back_survives_restart_and_shreds(archive: Pkcs11Archive):
    assert archive.setup_report["provider"] == "pkcs11", archive.setup_report
    s = unique_instance()

    # 1. STOW straight into this archive's DICOMweb
    r = archive.stow(s)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}\n{archive.log_tail()}"

    # 2. the storage directory holds only envelopes, under a data key wrapped by the token's KEK
    files = [p for p in archive.storage.rglob("*") if p.is_file()]
    attachments = archive.attachments(s)
    assert {a["uuid"] for a in attachments} <= {p.name for p in files}, (attachments, files)
    assert any(a["content_type"] == 1 for a in attachments)
    kek_ids = set()
    for p in files:
        content = p.read_bytes()
        assert content[128:132] != b"DICM", f"{p} is a plaintext DICOM file"
        assert s.patient_id.encode() not in content, f"{p} carries the patient id"
        assert s.patient_name.encode() not in content, f"{p} carries the patient name"
        assert s.data[132:400] not in content, f"{p} carries the DICOM header"
        header = read_header(content[:4096])
        wrapped, kek_id, provider, state = _key_rows(archive.keys_db, header.key_id)
        assert provider == "pkcs11" and state == "active", (kek_id, provider, state)
        assert wrapped is not None, f"data key {header.key_id} is not live"
        kek_ids.add(kek_id)
    assert kek_ids == {archive.setup_report["active_kek"]}
    status = archive.custodian("/compliance/keys/status")
    assert status["provider"]["provider"] == "pkcs11", status
    keks = {k["id"]: k for k in status["keks"]}
    assert all(keks[k]["provider"] == "pkcs11" and keks[k]["in_provider"] for k in kek_ids), status
    assert kek_ids <= set(status["provider"]["kek_ids"]), status
    assert not list(archive.base.rglob("keyring.json")), "a pkcs11 archive writes no keyring file"

    # 3. WADO-RS gives back the original bytes
    assert archive.reads_back(s)

    # 4. after a restart (the KEK is in the token, the wrapped data key in the key store), still
    archive.stop()
    archive.start()
    assert archive.reads_back(s)
    assert archive.custodian("/compliance/archive/verify", {"attachments": attachments}) == {
        "checked": len(attachments), "failures": []}

    # 5. shred through the custodian route: the stored files can no longer be decrypted
    key_ids = {read_header(p.read_bytes()[:4096]).key_id for p in files}
    shredded = archive.custodian("/compliance/keys/shred", {"patient_id": s.patient_id, "study_uids": [s.study_uid]})
    assert shredded == {"destroyed": 1, "state": "shredded"}, shredded
    for key_id in key_ids:
        wrapped, *_ = _key_rows(archive.keys_db, key_id)
        assert wrapped is None, "the shredded data key is gone from the key store"
    verify = archive.custodian("/compliance/archive/verify", {"attachments": attachments})
    assert verify["checked"] == len(attachments)
    assert [f["result"] for f in verify["failures"]] == ["key_destroyed"] * len(attachments), verify
    r = archive.wado(s)
    assert r.status_code != 200 and s.data[132:400] not in r.content, r.status_code
