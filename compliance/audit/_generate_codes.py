"""Generate the project's table of audit message codes from the standard's schema.

Run from the repository root::

    .venv/bin/python -m compliance.audit._generate_codes \
        ../shared/standards/dicom-audit-message-2024d.xsd compliance/audit/data/audit_codes_2024d.json

The input is the DICOM PS3.15 A.5.1 audit message schema, edition 2024d, as rendered by the Open
eHealth Integration Platform project (file ``dicom2024d.xsd``, Apache License 2.0). The schema holds
the enumerated attributes of the message (EventActionCode, EventOutcomeIndicator,
NetworkAccessPointTypeCode, AuditSourceTypeCode, ParticipantObjectTypeCode,
ParticipantObjectTypeCodeRole, ParticipantObjectDataLifeCycle) with their meanings: those are read
from it. It holds no coded values (its ``csd-code``/``displayName`` attributes are free tokens), so the
code tables the gateway uses (PS3.16 CID 400-405 and the RFC 3881 object ID type codes that PS3.15
A.5.1.2.4 lists) are kept below as data, each with its source named, and written to the same file.
The output is never edited by hand: it records the edition, the generator and the SHA-256 of the
schema. :mod:`compliance.audit.codes` reads it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from lxml import etree

EDITION = "2024d"
SCHEMA_SOURCE = "Open eHealth Integration Platform dicom2024d.xsd (Apache-2.0)"
_XSD_NAMESPACE = "{http://www.w3.org/2001/XMLSchema}"

#: Table name -> (source, scheme, ((code, meaning), ...)). Not in the schema: PS3.16 2024d and
#: RFC 3881 (as PS3.15 A.5.1.2.4 lists its values), in the order of the standard.
CODED_VALUES: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "CID 400": ("DICOM PS3.16 2024d CID 400 Audit Event ID", "DCM", (
        ("110100", "Application Activity"),
        ("110101", "Audit Log Used"),
        ("110102", "Begin Transferring DICOM Instances"),
        ("110103", "DICOM Instances Accessed"),
        ("110104", "DICOM Instances Transferred"),
        ("110105", "DICOM Study Deleted"),
        ("110106", "Export"),
        ("110107", "Import"),
        ("110108", "Network Entry"),
        ("110109", "Order Record"),
        ("110110", "Patient Record"),
        ("110111", "Procedure Record"),
        ("110112", "Query"),
        ("110113", "Security Alert"),
        ("110114", "User Authentication"),
    )),
    "CID 401": ("DICOM PS3.16 2024d CID 401 Audit Event Type Code (CID 403 Security Alert Type Code "
                "is the same list)", "DCM", (
        ("110120", "Application Start"),
        ("110121", "Application Stop"),
        ("110122", "Login"),
        ("110123", "Logout"),
        ("110124", "Attach"),
        ("110125", "Detach"),
        ("110126", "Node Authentication"),
        ("110127", "Emergency Override Started"),
        ("110128", "Network Configuration"),
        ("110129", "Security Configuration"),
        ("110130", "Hardware Configuration"),
        ("110131", "Software Configuration"),
        ("110132", "Use of Restricted Function"),
        ("110133", "Audit Recording Stopped"),
        ("110134", "Audit Recording Started"),
        ("110135", "Object Security Attributes Changed"),
        ("110136", "Security Roles Changed"),
        ("110137", "User Security Attributes Changed"),
        ("110138", "Emergency Override Stopped"),
        ("110139", "Remote Service Operation Started"),
        ("110140", "Remote Service Operation Stopped"),
        ("110141", "Local Service Operation Started"),
        ("110142", "Local Service Operation Stopped"),
        ("110143", "Authentication Decision"),
        ("110144", "Authorization Decision"),
        ("110145", "Session start"),
        ("110146", "Session stop"),
        ("110147", "Access Control Decision"),
    )),
    "CID 402": ("DICOM PS3.16 2024d CID 402 Audit Active Participant Role ID Code", "DCM", (
        ("110150", "Application"),
        ("110151", "Application Launcher"),
        ("110152", "Destination Role ID"),
        ("110153", "Source Role ID"),
        ("110154", "Destination Media"),
        ("110155", "Source Media"),
    )),
    "RFC 3881": ("RFC 3881 ParticipantObjectIDTypeCode values, as PS3.15 A.5.1.2.4 lists them (the two "
                 "the gateway uses)", "RFC-3881", (
        ("2", "Patient Number"),
        ("12", "URI"),
    )),
    "CID 404": ("DICOM PS3.16 2024d CID 404 Audit Participant Object ID Type Code (the codes the "
                "gateway uses)", "DCM", (
        ("110180", "Study Instance UID"),
        ("110181", "SOP Class UID"),
        ("110182", "Node ID"),
    )),
    "CID 405": ("DICOM PS3.16 2024d CID 405 Media Type Code (the codes a network gateway uses)", "DCM", (
        ("110030", "USB Disk Emulation"),
        ("110031", "Email"),
        ("110032", "CD"),
        ("110033", "DVD"),
        ("110037", "URI"),
    )),
}


def schema_enumerations(schema: bytes) -> dict[str, list[dict[str, str]]]:
    """Every attribute of the schema whose values are enumerated: name -> [{value, meaning}]."""
    root = etree.fromstring(schema, etree.XMLParser(resolve_entities=False, no_network=True))
    found: dict[str, list[dict[str, str]]] = {}
    for attribute in root.iter(f"{_XSD_NAMESPACE}attribute"):
        values = [
            {"value": str(enumeration.attrib["value"]),
             "meaning": " ".join("".join(enumeration.itertext()).split())}
            for enumeration in attribute.iter(f"{_XSD_NAMESPACE}enumeration")
        ]
        if values:
            name = str(attribute.attrib["name"])
            if name == "csd-code":  # AuditSourceTypeCode's code, in attribute group AuditSourceTypeCodeContent
                group = next(attribute.iterancestors(f"{_XSD_NAMESPACE}attributeGroup"))
                name = str(group.attrib["name"]).removesuffix("Content")
            found[name] = values
    return found


def generate(schema: bytes) -> dict[str, object]:
    return {
        "standard": "DICOM PS3.15 A.5.1 audit message enumerations and the PS3.16 audit code tables",
        "edition": EDITION,
        "schema_source": SCHEMA_SOURCE,
        "schema_sha256": hashlib.sha256(schema).hexdigest(),
        "generator": "compliance/audit/_generate_codes.py",
        "enumerations": schema_enumerations(schema),
        "coded_values": {
            name: {"source": source, "scheme": scheme,
                   "codes": [{"code": code, "meaning": meaning} for code, meaning in codes]}
            for name, (source, scheme, codes) in CODED_VALUES.items()
        },
    }


def main(argv: list[str]) -> int:
    src, dst = Path(argv[1]), Path(argv[2])
    schema = src.read_bytes()
    table = generate(schema)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"{dst}: {len(schema_enumerations(schema))} enumerations, "
          f"{len(CODED_VALUES)} code tables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
