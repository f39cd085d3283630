"""Issue 12, item 2: nothing the local stack writes is readable by another local user.

Keycloak's database holds the realm's private signing keys (whoever reads it can mint an admin token),
the gateway's audit outbox and its WAL hold patient names and ids, the logs say who did what. Everything
under the stack directory is owner-only (directories 0700, files 0600); group bits are allowed only for the
stack's dedicated group (the system user ``compliance-stack``'s own group, which nobody else belongs to),
which is how a file one account writes is read by another (Orthanc's configuration: written by root, read
by the stack user). ``deploy/local/up`` repairs a stack whose permissions are loose and says so.

The walk crosses into the encrypted volume's plaintext mount (what the servers see) and reads modes only.
One documented exception: gocryptfs creates the ``gocryptfs.diriv`` file of every ciphertext directory
0444 (a random per-directory IV for file-name encryption, not secret) inside that directory, which is 0700.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from compliance.config import PROJECT_ROOT, load_settings

pytestmark = pytest.mark.integration

STACK_USER = os.environ.get("COMPLIANCE_STACK_USER", "compliance-stack")
#: The encrypted volume's ciphertext directory (deploy/local/lib.sh: PHI_CIPHER).
CIPHER_DIR = "phi-encrypted"


def _dedicated_group(gid: int) -> bool:
    """A group only the stack user (or root) is in: its group bits give nobody else access."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    accounts = set(group.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid}
    return accounts <= {STACK_USER, "root"}


def loose_paths(root: Path) -> list[str]:
    """Every file or directory under ``root`` another local user can read, write or enter, with why."""
    found: list[str] = []
    dedicated: dict[int, bool] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: found.append(f"{e.filename}: {e}")):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except OSError as exc:
                found.append(f"{path}: {exc}")
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            rel = path.relative_to(root).as_posix()
            if name == "gocryptfs.diriv" and rel.startswith(CIPHER_DIR + "/"):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if st.st_gid not in dedicated:
                dedicated[st.st_gid] = _dedicated_group(st.st_gid)
            why = []
            if mode & 0o007:
                why.append("others")
            if mode & 0o070 and not dedicated[st.st_gid]:
                why.append(f"group {_group_name(st.st_gid)}")
            if why:
                found.append(f"{rel} ({mode:04o} {_user_name(st.st_uid)}:{_group_name(st.st_gid)}: {', '.join(why)})")
    return found


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def test_no_file_of_the_stack_is_readable_by_another_user():
    stack = load_settings().stack_dir
    assert stack.is_dir(), f"no stack at {stack}: run deploy/local/up"
    loose = sorted(loose_paths(stack), key=lambda p: (p.count("/"), p))
    if loose:
        pytest.fail(f"{len(loose)} paths under {stack} are open to other local users (shallowest first):\n"
                    + "\n".join(loose[:80]) + ("\n..." if len(loose) > 80 else ""), pytrace=False)
    mode = stat.S_IMODE(stack.stat().st_mode)
    assert mode & 0o007 == 0, f"the stack directory itself is {mode:04o}"


def _pid(stack: Path, component: str) -> str:
    return (stack / "run" / f"{component}.pid").read_text().strip()


def test_up_repairs_loosened_permissions_and_says_so():
    """Loosen a few files and directories (Keycloak's database, a log, the Orthanc index on the volume),
    run ``deploy/local/up`` on the healthy stack: it names each one it repaired, the walk is clean again,
    and no server was restarted (Orthanc is not checked: it restarts whenever the checkout's code
    changed, which is unrelated to permissions)."""
    settings = load_settings()
    stack = settings.stack_dir
    h2 = next((stack / "keycloak").glob("keycloak-*/data/h2/keycloakdb.mv.db"), None)
    assert h2 is not None, "Keycloak's H2 database not found: is the stack up?"
    targets: list[tuple[Path, int]] = [(h2, 0o644), (h2.parent, 0o755), (stack / "logs" / "orthanc.log", 0o644)]
    index = stack / "phi" / "orthanc" / "index" / "index"
    if index.exists():
        targets.append((index, 0o640))
    pids = {c: _pid(stack, c) for c in ("keycloak", "elasticsearch", "postgres")}
    try:
        for path, mode in targets:
            os.chmod(path, mode)
        assert loose_paths(stack), "the loosened files are not seen by the walk"
        run = subprocess.run([str(PROJECT_ROOT / "deploy/local/up")], capture_output=True, text=True, timeout=900)
    finally:
        for path, _ in targets:  # whatever happened, leave nothing open
            os.chmod(path, stat.S_IMODE(path.stat().st_mode) & 0o700)
    assert run.returncode == 0, run.stderr[-4000:]
    repaired = [line for line in run.stderr.splitlines() if re.search(r"permissions", line)]
    assert repaired, f"up did not say it repaired permissions:\n{run.stderr[-4000:]}"
    said = "\n".join(repaired)
    for path, _ in targets:
        assert path.relative_to(stack).as_posix() in said, f"{path} is not named in:\n{said}"
    assert loose_paths(stack) == []
    for path, _ in targets:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert {c: _pid(stack, c) for c in pids} == pids, f"up restarted a server:\n{run.stderr[-4000:]}"
    # and they still answer
    httpx.get(f"{settings.elasticsearch_url}/_cluster/health", timeout=10).raise_for_status()
