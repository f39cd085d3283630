"""The encrypted object format: a streaming envelope AEAD (AES-256-GCM in segments).

This module owns the byte layout; it is written down here and nowhere else. The construction
follows Tink's streaming AEAD and age's STREAM (Hoang, Reyhanitabar, Rogaway, Vizár: "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015): each segment is an
independent AES-GCM message (NIST SP 800-38D) whose nonce carries the segment's index and a
last-segment flag, so reordering, truncation and appended segments all fail authentication.

Object layout (all integers unsigned big-endian)::

    header                      H bytes
    segment 0                   ciphertext(P_0) || tag (16)
    ...
    segment n-1                 ciphertext(P_{n-1}) || tag (16)     (the only one with last flag 1)

Header, version 1::

    offset      size  field
    0           4     magic            b"CGSE"
    4           1     version          0x01 (implies AES-256-GCM, 12-byte nonce, 16-byte tag)
    5           2     header_length    H, the total size of the header in bytes (= 21 + k + w)
    7           4     segment_size     S, plaintext bytes per segment, 16 <= S <= 16 MiB
    11          7     nonce_prefix     random per object
    18          1     key_id_length    k, 1..255
    19          k     key_id           UTF-8 id of the data key (a ``crypto_data_key`` row)
    19+k        2     wrapped_length   w, 60 in version 1
    21+k        w     wrapped_key      wrap_nonce (12) || AES-256-GCM_{data key}(content key) (32 + 16)

Keys: every object has its own random 256-bit *content key*, encrypted under the patient's *data
key* with a random 12-byte ``wrap_nonce`` and associated data::

    b"CGSE content key v1\\x00" || header[0 : 21+k] || associated_data

(everything in the header before the wrapped key itself, so the key id, nonce prefix and segment
size are bound to the content key). The data key is resolved from ``key_id`` by the caller
(:class:`compliance.crypto.keys.KeyService`), never from the object: destroying it (shredding)
makes the content key, and so the whole object, unrecoverable, and rewrapping data keys under a
new KEK never touches objects.

Segments: the plaintext is cut into segments of exactly S bytes, except the last one, which holds
1..S bytes (0 only for an empty object, which is one empty last segment; an object always has at
least one segment, so even an empty object authenticates its header). Segment ``i`` is::

    nonce_i  = nonce_prefix (7) || i as uint32 (4) || last (1: 0x01 for the final segment, else 0x00)
    aad      = header (all H bytes) || associated_data
    segment_i = AES-256-GCM_{content key}(nonce_i, P_i, aad)          (ciphertext || 16-byte tag)

``associated_data`` is the object's identity supplied by the caller (e.g. the archive's file UUID
and content type); it is not stored, so an object copied under another identity does not decrypt.
A reader knows a segment is the last one only by reaching the end of the input, and opens it with
last = 1: dropping trailing segments or appending any makes some tag fail. The content key is
unique per object, so the 2^32-segment nonce space (4 PiB at 1 MiB segments) is never shared.

Every failure to parse or authenticate raises :class:`DecryptionError` with one fixed message.
Plaintext of a segment is released only after that segment's tag verified; a failure in a later
segment therefore arrives after earlier, authentic plaintext, and callers must discard the whole
object (abort the HTTP response, delete the output). ``encrypt_stream``/``decrypt_stream`` hold
three reused segment buffers (current, one read ahead to detect the end, output), whatever the
object size; their writer receives a memoryview valid only during ``write`` (the io.RawIOBase
contract), so a writer must copy or write it out, not keep it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from compliance.crypto.interfaces import DecryptionError, KeyDestroyed, KeyProviderError

__all__ = [
    "SEGMENT_SIZE",
    "Header",
    "StreamDecryptor",
    "StreamEncryptor",
    "decrypt_stream",
    "encrypt_stream",
    "encrypted_size",
    "iter_decrypt",
    "iter_encrypt",
    "read_header",
]

MAGIC = b"CGSE"
VERSION = 1
SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 16
#: Decryption allocates about two segments, so an attacker-chosen header cannot ask for more.
MAX_SEGMENT_SIZE = 16 << 20
KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
WRAP_NONCE_SIZE = 12
WRAPPED_KEY_SIZE = WRAP_NONCE_SIZE + KEY_SIZE + TAG_SIZE
MAX_KEY_ID_SIZE = 255

_FIXED = struct.Struct(">4sBHI7sB")  # magic, version, header_length, segment_size, nonce_prefix, k
_WRAPPED_LEN = struct.Struct(">H")
_SEGMENT_SUFFIX = struct.Struct(">IB")  # index, last flag
_MAX_SEGMENTS = 1 << 32
MAX_HEADER_SIZE = _FIXED.size + MAX_KEY_ID_SIZE + _WRAPPED_LEN.size + WRAPPED_KEY_SIZE
_CONTENT_KEY_LABEL = b"CGSE content key v1\x00"

#: Given the parsed header, return the 32-byte data key named by ``header.key_id``.
UnwrapDataKey = Callable[["Header"], bytes]


class Reader(Protocol):
    """Anything with ``read``; ``readinto`` is used when present (files, BytesIO) to avoid copies."""

    def read(self, size: int = -1, /) -> bytes: ...


class Writer(Protocol):
    """Receives a view that is valid only during the call (the io.RawIOBase.write contract)."""

    def write(self, data: bytes | memoryview, /) -> object: ...


@dataclass(frozen=True)
class Header:
    version: int
    segment_size: int
    nonce_prefix: bytes
    key_id: str
    wrapped_key: bytes
    #: The exact header bytes, authenticated as part of every segment's associated data.
    raw: bytes

    @property
    def size(self) -> int:
        return len(self.raw)


def encrypted_size(plaintext_size: int, *, key_id: str, segment_size: int = SEGMENT_SIZE) -> int:
    """The exact size of the encrypted object, e.g. for a Content-Length or a storage quota."""
    segments = max(1, -(-plaintext_size // segment_size))
    return _header_size(len(key_id.encode())) + plaintext_size + segments * TAG_SIZE


def _header_size(key_id_len: int) -> int:
    return _FIXED.size + key_id_len + _WRAPPED_LEN.size + WRAPPED_KEY_SIZE


def _fail() -> DecryptionError:
    return DecryptionError()


def _build_header(
    *, data_key: bytes, key_id: str, associated_data: bytes, segment_size: int
) -> tuple[Header, bytes]:
    if len(data_key) != KEY_SIZE:
        raise ValueError("data_key must be 32 bytes (AES-256)")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be within {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}")
    kid = key_id.encode("utf-8")
    if not 1 <= len(kid) <= MAX_KEY_ID_SIZE:
        raise ValueError("key_id must be 1..255 bytes of UTF-8")
    nonce_prefix = os.urandom(NONCE_PREFIX_SIZE)
    size = _header_size(len(kid))
    prefix = (
        _FIXED.pack(MAGIC, VERSION, size, segment_size, nonce_prefix, len(kid))
        + kid
        + _WRAPPED_LEN.pack(WRAPPED_KEY_SIZE)
    )
    content_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce = os.urandom(WRAP_NONCE_SIZE)
    wrapped = wrap_nonce + AESGCM(data_key).encrypt(
        wrap_nonce, content_key, _CONTENT_KEY_LABEL + prefix + associated_data
    )
    raw = prefix + wrapped
    header = Header(VERSION, segment_size, nonce_prefix, key_id, wrapped, raw)
    return header, content_key


def _parse_fixed(first: bytes) -> int:
    """Validate the fixed part of a header and return the header's total length."""
    if len(first) < _FIXED.size:
        raise _fail()
    magic, version, size, segment_size, _, k = _FIXED.unpack_from(first)
    if (
        magic != MAGIC
        or version != VERSION
        or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE
        or k == 0
        or size != _header_size(k)
    ):
        raise _fail()
    return int(size)


