"""The storage shim fails closed (deploy/orthanc/compliance_storage_shim.c), on a real Orthanc.

The shim registers Orthanc's storage area and hands every read and write to the project's Python
storage. If that storage is not there, nothing may be written in plaintext behind its back:
- listed after the Python plugin (which would already have chosen a storage of its own), it refuses
  to start Orthanc;
- loaded without the Python plugin, or with the Python plugin running a script that publishes no
  storage object (``compliance.archive.storage.ACTIVE_STORAGE`` left ``None``), every write is
  refused and nothing lands in the storage directory.

Each test starts an Orthanc of its own (Debian's binary, the project's configuration) on a free port.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydicom.data import get_testdata_file

from compliance.config import PROJECT_ROOT, load_settings

from .conftest import _free_port, stop_process

pytestmark = pytest.mark.integration

PYTHON_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPython.so"


def _shim() -> Path:
    shim = load_settings().stack_dir / "orthanc" / "libComplianceStorageShim.so"
    if not shim.is_file():
        pytest.fail(f"the storage shim is not built ({shim}): deploy/local/up builds it", pytrace=False)
    return shim


class Archive:
    def __init__(self, base: Path, plugins: list[str], script: str | None, *, importable: bool = False) -> None:
        self.base = base
        self.password = secrets.token_hex(12)
        for d in ("storage", "index", "tmp"):
            (base / d).mkdir()
        cfg = json.loads((PROJECT_ROOT / "deploy/orthanc/orthanc.json").read_text())
        self.port = _free_port()
        cfg.update(HttpPort=self.port, RegisteredUsers={"gateway": self.password},
                   StorageDirectory=str(base / "storage"), IndexDirectory=str(base / "index"),
                   TemporaryDirectory=str(base / "tmp"), MaximumStorageCacheSize=0)
        cfg["Plugins"] = plugins
        if script is not None:
            (base / "plugin.py").write_text(script)
            cfg.update(PythonScript=str(base / "plugin.py"), PythonVerbose=False)
        (base / "orthanc.json").write_text(json.dumps(cfg))
        self.log = base / "orthanc.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(["/usr/sbin/Orthanc", str(base / "orthanc.json")], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env(base, importable))
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _env(base: Path, importable: bool) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(base)}
        if importable:  # the project's storage module can be imported, as under deploy/local/up
            env["PYTHONPATH"] = f"{PROJECT_ROOT}:{PROJECT_ROOT}/.venv/lib/python3.11/site-packages"
        return env

    def wait_up(self) -> bool:
        """True once Orthanc answers, False if it exited first."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/system", auth=("gateway", self.password), timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"Orthanc neither started nor exited:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stored_files(self) -> list[Path]:
        return [p for p in (self.base / "storage").rglob("*") if p.is_file()]

    def stop(self) -> None:
        stop_process(self.process, timeout=30)


@pytest.fixture
def archives():
    started: list[Archive] = []
    yield started
    for a in started:
        a.stop()


def test_the_shim_listed_after_the_python_plugin_refuses_to_start_orthanc(tmp_path, archives):
    archive = Archive(tmp_path, [PYTHON_PLUGIN, str(_shim())], script="# a plugin that does nothing\n")
    archives.append(archive)
    assert archive.wait_up() is False, "Orthanc started with the shim listed after the Python plugin"
    assert archive.process.returncode != 0
    assert "must be listed before libOrthancPython.so" in archive.log_text(), archive.log_text()[-3000:]


@pytest.mark.parametrize("with_python", [False, True], ids=["no-python-plugin", "no-storage-object"])
def test_without_the_projects_storage_every_write_is_refused(tmp_path, archives, with_python):
    plugins = [str(_shim()), PYTHON_PLUGIN] if with_python else [str(_shim())]
    script = "# publishes no storage object\n" if with_python else None
    archive = Archive(tmp_path, plugins, script=script, importable=with_python)
    archives.append(archive)
    assert archive.wait_up(), archive.log_text()[-3000:]
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    r = httpx.post(f"{archive.url}/instances", content=dicom, auth=("gateway", archive.password), timeout=60)
    assert r.status_code >= 400, r.text[:500]
    assert archive.stored_files() == []  # nothing written behind the storage's back, not even in plaintext
    listed = httpx.get(f"{archive.url}/instances", auth=("gateway", archive.password), timeout=10)
    assert listed.json() == []
    if with_python:
        assert "no storage object" in archive.log_text(), archive.log_text()[-3000:]
