"""The streaming envelope format: round trips and every tampered region -> the one opaque error."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest

from compliance.crypto.interfaces import DECRYPTION_FAILED, DecryptionError, KeyDestroyed, KeyProviderError
from compliance.crypto.streaming import (
    SEGMENT_SIZE,
    TAG_SIZE,
    Header,
    StreamDecryptor,
    decrypt_stream,
    encrypt_stream,
    encrypted_size,
    iter_decrypt,
    iter_encrypt,
    read_header,
)

SEG = 64
KEY = bytes(range(32))
KEY_ID = "0b7e4c1a-data-key"
AD = b"orthanc-file-uuid:1234|application/dicom"


def unwrap(header: Header) -> bytes:
    if header.key_id != KEY_ID:
        raise LookupError(header.key_id)
    return KEY


def encrypt(plaintext: bytes, *, segment_size: int = SEG, ad: bytes = AD) -> bytes:
    out = io.BytesIO()
    written = encrypt_stream(
        io.BytesIO(plaintext), out, data_key=KEY, key_id=KEY_ID, associated_data=ad, segment_size=segment_size
    )
    assert written == len(out.getvalue())
    return out.getvalue()


def decrypt(ciphertext: bytes, *, ad: bytes = AD) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(ciphertext), out, unwrap=unwrap, associated_data=ad)
    return out.getvalue()


def decrypt_iter(ciphertext: bytes, *, ad: bytes = AD, chunk: int = 13) -> bytes:
    chunks = [ciphertext[i : i + chunk] for i in range(0, len(ciphertext), chunk)]
    return b"".join(iter_decrypt(chunks, unwrap=unwrap, associated_data=ad))


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 5 * SEG + 7])
def test_round_trip_small_segments(size: int) -> None:
    plaintext = os.urandom(size)
    ciphertext = encrypt(plaintext)
    assert len(ciphertext) == encrypted_size(size, key_id=KEY_ID, segment_size=SEG)
    assert size < 16 or plaintext not in ciphertext
    assert decrypt(ciphertext) == plaintext
    assert decrypt_iter(ciphertext) == plaintext
    assert decrypt_iter(ciphertext, chunk=1) == plaintext
    assert decrypt_iter(ciphertext, chunk=len(ciphertext) or 1) == plaintext


@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1])
def test_round_trip_default_segment_size(size: int) -> None:
    plaintext = os.urandom(size)
    ciphertext = encrypt(plaintext, segment_size=SEGMENT_SIZE)
    assert len(ciphertext) == encrypted_size(size, key_id=KEY_ID)
    assert decrypt(ciphertext) == plaintext
    assert decrypt_iter(ciphertext, chunk=65536) == plaintext


def test_round_trip_50_mb_default_segments() -> None:
    size = 50 * 1000 * 1000
    plaintext = os.urandom(size)
    ciphertext = encrypt(plaintext, segment_size=SEGMENT_SIZE)
    assert len(ciphertext) == encrypted_size(size, key_id=KEY_ID)
    assert hashlib.sha256(decrypt(ciphertext)).digest() == hashlib.sha256(plaintext).digest()


def test_iter_encrypt_matches_stream_layout_and_decrypts() -> None:
    plaintext = os.urandom(10 * SEG + 3)
    chunks = [plaintext[i : i + 7] for i in range(0, len(plaintext), 7)]
    ciphertext = b"".join(
        iter_encrypt(chunks, data_key=KEY, key_id=KEY_ID, associated_data=AD, segment_size=SEG)
    )
    assert len(ciphertext) == encrypted_size(len(plaintext), key_id=KEY_ID, segment_size=SEG)
    assert decrypt(ciphertext) == plaintext


def test_two_encryptions_of_the_same_plaintext_differ() -> None:
    plaintext = b"x" * 100
    assert encrypt(plaintext) != encrypt(plaintext)


def test_header_fields() -> None:
    ciphertext = encrypt(b"hello")
    header = read_header(ciphertext)
    assert header.version == 1
    assert header.segment_size == SEG
    assert header.key_id == KEY_ID
    assert len(header.nonce_prefix) == 7
    assert len(header.wrapped_key) == 60
    assert ciphertext.startswith(b"CGSE\x01")
    assert header.size == 21 + len(KEY_ID) + 60


class _TrickleRaw(io.RawIOBase):
    """A raw stream returning at most 5 bytes per call, like a socket or a pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 5))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _TrickleReadOnly:
    """A reader with ``read`` only, also short."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 5) if n >= 0 else 5)


@pytest.mark.parametrize("reader", [_TrickleRaw, _TrickleReadOnly])
def test_short_reads(reader: Callable[[bytes], Any]) -> None:
    plaintext = os.urandom(3 * SEG + 1)
    out = io.BytesIO()
    encrypt_stream(reader(plaintext), out, data_key=KEY, key_id=KEY_ID, associated_data=AD, segment_size=SEG)
    result = io.BytesIO()
    decrypt_stream(reader(out.getvalue()), result, unwrap=unwrap, associated_data=AD)
    assert result.getvalue() == plaintext


# --- tampering ------------------------------------------------------------------------------------

PLAINTEXT = bytes(i % 251 for i in range(4 * SEG + 10))  # 4 full segments + a partial one
HEADER_SIZE = 21 + len(KEY_ID) + 60
SEG_CT = SEG + TAG_SIZE


def segments_of(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    body = ciphertext[HEADER_SIZE:]
    return ciphertext[:HEADER_SIZE], [body[i : i + SEG_CT] for i in range(0, len(body), SEG_CT)]


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _swap(ct: bytes) -> bytes:
    header, segs = segments_of(ct)
    segs[1], segs[2] = segs[2], segs[1]
    return header + b"".join(segs)


def _truncate_at_boundary(ct: bytes) -> bytes:
    header, segs = segments_of(ct)
    return header + b"".join(segs[:-2])  # the last full segment is now the final one


def _drop_final_partial(ct: bytes) -> bytes:
    header, segs = segments_of(ct)
    assert len(segs[-1]) < SEG_CT
    return header + b"".join(segs[:-1])


def _append_segment(ct: bytes) -> bytes:
    header, segs = segments_of(ct)
    return ct + segs[1]


def _append_other_objects_last_segment(ct: bytes) -> bytes:
    return ct + segments_of(encrypt(PLAINTEXT))[1][-1]


def _replace_header_with_another_objects(ct: bytes) -> bytes:
    return encrypt(PLAINTEXT)[:HEADER_SIZE] + ct[HEADER_SIZE:]


def _key_id(ct: bytes) -> bytes:
    return flip(ct, 19)  # first byte of the key id: unknown key id


_TAMPERS: dict[str, Callable[[bytes], bytes]] = {
    "magic": lambda ct: flip(ct, 0),
    "version byte": lambda ct: flip(ct, 4),
    "header length": lambda ct: flip(ct, 6),
    "segment size": lambda ct: struct.pack(">4sBHI", b"CGSE", 1, HEADER_SIZE, SEG * 2) + ct[11:],
    "nonce prefix": lambda ct: flip(ct, 11),
    "key id length": lambda ct: flip(ct, 18),
    "key id": _key_id,
    "wrapped length": lambda ct: flip(ct, 19 + len(KEY_ID) + 1),
    "wrapped key nonce": lambda ct: flip(ct, 21 + len(KEY_ID)),
    "wrapped key ciphertext": lambda ct: flip(ct, 21 + len(KEY_ID) + 20),
    "wrapped key tag": lambda ct: flip(ct, HEADER_SIZE - 1),
    "header from another object": _replace_header_with_another_objects,
    "segment 0 byte": lambda ct: flip(ct, HEADER_SIZE),
    "segment 0 tag": lambda ct: flip(ct, HEADER_SIZE + SEG_CT - 1),
    "middle segment byte": lambda ct: flip(ct, HEADER_SIZE + 2 * SEG_CT + 5),
    "last segment byte": lambda ct: flip(ct, len(ct) - TAG_SIZE - 1),
    "last segment tag": lambda ct: flip(ct, len(ct) - 1),
    "two segments swapped": _swap,
    "truncated at a segment boundary": _truncate_at_boundary,
    "final partial segment dropped": _drop_final_partial,
    "truncated inside a segment": lambda ct: ct[: HEADER_SIZE + SEG_CT + 10],
    "truncated inside the header": lambda ct: ct[: HEADER_SIZE - 1],
    "header only": lambda ct: ct[:HEADER_SIZE],
    "empty input": lambda ct: b"",
    "extra segment appended": _append_segment,
    "another object's last segment appended": _append_other_objects_last_segment,
    "one byte appended": lambda ct: ct + b"\x00",
}


@pytest.mark.parametrize("tamper", list(_TAMPERS), ids=list(_TAMPERS))
def test_tampering_gives_the_opaque_error(tamper: str) -> None:
    ciphertext = encrypt(PLAINTEXT)
    assert decrypt(ciphertext) == PLAINTEXT
    tampered = _TAMPERS[tamper](ciphertext)
    assert tampered != ciphertext
    for attempt in (decrypt, decrypt_iter):
        with pytest.raises(DecryptionError) as info:
            attempt(tampered)
        assert type(info.value) is DecryptionError
        assert str(info.value) == DECRYPTION_FAILED
        assert info.value.detail == {}
        assert info.value.__cause__ is None


def test_wrong_associated_data() -> None:
    ciphertext = encrypt(PLAINTEXT)
    for attempt in (decrypt, decrypt_iter):
        with pytest.raises(DecryptionError, match=f"^{DECRYPTION_FAILED}$"):
            attempt(ciphertext, ad=AD + b"x")


def test_wrong_data_key() -> None:
    ciphertext = encrypt(PLAINTEXT)
    with pytest.raises(DecryptionError, match=f"^{DECRYPTION_FAILED}$"):
        decrypt_stream(io.BytesIO(ciphertext), io.BytesIO(), unwrap=lambda h: bytes(32), associated_data=AD)


def test_empty_object_tampered_tag() -> None:
    ciphertext = encrypt(b"")
    with pytest.raises(DecryptionError):
        decrypt(flip(ciphertext, len(ciphertext) - 1))


def test_no_unauthenticated_plaintext_is_released() -> None:
    ciphertext = encrypt(PLAINTEXT)
    tampered = flip(ciphertext, HEADER_SIZE + 2 * SEG_CT + 5)  # segment 2 is bad
    released: list[bytes] = []
    with pytest.raises(DecryptionError):
        for part in iter_decrypt([tampered], unwrap=unwrap, associated_data=AD):
            released.append(part)
    assert b"".join(released) == PLAINTEXT[: 2 * SEG]  # segments 0 and 1 only, both authentic

    decryptor = StreamDecryptor(unwrap=unwrap, associated_data=AD)
    # Exactly one full segment buffered: it may be the last, so nothing is released yet.
    assert decryptor.update(ciphertext[: HEADER_SIZE + SEG_CT]) == []


def test_decryptor_refuses_use_after_failure() -> None:
    decryptor = StreamDecryptor(unwrap=unwrap, associated_data=AD)
    with pytest.raises(DecryptionError):
        decryptor.update(b"XXXX" + b"\x00" * 100)
    with pytest.raises(DecryptionError):
        decryptor.finalize()


@pytest.mark.parametrize("error", [KeyDestroyed("erased"), KeyProviderError("hsm down")])
def test_key_errors_are_not_masked(error: Exception) -> None:
    def failing(header: Header) -> bytes:
        raise error

    with pytest.raises(type(error)):
        decrypt_stream(io.BytesIO(encrypt(b"abc")), io.BytesIO(), unwrap=failing, associated_data=AD)


def test_bounded_memory_rejects_oversized_segment_header() -> None:
    ciphertext = encrypt(PLAINTEXT)
    huge = struct.pack(">4sBHI", b"CGSE", 1, HEADER_SIZE, 1 << 30) + ciphertext[11:]
    with pytest.raises(DecryptionError):
        decrypt(huge)


@pytest.mark.parametrize("segment_size", [0, 15, 17 << 20])
def test_encrypt_refuses_bad_segment_size(segment_size: int) -> None:
    with pytest.raises(ValueError):
        encrypt(b"a", segment_size=segment_size)