def read_header(first_bytes: bytes) -> Header:
    """Parse the header at the start of ``first_bytes`` (at least the header; extra bytes ignored).

    Only the structure is checked here; authenticity is established when the first segment opens.
    Raises :class:`DecryptionError` on anything malformed or too short.
    """
    size = _parse_fixed(first_bytes)
    if len(first_bytes) < size:
        raise _fail()
    raw = bytes(first_bytes[:size])
    _, version, _, segment_size, nonce_prefix, k = _FIXED.unpack_from(raw)
    try:
        key_id = raw[_FIXED.size : _FIXED.size + k].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail() from None
    (w,) = _WRAPPED_LEN.unpack_from(raw, _FIXED.size + k)
    if w != WRAPPED_KEY_SIZE:
        raise _fail()
    wrapped = raw[_FIXED.size + k + _WRAPPED_LEN.size :]
    return Header(version, segment_size, nonce_prefix, key_id, wrapped, raw)


def _content_key(header: Header, unwrap: UnwrapDataKey, associated_data: bytes) -> bytes:
    try:
        data_key = unwrap(header)
    except (KeyDestroyed, KeyProviderError):
        # Erasure (410) and an unavailable HSM are not integrity failures; callers need them apart.
        raise
    except Exception:
        raise _fail() from None
    prefix = header.raw[: header.size - WRAPPED_KEY_SIZE]
    nonce, sealed = header.wrapped_key[:WRAP_NONCE_SIZE], header.wrapped_key[WRAP_NONCE_SIZE:]
    try:
        return AESGCM(data_key).decrypt(nonce, sealed, _CONTENT_KEY_LABEL + prefix + associated_data)
    except (InvalidTag, ValueError, TypeError):
        raise _fail() from None


