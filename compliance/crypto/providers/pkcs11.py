"""``pkcs11`` key provider: KEKs are AES-256 keys inside a PKCS#11 token (an HSM, or SoftHSM2).

Each KEK is generated on the token as a persistent private object with ``CKA_SENSITIVE=true`` and
``CKA_EXTRACTABLE=false`` (checked after generation; a token that ignores the template is
refused), labelled and identified by its KEK id. The KEK never leaves the token: a data key is
wrapped by sending it into the token for ``C_Encrypt`` with ``CKM_AES_GCM``, and unwrapped with
``C_Decrypt``::

    wrapped = 0x01 || nonce (12) || AES-256-GCM_{KEK}(nonce, data key, aad) (32 + 16)
    aad     = b"compliance pkcs11 wrap v1\\x00" || kek id || 0x00 || context

GCM rather than ``C_WrapKey`` with ``CKM_AES_KEY_WRAP_PAD`` (which SoftHSM2 also supports) because
GCM binds the associated data (the data key's id), which RFC 5649 cannot, and because the data key
is used by this process for bulk AES-GCM anyway, so it would have to be extractable after
``C_UnwrapKey``. The nonce is drawn by the caller; tokens that insist on generating GCM IVs
themselves (some FIPS-mode HSMs) would need ``CKM_AES_KEY_WRAP_PAD`` instead.

One logged-in session is kept per provider and serialised with a lock; PKCS#11 sessions are not
safe to share between threads mid-operation.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11exc
from pkcs11.mechanisms import GCMParams

from compliance.crypto.interfaces import DecryptionError, KeyProviderError

__all__ = ["DEFAULT_SOFTHSM2_MODULES", "Pkcs11KeyProvider", "find_softhsm2_module"]

DEFAULT_SOFTHSM2_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

_WRAP_VERSION = b"\x01"
_AAD_LABEL = b"compliance pkcs11 wrap v1\x00"
_NONCE = 12
_KEK_PREFIX = "p11-"

# Errors that mean "these bytes do not authenticate under this key", as opposed to a failing token.
_INTEGRITY_ERRORS: tuple[type[Exception], ...] = (
    p11exc.EncryptedDataInvalid,
    p11exc.EncryptedDataLenRange,
    p11exc.GeneralError,  # SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR
)


def find_softhsm2_module() -> str | None:
    for candidate in DEFAULT_SOFTHSM2_MODULES:
        if Path(candidate).is_file():
            return candidate
    return None


class Pkcs11KeyProvider:
    name = "pkcs11"

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self.module_path = module_path
        self.token_label = token_label
        try:
            self._lib = pkcs11.lib(module_path)
            self._token = self._lib.get_token(token_label=token_label)
            try:
                self._session = self._token.open(rw=True, user_pin=pin)
            except p11exc.UserAlreadyLoggedIn:
                # PKCS#11 login state is per application and token: another session of this
                # process is logged in, and a new session shares that login.
                self._session = self._token.open(rw=True)
        except (p11exc.PKCS11Error, RuntimeError, OSError) as exc:
            raise KeyProviderError(
                f"cannot open PKCS#11 token {token_label!r} with module {module_path}"
            ) from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._session.close()

    def _find(self, kek_id: str) -> Any:
        try:
            return self._session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=kek_id, id=kek_id.encode()
            )
        except p11exc.NoSuchKey:
            raise KeyProviderError(f"KEK {kek_id} is not on the token") from None
        except p11exc.MultipleObjectsReturned:
            raise KeyProviderError(f"KEK {kek_id} is ambiguous on the token") from None
        except p11exc.PKCS11Error as exc:
            raise KeyProviderError("the PKCS#11 token failed") from exc

    def kek_ids(self) -> list[str]:
        with self._lock:
            try:
                keys = self._session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
                )
                labels = [key[Attribute.LABEL] for key in keys]
            except p11exc.PKCS11Error as exc:
                raise KeyProviderError("the PKCS#11 token failed") from exc
        return sorted(label for label in labels if label and label.startswith(_KEK_PREFIX))

    def create_kek(self) -> str:
        kek_id = f"{_KEK_PREFIX}{uuid.uuid4().hex}"
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        }
        with self._lock:
            try:
                key = self._session.generate_key(
                    KeyType.AES, 256, label=kek_id, id=kek_id.encode(), store=True, template=template
                )
                if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
                    key.destroy()
                    raise KeyProviderError("the token did not make the KEK sensitive and non-extractable")
            except p11exc.PKCS11Error as exc:
                raise KeyProviderError("the PKCS#11 token could not generate a KEK") from exc
        return kek_id

    def wrap(self, kek_id: str, data_key: bytes, *, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        params = GCMParams(nonce, _AAD_LABEL + kek_id.encode() + b"\x00" + context, 128)
        with self._lock:
            key = self._find(kek_id)
            try:
                sealed = key.encrypt(data_key, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            except p11exc.PKCS11Error as exc:
                raise KeyProviderError("the PKCS#11 token could not wrap the data key") from exc
        return _WRAP_VERSION + nonce + bytes(sealed)

    def unwrap(self, kek_id: str, wrapped: bytes, *, context: bytes) -> bytes:
        if len(wrapped) < 1 + _NONCE + 16 or wrapped[:1] != _WRAP_VERSION:
            raise DecryptionError()
        params = GCMParams(wrapped[1 : 1 + _NONCE], _AAD_LABEL + kek_id.encode() + b"\x00" + context, 128)
        with self._lock:
            key = self._find(kek_id)
            try:
                return bytes(
                    key.decrypt(wrapped[1 + _NONCE :], mechanism=Mechanism.AES_GCM, mechanism_param=params)
                )
            except _INTEGRITY_ERRORS:
                raise DecryptionError() from None
            except p11exc.PKCS11Error as exc:
                raise KeyProviderError("the PKCS#11 token could not unwrap the data key") from exc

    def destroy_kek(self, kek_id: str) -> None:
        with self._lock:
            key = self._find(kek_id)
            try:
                key.destroy()
            except p11exc.PKCS11Error as exc:
                raise KeyProviderError(f"the PKCS#11 token could not destroy KEK {kek_id}") from exc

    def describe(self) -> Mapping[str, Any]:
        return {
            "provider": self.name,
            "module": self.module_path,
            "token": self.token_label,
            "kek_ids": self.kek_ids(),
        }
