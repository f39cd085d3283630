"""PKCS#11 specifics on a real SoftHSM2 token: the KEK is sensitive, non-extractable, and stays there."""

from __future__ import annotations

import pytest

from compliance.crypto.interfaces import KeyProviderError

pkcs11 = pytest.importorskip("pkcs11")


@pytest.fixture
def p11(softhsm2_token: str):  # type: ignore[no-untyped-def]
    from compliance.crypto.providers.pkcs11 import Pkcs11KeyProvider, find_softhsm2_module

    from .conftest import USER_PIN

    provider = Pkcs11KeyProvider(find_softhsm2_module() or "", softhsm2_token, USER_PIN)
    yield provider
    provider.close()


def test_kek_is_sensitive_and_not_extractable(p11) -> None:  # type: ignore[no-untyped-def]
    from pkcs11 import Attribute, KeyType, ObjectClass

    kek_id = p11.create_kek()
    key = p11._session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=kek_id)
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.TOKEN] is True
    assert key[Attribute.NEVER_EXTRACTABLE] is True
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        key[Attribute.VALUE]  # noqa: B018 - the token must refuse to reveal the KEK


def test_kek_survives_a_new_session(p11, softhsm2_token: str) -> None:  # type: ignore[no-untyped-def]
    from compliance.crypto.providers.pkcs11 import Pkcs11KeyProvider, find_softhsm2_module

    from .conftest import USER_PIN

    kek = p11.create_kek()
    wrapped = p11.wrap(kek, b"d" * 32, context=b"x")
    other = Pkcs11KeyProvider(find_softhsm2_module() or "", softhsm2_token, USER_PIN)
    try:
        assert other.unwrap(kek, wrapped, context=b"x") == b"d" * 32
    finally:
        other.close()


def test_wrong_pin_is_a_provider_error(softhsm2_token: str) -> None:
    from compliance.crypto.providers.pkcs11 import Pkcs11KeyProvider, find_softhsm2_module

    with pytest.raises(KeyProviderError):
        Pkcs11KeyProvider(find_softhsm2_module() or "", softhsm2_token, "0000")