class _Segments:
    """Seals or opens segment after segment under one content key."""

    __slots__ = ("_aead", "_aad", "_prefix", "index")

    def __init__(self, content_key: bytes, header: Header, associated_data: bytes) -> None:
        self._aead = AESGCM(content_key)
        self._aad = header.raw + associated_data
        self._prefix = header.nonce_prefix
        self.index = 0

    def _nonce(self, last: bool) -> bytes:
        if self.index >= _MAX_SEGMENTS:
            raise ValueError("object too large for the segment counter")
        return self._prefix + _SEGMENT_SUFFIX.pack(self.index, 1 if last else 0)

    def seal(self, plaintext: bytes | memoryview, last: bool) -> bytes:
        out = self._aead.encrypt(self._nonce(last), plaintext, self._aad)
        self.index += 1
        return out

    def seal_into(self, plaintext: memoryview, last: bool, out: memoryview) -> int:
        n = self._aead.encrypt_into(self._nonce(last), plaintext, self._aad, out[: len(plaintext) + TAG_SIZE])
        self.index += 1
        return int(n)

    def open_into(self, segment: memoryview, last: bool, out: memoryview) -> int:
        if len(segment) < TAG_SIZE or self.index >= _MAX_SEGMENTS:
            raise _fail()
        try:
            n = self._aead.decrypt_into(self._nonce(last), segment, self._aad, out[: len(segment) - TAG_SIZE])
        except InvalidTag:
            raise _fail() from None
        self.index += 1
        return int(n)

    def open(self, segment: bytes, last: bool) -> bytes:
        if len(segment) < TAG_SIZE or self.index >= _MAX_SEGMENTS:
            raise _fail()
        try:
            out = self._aead.decrypt(self._nonce(last), segment, self._aad)
        except InvalidTag:
            raise _fail() from None
        self.index += 1
        return out


