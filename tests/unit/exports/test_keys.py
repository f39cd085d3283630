"""Per-project keys and the pseudonym map (``compliance.exports.keys``)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance.crypto.interfaces import DecryptionError, KeyStateConflict
from compliance.exports.interfaces import DisclosedPatient, DisclosedStudy
from compliance.exports.keys import ProviderPseudonymSecretSource, open_disclosure, seal_disclosure
from compliance.exports.models import ExportProjectKey, ExportPseudonym


def test_pseudonym_secret_from_the_key_provider(world):  # type: ignore[no-untyped-def]
    source = ProviderPseudonymSecretSource(world.keys)
    a = source.secret_for_project("alpha")
    assert len(a) == 32 and a == source.secret_for_project("alpha") != source.secret_for_project("beta")

    with world.sessions() as s:
        stored = s.get(ExportProjectKey, ("alpha", "pseudonym")).wrapped_key
    assert a not in stored


def test_map_is_encrypted_at_rest(world):  # type: ignore[no-untyped-def]
    world.pmap.record("alpha", {("patient_id", "MRN-123456", "PXABC")})
    assert world.pmap.record("alpha", {("patient_id", "MRN-123456", "PXABC")}) == 0

    with world.sessions() as s:
        row = s.get(ExportPseudonym, ("alpha", "patient_id", "PXABC"))
        assert b"MRN-123456" not in row.original_sealed
    assert world.pmap.lookup("alpha", "patient_id", "PXABC") == "MRN-123456"
    assert world.pmap.lookup("other", "patient_id", "PXABC") is None


def test_keys_are_made_for_registered_projects_only(world):  # type: ignore[no-untyped-def]
    with pytest.raises(KeyStateConflict, match="not registered"):
        world.keys.key("someone-elses", "pseudonym")
    assert len(world.keys.key("lung-study", "pseudonym")) == 32


def test_a_sealed_value_is_nonce_ciphertext_tag_under_the_map_key(world):  # type: ignore[no-untyped-def]
    """The layout compliance.crypto.aead seals with (the bytes the map held before it used that module)."""
    world.pmap.record("alpha", {("patient_id", "MRN-123456", "PXABC")})
    with world.sessions() as s:
        sealed = s.get(ExportPseudonym, ("alpha", "patient_id", "PXABC")).original_sealed
    assert len(sealed) == 12 + len(b"MRN-123456") + 16
    aad = b"export pseudonym map v1\x00" + b"\x00".join((b"alpha", b"patient_id", b"PXABC"))
    nonce, body = sealed[:12], sealed[12:]
    assert AESGCM(world.keys.key("alpha", "map")).decrypt(nonce, body, aad) == b"MRN-123456"


def test_a_disclosure_opens_only_for_its_own_request(world):  # type: ignore[no-untyped-def]
    patients = [DisclosedPatient(id="MRN-1", name="DOE^JANE")]
    studies = [DisclosedStudy(uid="1.2.3", sop_classes={"1.2.840.10008.5.1.4.1.1.2": 2})]
    sealed = seal_disclosure(world.keys, "alpha", "request-1", patients, studies)
    assert b"MRN-1" not in sealed
    assert open_disclosure(world.keys, "alpha", "request-1", sealed) == {"patients": patients, "studies": studies}
    with pytest.raises(DecryptionError):
        open_disclosure(world.keys, "alpha", "request-2", sealed)
    with pytest.raises(DecryptionError):
        open_disclosure(world.keys, "beta", "request-1", sealed)
