"""Issue 12, item 3: PHI at rest beyond the DICOM objects.

Orthanc's index (patient names and ids), PostgreSQL and Elasticsearch live on the stack's encrypted volume
``phi``, the gateway's audit outbox on ``phi-gateway`` (gocryptfs, ``deploy/local/lib.sh``; their passwords
data keys of the archive's key store). An instance with a unique patient name and id is stored through
the real stack; then:

- each store, read through the plaintext mount, holds them (so the search below can find them);
- the ciphertext directories, read raw, hold neither;
- nothing else under the stack directory does (logs, temporary files, a store left outside the volume);
- the servers write on the mount: Orthanc's open index, Elasticsearch's data path, PostgreSQL's data
  directory, the gateway's database URL.

PostgreSQL gets the marker from a committed row of a table of the test's own (its WAL is on disk at
commit); the gateway under test keeps its outbox in a SQLite database on the volume, as the demo gateway
does.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from compliance.config import load_settings
from tests.integration.conftest import AuditIndex, Stack, delete_study, drop_prefix, start_gateway, stop_gateway
from tests.integration.dicom_samples import unique_instance
from tests.integration.test_dicomweb_gateway import stow

pytestmark = pytest.mark.integration

#: Never read: the distributions (public software, hundreds of MiB) under the stack directory.
SKIP_DIRS = ("dist", "keycloak")


def _mounts() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo (octal escapes decoded)."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mountpoint = left.split()[4].encode().decode("unicode_escape")
            found[mountpoint] = right.split()[0]
    return found


def _files(root: Path, *, skip: tuple[Path, ...] = ()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames:
            path = here / name
            if path.is_file() and not path.is_symlink():
                yield path


def _holding(root: Path, markers: list[bytes], *, skip: tuple[Path, ...] = ()) -> list[str]:
    """Files under ``root`` whose bytes contain any of the markers (read in overlapping chunks)."""
    found = []
    overlap = max(len(m) for m in markers) - 1
    for path in _files(root, skip=skip):
        try:
            with open(path, "rb") as f:
                tail = b""
                while chunk := f.read(1 << 20):
                    window = tail + chunk
                    hit = next((m for m in markers if m in window), None)
                    if hit is not None:
                        found.append(f"{path} ({hit.decode()})")
                        break
                    tail = window[-overlap:]
        except OSError:
            continue  # a file deleted under us (a rolled translog, a removed WAL)
    return found


def _audited(index: AuditIndex, study_uid: str) -> bool:
    """Wait (bounded) for the store's audit event; a search racing the index's creation answers 503."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if index.wait_for(1, within=5, **{"study.uids": study_uid}):
                return True
        except httpx.HTTPStatusError:
            time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def tom(stack: Stack) -> str:
    return stack.token("tom")


def test_phi_stores_are_on_the_encrypted_volume_and_only_ciphertext_reaches_the_disk(stack: Stack, tom: str,
                                                                                      tmp_path: Path):
    settings = load_settings()
    root = settings.stack_dir
    phi, phi_gateway = root / "phi", root / "phi-gateway"
    ciphers = (root / "phi-encrypted", root / "phi-gateway-encrypted")
    for mount, cipher in zip((phi, phi_gateway), ciphers, strict=True):
        assert (cipher / "gocryptfs.conf").is_file(), f"the stack has no encrypted volume {cipher}: run deploy/local/up"
        assert _mounts().get(str(mount)) == "fuse.gocryptfs", f"{mount} is not a mounted gocryptfs volume"

    # the servers write on the mount
    orthanc_pid = (root / "run" / "orthanc.pid").read_text().strip()
    open_files = [os.readlink(f"/proc/{orthanc_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{orthanc_pid}/fd")]
    assert any(f.startswith(f"{phi}/orthanc/") and f.endswith("/index") for f in open_files), \
        f"Orthanc's open index is not on the volume: {sorted(f for f in open_files if f.startswith('/'))}"
    nodes = httpx.get(f"{stack.es_url}/_nodes/stats/fs", timeout=30).json()["nodes"]
    data_paths = [d["path"] for n in nodes.values() for d in n["fs"]["data"]]
    assert data_paths and all(p.startswith(f"{phi}/elasticsearch/") for p in data_paths), data_paths
    pg_pid = (phi / "postgres" / "data" / "postmaster.pid").read_text().split()[0]
    assert os.readlink(f"/proc/{pg_pid}/cwd") == str(phi / "postgres" / "data")
    assert stack.settings_env.get("COMPLIANCE_DATABASE_URL") == f"sqlite:///{phi_gateway}/compliance.db"

    tag = uuid.uuid4().hex[:16].upper()
    name, patient_id, probe = f"ATREST^NAME{tag}", f"ATRESTID{tag}", f"ATRESTPG{tag}"
    markers = [m.encode() for m in (name, patient_id, probe)]
    prefix = f"test-atrest-{tag.lower()[:10]}"
    db = phi_gateway / f"test-atrest-{tag.lower()}.db"
    table = f"atrest_probe_{tag.lower()}"
    assert stack.postgres_url, "the stack has no PostgreSQL"
    pg_url = stack.postgres_url.replace("postgresql+psycopg://", "postgresql://")
    from compliance.db.migrate import upgrade

    upgrade(f"sqlite:///{db}")
    gw = start_gateway(stack, tmp_path, database_url=f"sqlite:///{db}", index_prefix=prefix)
    sample = unique_instance(patient_id=patient_id, patient_name=name)
    try:
        r = stow(gw, tom, sample)
        assert r.status_code == 200, r.text
        assert _audited(AuditIndex(stack.es_url, prefix), sample.study_uid), "the store was not audited"
        with psycopg.connect(pg_url) as conn:
            conn.execute(f"CREATE TABLE {table} (v text)")  # noqa: S608 - the test's own hex name
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (probe,))  # noqa: S608

        # every store holds the markers, read through the mount: the search below can find them
        for store, wanted in [(phi / "orthanc", name), (phi_gateway, patient_id), (phi / "elasticsearch", patient_id),
                              (phi / "postgres", probe)]:
            assert _holding(store, [wanted.encode()]), f"{wanted} is not in {store}: nothing to look for"
        # the disk below the mounts holds ciphertext only
        leaked = [f for cipher in ciphers for f in _holding(cipher, markers)]
        assert not leaked, "plaintext PHI in an encrypted volume's ciphertext:\n" + "\n".join(leaked)
        # and nothing else in the stack directory holds them (logs, temporary files, a store left outside)
        leaked = _holding(root, markers, skip=(phi, phi_gateway, *ciphers, *(root / d for d in SKIP_DIRS)))
        assert not leaked, "PHI outside the encrypted volume:\n" + "\n".join(leaked)
    finally:
        stop_gateway(gw)
        drop_prefix(stack, prefix)
        delete_study(stack, sample.study_uid)
        with psycopg.connect(pg_url) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
