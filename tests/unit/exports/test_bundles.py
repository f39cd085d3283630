"""The bundle store (``compliance.exports.bundles``): a bundle expires and is deleted; a tampered one
does not decrypt."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from compliance.crypto.interfaces import DecryptionError
from compliance.exports.interfaces import BundleExpired
from compliance.exports.workers import run_claimed

from .builders import DANA, ROB, new_export


def test_bundle_expires(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    assert run_claimed(world.comps, req["id"]) == "ready"
    assert run_claimed(world.comps, req["id"]) is None  # a redelivered message is a no-op
    path = Path(world.service.load(req["id"]).bundle_path)
    world.clock.now += timedelta(days=2)
    with pytest.raises(BundleExpired):
        world.service.open_bundle(req["id"], ROB, destination_uri="x")
    assert world.service.expire_due() == 1
    assert not path.exists()
    assert world.service.get(req["id"], reader_id=ROB.user_id, may_read_all=False)["state"] == "expired"
    assert world.events("110106") == []


def test_tampered_bundle_does_not_decrypt(world):  # type: ignore[no-untyped-def]
    req = world.service.create(ROB, new_export())
    world.service.decide(req["id"], DANA, approve=True, comment="ok")
    run_claimed(world.comps, req["id"])
    path = Path(world.service.load(req["id"]).bundle_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DecryptionError):
        b"".join(world.service.open_bundle(req["id"], ROB, destination_uri="x").chunks)
