"""Reading and writing the IDX format of MNIST and Fashion-MNIST (LeCun et al.), .gz or not."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from cfgdiff.errors import DataError


def read_idx_bytes(path: Path) -> bytes:
    """The uncompressed content of an IDX file (gunzipped if it is gzip)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode IDX content: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, then data."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{name}: not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
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
