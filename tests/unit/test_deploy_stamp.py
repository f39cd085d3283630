"""deploy/local/stamp.sh: the code stamp that makes `up` and `deploy/local/gateway start` restart a server
still running old code (after a `git pull`, the demo must not keep serving what it loaded before)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from compliance.config import PROJECT_ROOT

STAMP = PROJECT_ROOT / "deploy" / "local" / "stamp.sh"


def stamp(root: Path, *extra: Path) -> str:
    out = subprocess.run(["bash", "-c", f'. "{STAMP}"; code_stamp "$@"', "stamp", str(root), *map(str, extra)],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for d in ("compliance/audit", "policies", "audit/schema", "deploy/orthanc"):
        (root / d).mkdir(parents=True)
    (root / "compliance/audit/outbox.py").write_text("X = 1\n")
    (root / "policies/rbac.yaml").write_text("version: 1\n")
    (root / "deploy/orthanc/compliance_storage_shim.c").write_text("int x;\n")
    (root / "pyproject.toml").write_text("[project]\n")
    return root


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils' sha256sum is missing")
def test_the_stamp_follows_the_code_and_the_settings(checkout: Path, tmp_path: Path):
    settings = tmp_path / "gateway.env"
    settings.write_text("COMPLIANCE_X=1\n")
    first = stamp(checkout, settings)
    assert len(first) == 16 and first == stamp(checkout, settings), "stable while nothing changes"
    (checkout / "compliance/audit/outbox.py").write_text("X = 2\n")
    second = stamp(checkout, settings)
    assert second != first, "a code change is a new stamp"
    (checkout / "compliance/audit/notes.txt").write_text("not code")
    assert stamp(checkout, settings) == second, "files the servers do not load are ignored"
    settings.write_text("COMPLIANCE_X=2\n")
    assert stamp(checkout, settings) != second, "a settings change is a new stamp"
    (checkout / "deploy/orthanc/compliance_storage_shim.c").write_text("int y;\n")
    assert stamp(checkout) != stamp(checkout, settings)


def test_the_repository_stamps_itself():
    assert len(stamp(PROJECT_ROOT)) == 16
