"""A retrieve far larger than the gateway's memory budget streams through without being held."""

from __future__ import annotations

import os

import httpx
import pytest

from .conftest import Gateway, Stack, delete_study, peak_rss_mb, store_big_instance

pytestmark = pytest.mark.integration

SIZE_MB = int(os.environ.get("COMPLIANCE_TEST_BIG_INSTANCE_MB", "300"))


def test_large_retrieve_streams_with_bounded_gateway_memory(stack: Stack, gateway: Gateway):
    size, study, series, instance = store_big_instance(stack, SIZE_MB, "BIG-0001", "Big^Instance")
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
    delete_study(stack, study)
