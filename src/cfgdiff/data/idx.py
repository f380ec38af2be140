"""Reading and writing the IDX format of MNIST and Fashion-MNIST (LeCun et al.), .gz or not."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from cfgdiff.errors import DataError

# The most bytes an IDX file may hold, uncompressed (the largest of a built-in dataset, MNIST's
# training images, holds 47,040,016): a .gz is inflated in a stream and stopped there, so a
# gzip bomb in a data folder costs no more than this before it is refused.
MAX_IDX_BYTES = 64 << 20


def read_idx_bytes(path: Path, max_bytes: int = MAX_IDX_BYTES) -> bytes:
    """The uncompressed content of an IDX file (gunzipped if it is gzip), at most `max_bytes`
    read or inflated (DataError beyond)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if gz:
                with gzip.GzipFile(fileobj=f) as g:
                    data = g.read(max_bytes + 1)
            else:
                data = f.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None
    if len(data) > max_bytes:
        raise DataError(
            f"{path}: {'decompresses to' if gz else 'holds'} more than {max_bytes >> 20} MiB, "
            "more than any IDX file of a built-in dataset"
        )
    return data


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode IDX content: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, then data."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{name}: not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)  # exact: np.prod of four uint32 can overflow
    if len(data) != expected:
        raise DataError(f"{name}: IDX file has {len(data)} bytes, expected {expected} for {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def idx_bytes(a: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX content (inverse of parse_idx)."""
    assert a.dtype == np.uint8
    head = struct.pack(">I", 0x800 + a.ndim) + b"".join(struct.pack(">I", d) for d in a.shape)
    return head + np.ascontiguousarray(a).tobytes()


def idx_sha256(a: np.ndarray) -> str:
    """SHA-256 of the uncompressed IDX encoding of `a`: the same whatever the source was."""
    return hashlib.sha256(idx_bytes(a)).hexdigest()
