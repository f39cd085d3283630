"""A write-only file that encrypts what is written to it with the streaming AEAD.

For writers that want a file object (``zipfile``) and must leave no plaintext on disk: each write
goes through :class:`compliance.crypto.streaming.StreamEncryptor`, only ciphertext (the header, then
the segments) reaches ``out``, and the sha256 and size of the plaintext are kept, so the writer can
record what the reader will get after decryption.
"""

from __future__ import annotations

import hashlib
import io

from compliance.crypto.streaming import StreamEncryptor


class EncryptingFile:
    """A write-only, non-seekable file for ``zipfile``: plaintext in, ciphertext to ``out``, sha256 kept."""

    def __init__(self, out: io.BufferedWriter, encryptor: StreamEncryptor) -> None:
        self._out = out
        self._encryptor = encryptor
        self._sha256 = hashlib.sha256()
        self._position = 0
        out.write(encryptor.header.raw)

    def write(self, data: bytes) -> int:
        data = bytes(data)
        self._sha256.update(data)
        self._position += len(data)
        for segment in self._encryptor.update(data):
            self._out.write(segment)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Nothing: closing the writer does not end the stream (:meth:`finish` does), and ``out``
        belongs to the caller. ``zipfile`` never calls it on a file it was given."""

    def finish(self) -> tuple[int, str]:
        """Write the last segment; return the plaintext's size and sha256 (hex)."""
        self._out.write(self._encryptor.finalize())
        return self._position, self._sha256.hexdigest()
