"""Streaming envelope AEAD throughput against raw AES-256-GCM, measured in the same run.

Baseline: ``AESGCM.encrypt``/``decrypt`` over the same random buffer in 1 MiB chunks (the same
cipher work, no framing, no I/O objects); also reported against the stricter ``encrypt_into``/
``decrypt_into`` baseline, since the streaming code itself writes into reused buffers.
Measured: ``encrypt_stream``/``decrypt_stream`` from an
in-memory reader to a writer that discards. Target: streaming >= 0.8x raw in both directions.

Peak memory (tracemalloc, Python allocations, which include every buffer cryptography returns) is
measured for a 64 MiB and a full-size object: it must not grow with the object size.

    .venv/bin/python benchmarks/crypto_throughput.py [--size-mib 256] [--repeat 5]

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from compliance.crypto.streaming import SEGMENT_SIZE, decrypt_stream, encrypt_stream  # noqa: E402

MIB = 1 << 20
KEY_ID = "3f0c8d2e-6a51-4b7e-9e0c-2f6f1f3f9a10"
AD = b"1.2.826.0.1.3680043.2.1125.1.123456789|application/dicom"


class NullWriter:
    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mib * MIB
    data_key = AESGCM.generate_key(bit_length=256)
    buffer = os.urandom(size)
    view = memoryview(buffer)

    raw = AESGCM(data_key)
    nonce = os.urandom(12)  # benchmark only: one nonce for every chunk is never acceptable for real data
    chunks = [view[i : i + SEGMENT_SIZE] for i in range(0, size, SEGMENT_SIZE)]
    raw_ciphertexts = [raw.encrypt(nonce, c, None) for c in chunks]

    def raw_encrypt() -> None:
        for c in chunks:
            raw.encrypt(nonce, c, None)

    def raw_decrypt() -> None:
        for c in raw_ciphertexts:
            raw.decrypt(nonce, c, None)

    encrypted = io.BytesIO()
    encrypt_stream(io.BytesIO(buffer), encrypted, data_key=data_key, key_id=KEY_ID, associated_data=AD)
    ciphertext = encrypted.getvalue()
    del encrypted

    def stream_encrypt() -> None:
        encrypt_stream(io.BytesIO(buffer), NullWriter(), data_key=data_key, key_id=KEY_ID, associated_data=AD)

    def stream_decrypt() -> None:
        decrypt_stream(io.BytesIO(ciphertext), NullWriter(), unwrap=lambda h: data_key, associated_data=AD)

    out_buffer = bytearray(SEGMENT_SIZE + 16)

    def raw_encrypt_into() -> None:
        with memoryview(out_buffer) as out:
            for c in chunks:
                raw.encrypt_into(nonce, c, None, out[: len(c) + 16])

    def raw_decrypt_into() -> None:
        with memoryview(out_buffer) as out:
            for c in raw_ciphertexts:
                raw.decrypt_into(nonce, c, None, out[: len(c) - 16])

    # Interleaved repetitions, best of each, so CPU frequency drift and neighbours hit all sides alike.
    runs = {
        "raw_encrypt": raw_encrypt,
        "raw_encrypt_into": raw_encrypt_into,
        "stream_encrypt": stream_encrypt,
        "raw_decrypt": raw_decrypt,
        "raw_decrypt_into": raw_decrypt_into,
        "stream_decrypt": stream_decrypt,
    }
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            best[name] = min(best[name], best_of(1, fn))
    t_raw_enc, t_stream_enc = best["raw_encrypt"], best["stream_encrypt"]
    t_raw_dec, t_stream_dec = best["raw_decrypt"], best["stream_decrypt"]
    raw_ciphertexts.clear()

    mb = size / 1e6
    results = {
        "size_mib": args.size_mib,
        "segment_size": SEGMENT_SIZE,
        "raw_encrypt_mb_s": round(mb / t_raw_enc, 1),
        "stream_encrypt_mb_s": round(mb / t_stream_enc, 1),
        "encrypt_ratio": round(t_raw_enc / t_stream_enc, 3),
        "raw_decrypt_mb_s": round(mb / t_raw_dec, 1),
        "stream_decrypt_mb_s": round(mb / t_stream_dec, 1),
        "decrypt_ratio": round(t_raw_dec / t_stream_dec, 3),
        # The stricter baseline: raw AES-GCM writing into a reused buffer (no allocation at all).
        "raw_encrypt_into_mb_s": round(mb / best["raw_encrypt_into"], 1),
        "encrypt_ratio_vs_into": round(best["raw_encrypt_into"] / t_stream_enc, 3),
        "raw_decrypt_into_mb_s": round(mb / best["raw_decrypt_into"], 1),
        "decrypt_ratio_vs_into": round(best["raw_decrypt_into"] / t_stream_dec, 3),
    }

    # Peak memory per object size: the inputs exist before tracing starts, so the peak is only what
    # the streaming code itself holds.
    peaks: dict[str, dict[str, int]] = {}
    for label, n in (("64MiB", 64 * MIB), (f"{args.size_mib}MiB", size)):
        source = buffer[:n] if n < size else buffer
        sealed = io.BytesIO()
        encrypt_stream(io.BytesIO(source), sealed, data_key=data_key, key_id=KEY_ID, associated_data=AD)
        sealed_bytes = sealed.getvalue()
        del sealed
        reader = io.BytesIO(source)
        tracemalloc.start()
        encrypt_stream(reader, NullWriter(), data_key=data_key, key_id=KEY_ID, associated_data=AD)
        enc_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        reader = io.BytesIO(sealed_bytes)
        tracemalloc.start()
        decrypt_stream(reader, NullWriter(), unwrap=lambda h: data_key, associated_data=AD)
        dec_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[label] = {"encrypt_peak_bytes": enc_peak, "decrypt_peak_bytes": dec_peak}
        del sealed_bytes, reader
    results["peak_memory"] = peaks
    results["python"] = platform.python_version()
    results["machine"] = platform.machine()
    results["cpus"] = os.cpu_count()

    print(f"object {args.size_mib} MiB, segments {SEGMENT_SIZE // MIB} MiB, best of {args.repeat}")
    print(
        f"encrypt  raw {results['raw_encrypt_mb_s']:>8} MB/s  stream {results['stream_encrypt_mb_s']:>8} MB/s"
        f"   ratio {results['encrypt_ratio']:.3f}x (target >= 0.8)"
    )
    print(
        f"decrypt  raw {results['raw_decrypt_mb_s']:>8} MB/s  stream {results['stream_decrypt_mb_s']:>8} MB/s"
        f"   ratio {results['decrypt_ratio']:.3f}x (target >= 0.8)"
    )
    print(
        f"strict baseline (raw *_into, no allocation): encrypt {results['raw_encrypt_into_mb_s']} MB/s"
        f" -> {results['encrypt_ratio_vs_into']:.3f}x, decrypt {results['raw_decrypt_into_mb_s']} MB/s"
        f" -> {results['decrypt_ratio_vs_into']:.3f}x"
    )
    for label, peak in peaks.items():
        print(
            f"peak memory, {label:>7} object: encrypt {peak['encrypt_peak_bytes'] / MIB:6.2f} MiB,"
            f" decrypt {peak['decrypt_peak_bytes'] / MIB:6.2f} MiB"
        )
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
