"""The composition root (compliance/wiring.py): each service built once, on first use; the CLI and the
workers record fail-closed whatever the gateway's setting; closing releases what was built."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from compliance.audit.events import application_activity_event
from compliance.config import Settings
from compliance.db.migrate import upgrade
from compliance.errors import AuditFailure, ConfigurationError
from compliance.wiring import Role, Wiring, metadata


def settings(tmp_path, **overrides) -> Settings:
    return Settings(environment="development", stack_dir=tmp_path,
                    database_url=f"sqlite:///{tmp_path / 'compliance.db'}", **overrides)


def test_a_service_is_built_once_and_only_when_asked_for(tmp_path):
    wiring = Wiring(settings(tmp_path), Role.CLI)
    assert wiring.recorder is wiring.recorder
    assert wiring.outbox is wiring.outbox
    # the recorder needed the outbox and the engine, nothing else: no Elasticsearch client, no archive
    assert {"recorder", "outbox", "engine", "audit_source"} <= set(vars(wiring))
    assert not {"elasticsearch", "orthanc", "exports", "verifier"} & set(vars(wiring))
    wiring.close()


@pytest.mark.parametrize("role,fails", [(Role.GATEWAY, False), (Role.CLI, True), (Role.WORKER, True)])
def test_only_the_gateway_may_record_fail_open(tmp_path, role, fails):
    """With COMPLIANCE_AUDIT_FAIL_CLOSED=false the gateway lets a request through when its event cannot be
    recorded (here: the outbox's table does not exist); an operator command or an export job never does."""
    wiring = Wiring(settings(tmp_path, audit_fail_closed=False), role)
    event = application_activity_event("start", gateway_id="gw-test")
    if fails:
        with pytest.raises(AuditFailure):
            wiring.recorder.record_now(event)
    else:
        wiring.recorder.record_now(event)
    wiring.close()


def test_a_recorded_event_is_in_the_outbox_that_the_shipper_reads(tmp_path):
    config = settings(tmp_path)
    upgrade(config.effective_database_url)
    wiring = Wiring(config, Role.CLI)
    wiring.recorder.record_now(application_activity_event("start", gateway_id="gw-test"))
    assert wiring.outbox.backlog() == 1
    assert wiring.shipper is not None and wiring.outbox.total() == 1
    wiring.close()


def test_the_gateway_without_encryption_offers_no_key_operations(tmp_path):
    wiring = Wiring(settings(tmp_path, archive_encrypted=False), Role.GATEWAY)
    assert not wiring.archive_encrypted
    assert wiring.dicomweb is not None
    asyncio.run(wiring.aclose())


def test_close_releases_the_database(tmp_path):
    config = settings(tmp_path)
    upgrade(config.effective_database_url)
    wiring = Wiring(config, Role.CLI)
    wiring.recorder.record_now(application_activity_event("start", gateway_id="gw-test"))
    pool = wiring.engine.pool
    wiring.close()
    assert wiring.engine.pool is not pool  # disposed: its connections closed, a fresh pool in its place


def test_metadata_holds_every_domains_tables():
    names = set(metadata().tables)
    assert {"audit_outbox", "audit_review_item", "crypto_kek", "export_request", "archive_shred_request"} <= names


def test_the_sinks_are_those_the_settings_name(tmp_path):
    from compliance.audit.elasticsearch import ElasticsearchAuditSink
    from compliance.audit.fanout import FanOutAuditSink
    from compliance.audit.syslog import SyslogTlsAuditSink

    assert isinstance(Wiring(settings(tmp_path), Role.GATEWAY).sink, ElasticsearchAuditSink)
    with pytest.raises(ConfigurationError, match="AUDIT_SYSLOG_CA_FILE"):
        _ = Wiring(settings(tmp_path, audit_sinks="syslog"), Role.GATEWAY).sink
    ca = Path("/etc/ssl/certs/ca-certificates.crt")  # any CA bundle: the sink loads it, nothing connects
    both = Wiring(settings(tmp_path, audit_sinks="elasticsearch, syslog", audit_syslog_ca_file=ca), Role.GATEWAY)
    sink = both.sink
    assert isinstance(sink, FanOutAuditSink)
    assert isinstance(sink.sinks["elasticsearch"], ElasticsearchAuditSink)
    assert isinstance(sink.sinks["syslog"], SyslogTlsAuditSink)
    both.close()


def test_checkpoints_are_signed_only_with_a_key_and_published_only_to_elasticsearch(tmp_path):
    from compliance.audit.checkpoints import generate_key_file

    assert Wiring(settings(tmp_path), Role.GATEWAY).checkpointer is None  # development, no key: a warning
    key = tmp_path / "checkpoint.pem"
    generate_key_file(key)
    signed = Wiring(settings(tmp_path, audit_checkpoint_key_file=key), Role.GATEWAY).checkpointer
    assert signed is not None and signed._publish is not None
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    syslog_only = Wiring(settings(tmp_path, audit_checkpoint_key_file=key, audit_sinks="syslog",
                                  audit_syslog_ca_file=ca), Role.GATEWAY).checkpointer
    assert syslog_only is not None and syslog_only._publish is None
