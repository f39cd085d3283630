"""A retrieve far larger than the gateway's memory budget streams through without being held."""

from __future__ import annotations

import os

import httpx
import pytest

from compliance.demo import synthetic_instance

from .conftest import Gateway, Stack

pytestmark = pytest.mark.integration

SIZE_MB = int(os.environ.get("COMPLIANCE_TEST_BIG_INSTANCE_MB", "300"))


def peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_retrieve_streams_with_bounded_gateway_memory(stack: Stack, gateway: Gateway):
    data, study, series, instance = synthetic_instance(frames=SIZE_MB * 2, patient_id="BIG-0001",
                                                      patient_name="Big^Instance")
    # Put it straight into the archive (the STOW limit of the test gateway is small on purpose).
    r = httpx.post(f"{stack.orthanc_url}/instances", content=data, auth=stack.orthanc_auth, timeout=300)
    assert r.status_code == 200, r.text
    size = len(data)
    del data
    token = stack.token("rita")
    before = peak_rss_mb(gateway.process.pid)
    received = 0
    url = f"{gateway.url}/dicom-web/studies/{study}/series/{series}/instances/{instance}"
    with httpx.stream("GET", url, timeout=300, headers={
        "Authorization": f"Bearer {token}",
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
    }) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            received += len(chunk)
    after = peak_rss_mb(gateway.process.pid)
    assert received > size  # the whole instance plus multipart framing went through
    # The gateway's peak resident memory grew by far less than the object it passed on.
    assert after - before < 64, f"gateway peak RSS grew {after - before:.0f} MiB for a {size >> 20} MiB retrieve"
    # Leave the archive as we found it (300 MB is a lot of disk for a test).
    found = httpx.post(f"{stack.orthanc_url}/tools/lookup", content=study, auth=stack.orthanc_auth, timeout=30)
    orthanc_id = found.json()[0]["ID"]
    httpx.delete(f"{stack.orthanc_url}/studies/{orthanc_id}", auth=stack.orthanc_auth, timeout=60)
