"""Demo data helpers (development only): sample instances and a STOW-RS body builder."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

#: pydicom's bundled samples used as demo data: small, real, written by nobody here.
DEMO_SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "SC_rgb_rle.dcm")


def demo_files(get_testdata_file: Callable[..., object]) -> list[str]:
    """The bundled sample files that ship inside pydicom's wheel (never downloaded)."""
    out = []
    for name in DEMO_SAMPLES:
        path = get_testdata_file(name, download=False)
        if path:
            out.append(str(path))
    return out


def multipart_related(parts: Sequence[bytes], media_type: str = "application/dicom") -> tuple[bytes, str]:
    """A PS3.18 multipart/related body and its Content-Type."""
    boundary = f"compliance-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode())
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{media_type}"; boundary={boundary}'