def _read_up_to(reader: Reader, n: int) -> bytes:
    """Read exactly ``n`` bytes unless the input ends first (raw streams may return short reads)."""
    data = reader.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = reader.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _fill(reader: Reader, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``reader``; fewer bytes than its size only at the end of the input."""
    readinto = getattr(reader, "readinto", None)
    got = 0
    with memoryview(buffer) as view:
        while got < len(buffer):
            if readinto is not None:
                n = readinto(view[got:]) or 0
            else:
                data = reader.read(len(buffer) - got)
                n = len(data)
                view[got : got + n] = data
            if not n:
                break
            got += n
    return got


def _pump(reader: Reader, writer: Writer, *, chunk: int, out_size: int,
          transform: Callable[[memoryview, bool, memoryview], int]) -> int:
    """Pass ``reader`` through ``transform`` (a segment's seal or open) one ``chunk`` at a time into
    ``writer``; return the bytes written.

    Two reused input buffers (the current chunk and the one read ahead to learn whether the current
    one is the last): no allocation per segment on the input side. The output buffer is reused too:
    ``writer.write`` gets a view valid only during the call, the contract of io.RawIOBase.write (files,
    sockets and BytesIO all copy or write it out at once).
    """
    written = 0
    current, following = bytearray(chunk), bytearray(chunk)
    output = bytearray(out_size)
    filled = _fill(reader, current)
    with memoryview(output) as out:
        while True:
            if filled == chunk:
                ahead = _fill(reader, following)
                last = ahead == 0
            else:
                ahead, last = 0, True
            with memoryview(current) as view:
                n = transform(view[:filled], last, out)
            writer.write(out[:n])
            written += n
            if last:
                return written
            current, following, filled = following, current, ahead


def encrypt_stream(
    reader: Reader,
    writer: Writer,
    *,
    data_key: bytes,
    key_id: str,
    associated_data: bytes,
    segment_size: int = SEGMENT_SIZE,
) -> int:
    """Encrypt everything ``reader`` yields into ``writer``; return the bytes written.

    ``data_key`` is the patient's data key named by ``key_id``; a fresh content key is generated
    for this object and stored wrapped in its header.
    """
    header, content_key = _build_header(
        data_key=data_key, key_id=key_id, associated_data=associated_data, segment_size=segment_size
    )
    segments = _Segments(content_key, header, associated_data)
    writer.write(header.raw)
    return header.size + _pump(reader, writer, chunk=segment_size, out_size=segment_size + TAG_SIZE,
                               transform=segments.seal_into)


def decrypt_stream(reader: Reader, writer: Writer, *, unwrap: UnwrapDataKey, associated_data: bytes) -> int:
    """Decrypt an object from ``reader`` into ``writer``; return the plaintext bytes written.

    Each segment is written only after it authenticated. On :class:`DecryptionError` the writer
    may already hold an authentic prefix, which the caller must discard.
    """
    first = _read_up_to(reader, _FIXED.size)
    size = _parse_fixed(first)
    header = read_header(first + _read_up_to(reader, size - len(first)))
    segments = _Segments(_content_key(header, unwrap, associated_data), header, associated_data)
    return _pump(reader, writer, chunk=header.segment_size + TAG_SIZE, out_size=header.segment_size,
                 transform=segments.open_into)


class StreamEncryptor:
    """Push-style encryption: ``header``, then ``update()`` as data arrives, then ``finalize()``."""

    def __init__(
        self, *, data_key: bytes, key_id: str, associated_data: bytes, segment_size: int = SEGMENT_SIZE
    ) -> None:
        self.header, content_key = _build_header(
            data_key=data_key, key_id=key_id, associated_data=associated_data, segment_size=segment_size
        )
        self._segments = _Segments(content_key, self.header, associated_data)
        self._size = segment_size
        self._buffer = bytearray()
        self._done = False

    def update(self, data: bytes) -> list[bytes]:
        """Buffer ``data``; return the segments now complete (not the header)."""
        if self._done:
            raise ValueError("encryptor already finalized")
        self._buffer += data
        out = []
        # Strictly more than one segment buffered: the segment is known not to be the last one.
        while len(self._buffer) > self._size:
            out.append(self._segments.seal(bytes(self._buffer[: self._size]), last=False))
            del self._buffer[: self._size]
        return out

    def finalize(self) -> bytes:
        """Return the last segment."""
        if self._done:
            raise ValueError("encryptor already finalized")
        self._done = True
        last = self._segments.seal(bytes(self._buffer), last=True)
        self._buffer.clear()
        return last


class StreamDecryptor:
    """Push-style decryption of arbitrary chunks; returns plaintext only from verified segments.

    Memory is bounded by one segment plus the chunk being fed.
    """

    def __init__(self, *, unwrap: UnwrapDataKey, associated_data: bytes) -> None:
        self._unwrap = unwrap
        self._ad = associated_data
        self._buffer = bytearray()
        self._segments: _Segments | None = None
        self._chunk = 0
        self._state = "open"  # open -> done | failed
        self.header: Header | None = None

    @property
    def segment_ciphertext_size(self) -> int:
        """Bytes per full segment on the wire (0 until the header has been read)."""
        return self._chunk

    def _guard(self) -> None:
        if self._state != "open":
            raise _fail()

    def update(self, data: bytes | memoryview) -> list[bytes]:
        self._guard()
        self._buffer += data
        try:
            return self._drain()
        except BaseException:
            self._state = "failed"
            self._buffer.clear()
            raise

    def _drain(self) -> list[bytes]:
        if self._segments is None:
            if len(self._buffer) < _FIXED.size:
                return []
            size = _parse_fixed(bytes(self._buffer[: _FIXED.size]))
            if len(self._buffer) < size:
                return []
            self.header = read_header(bytes(self._buffer[:size]))
            del self._buffer[:size]
            key = _content_key(self.header, self._unwrap, self._ad)
            self._segments = _Segments(key, self.header, self._ad)
            self._chunk = self.header.segment_size + TAG_SIZE
        out = []
        while len(self._buffer) > self._chunk:
            out.append(self._segments.open(bytes(self._buffer[: self._chunk]), last=False))
            del self._buffer[: self._chunk]
        return out

    def finalize(self) -> bytes:
        """Open the final segment; the input must end here."""
        self._guard()
        self._state = "failed"
        if self._segments is None:
            raise _fail()
        plaintext = self._segments.open(bytes(self._buffer), last=True)
        self._buffer.clear()
        self._state = "done"
        return plaintext


def iter_encrypt(
    chunks: Iterable[bytes],
    *,
    data_key: bytes,
    key_id: str,
    associated_data: bytes,
    segment_size: int = SEGMENT_SIZE,
) -> Iterator[bytes]:
    """Encrypt an iterable of chunks; yields the header, then each segment."""
    encryptor = StreamEncryptor(
        data_key=data_key, key_id=key_id, associated_data=associated_data, segment_size=segment_size
    )
    yield encryptor.header.raw
    for chunk in chunks:
        yield from encryptor.update(chunk)
    yield encryptor.finalize()


def iter_decrypt(
    chunks: Iterable[bytes], *, unwrap: UnwrapDataKey, associated_data: bytes
) -> Iterator[bytes]:
    """Decrypt an iterable of ciphertext chunks, e.g. for a streaming HTTP response.

    Yields each segment's plaintext only after its tag verified; raises :class:`DecryptionError`
    mid-iteration on the first failure (the response must then be aborted, not completed).
    """
    decryptor = StreamDecryptor(unwrap=unwrap, associated_data=associated_data)
    for chunk in chunks:
        view = memoryview(chunk)
        # Feed large chunks a segment at a time so each verified segment is released at once and
        # the plaintext held back never exceeds one segment.
        start = 0
        while start < len(view):
            step = decryptor.segment_ciphertext_size or MAX_HEADER_SIZE
            for plaintext in decryptor.update(view[start : start + step]):
                if plaintext:
                    yield plaintext
            start += step
    final = decryptor.finalize()
    if final:
        yield final
