"""The worlds the export tests run in (:mod:`.builders`): a bundle world, one whose approvals go to a
recording queue, and one that pushes to a recording research archive one instance a batch."""

from __future__ import annotations

import pytest

from compliance.exports.destinations import DestinationRegistry

from .builders import DANA, PACS, ROB, Queue, RecordingStow, build_world, new_export


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    built, engine = build_world(tmp_path)
    yield built
    engine.dispose()


@pytest.fixture
def queued_world(tmp_path):  # type: ignore[no-untyped-def]
    queue = Queue()
    built, engine = build_world(tmp_path, queue=queue)
    built.queue = queue
    yield built
    engine.dispose()


@pytest.fixture
def pushworld(tmp_path):  # type: ignore[no-untyped-def]
    stow = RecordingStow()
    world, engine = build_world(tmp_path, destinations=DestinationRegistry([PACS]),
                                stow_client_factory=lambda dest: stow, stow_batch_instances=1)

    def approved() -> str:
        req = world.service.create(ROB, new_export(destination={"kind": "dicomweb", "name": "research-pacs"}))
        world.service.decide(req["id"], DANA, approve=True, comment="IRB approved")
        return req["id"]

    world.stow = stow
    world.approved = approved
    yield world
    engine.dispose()
