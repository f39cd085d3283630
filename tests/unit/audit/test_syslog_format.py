"""RFC 5424 messages and RFC 5425 framing of the syslog TLS sink (pure functions)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from compliance.audit.atna import AuditSource
from compliance.audit.codes import Outcome
from compliance.audit.documents import to_document
from compliance.audit.events import application_activity_event, authentication_event
from compliance.audit.message import UserRef
from compliance.audit.syslog import BOM, MSGID, frame, rfc5424_message

SOURCE = AuditSource(source_id="compliance-gateway", enterprise_site_id="demo-hospital")
HEADER = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[[^]]*\]) ")


def test_message_has_the_rfc5424_header_the_atna_msgid_and_the_xml():
    doc = to_document(application_activity_event("start", gateway_id="gw",
                                                 occurred_at=datetime(2026, 11, 28, 12, 0, 1, 250000, tzinfo=UTC)),
                      SOURCE)
    msg = rfc5424_message(doc, hostname="node 1", app_name="compliance-gateway", procid="42")
    m = HEADER.match(msg)
    assert m, msg[:120]
    pri, ts, host, app, procid, msgid, sd = m.groups()
    assert sd == f'[compliance@32473 uuid="{doc["event.uuid"]}"]'.encode()
    assert int(pri) == 10 * 8 + 5  # facility 10 security/authorization, severity notice
    assert ts == b"2026-11-28T12:00:01.250Z"
    assert host == b"node_1"  # no spaces in HOSTNAME
    assert (app, procid, msgid) == (b"compliance-gateway", b"42", MSGID.encode())
    body = msg[m.end():]
    assert body.startswith(BOM)
    assert body[len(BOM):].decode("utf-8") == doc["atna.xml"]
    assert b"<AuditMessage" in body


def test_a_failed_authentication_is_a_warning():
    doc = to_document(authentication_event(user=UserRef(user_id="u", username="alice", source_address="127.0.0.1"),
                                           gateway_id="gw", outcome=Outcome.SERIOUS_FAILURE), SOURCE)
    msg = rfc5424_message(doc, hostname="h", app_name="a", procid="1")
    assert msg.startswith(b"<84>1 ")
    assert b"110114" in msg


def test_octet_counting_frames_count_bytes_not_characters():
    message = "<85>1 - - - - IHE+RFC-3881 - \u00e9".encode()
    framed = frame(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(message) == len(rest)
    assert rest == message


def test_structured_data_carries_the_event_uuid_and_chain_link():
    doc = to_document(application_activity_event("stop", gateway_id="gw"), SOURCE)
    doc.update({"chain.seq": 7, "chain.hash": "ab" * 32})
    msg = rfc5424_message(doc, hostname="h", app_name="a", procid="1")
    sd = HEADER.match(msg).group(7).decode()
    assert sd == f'[compliance@32473 uuid="{doc["event.uuid"]}" seq="7" hash="{"ab" * 32}"]'


def test_structured_data_values_are_escaped():
    from compliance.audit.syslog import structured_data

    # RFC 5424 6.3.3: '"' -> '\"', ']' -> '\]', '\' -> '\\'
    assert structured_data({"event.uuid": 'a"b]c\\'}) == r'[compliance@32473 uuid="a\"b\]c\\"]'
    assert structured_data({}) == "-"
