"""Fixtures for the archive domain: the crypto domain's key providers (the local keyring and a real
SoftHSM2 token) and key service, for what the archive keeps in the key store (volume passwords)."""

from tests.unit.crypto.conftest import (
    _softhsm2_session_token,
    clock,
    key_service,
    provider,
    session_factory,
    softhsm2_dir,
    softhsm2_token,
)

__all__ = ["_softhsm2_session_token", "clock", "key_service", "provider", "session_factory", "softhsm2_dir",
           "softhsm2_token"]
