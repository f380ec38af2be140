"""Cache arrays on disk, read memory-mapped or by row, and written in chunks.

Owns the one way a dataset cache's .npy files are read and written: `open_mapped` maps a file
(never copying it into the process: every process on a machine reads the same pages of the
page cache), `RowReader` reads rows of one by index without mapping them (what training
gathers its batches with), `file_sha256` checks one against its recorded checksum by reading
it in chunks (without mapping it, so that the check leaves nothing resident), and `write_npy`
writes an array atomically from chunks that arrive in order (a decoder's), hashing as it goes,
so that neither writing nor checking holds more than one chunk in memory. The checksum is that
of the array's bytes in C order, the same as folder_cache.array_sha256 of the whole array:
caches written before stay valid. docs/datasets.md, "Memory".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cfgdiff.files import atomic_write_with

CHUNK_BYTES = 16 << 20  # what checking reads at a time


def _data_offset(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of the open .npy file `f`, positioned at its start."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise ValueError("a Fortran-ordered array (cfgdiff writes C order)")
    return tuple(shape), dtype, f.tell()


def data_chunks(path: Path):
    """The array bytes of the .npy file `path`, CHUNK_BYTES at a time, read from the file (not
    through a map, so that nothing stays resident); raises OSError or ValueError for an
    unreadable or malformed file, or one cut short."""
    with open(path, "rb") as f:
        shape, dtype, _ = _data_offset(f)
        left = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        while left > 0:
            block = f.read(min(CHUNK_BYTES, left))
            if not block:
                raise ValueError(f"{path}: cut short ({left:,} bytes missing)")
            yield block
            left -= len(block)


def file_sha256(path: Path) -> str:
    """SHA-256 of the array bytes of the .npy file `path` (data_chunks)."""
    h = hashlib.sha256()
    for block in data_chunks(path):
        h.update(block)
    return h.hexdigest()


def mapped_file(a) -> Path | None:
    """The file array `a` (numpy) is mapped from, whole (open_mapped's), else None."""
    if isinstance(a, np.memmap) and a.filename is not None and a.base is not None:
        return Path(a.filename)
    return None


def open_mapped(path: Path) -> np.ndarray:
    """The .npy array `path` mapped copy-on-write: reads share the page cache with every other
    process that maps it, a write (cfgdiff makes none) would stay private to this process."""
    return np.load(path, mmap_mode="c", allow_pickle=False)


class RowReader:
    """Rows of a .npy cache file read by index with positioned reads (os.preadv) straight into
    the batch's buffer. The process maps nothing of the file, so it holds the batch and no more,
    while the page cache holds the file once for every process.

    Training gathers its batches with it rather than by indexing the map: where the kernel's
    page cache holds a file in large folios (Linux 6.x), a fault on one mapped row maps the
    whole folio around it, hundreds of KiB for a row of 12 KiB, so a process indexing a map at
    random makes most of the file its resident memory within an epoch (docs/datasets.md,
    "Memory")."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            shape, self.dtype, self.offset = _data_offset(f)
        self.n, self.row = shape[0], tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row, dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def take(self, idx) -> np.ndarray:
        """Rows `idx` (integers in [0, n)) as a new array (len(idx), *row)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.row), dtype=self.dtype)
        if not idx.size:
            return out
        if not (0 <= idx.min() and idx.max() < self.n):
            raise IndexError(f"{self.path}: a row outside [0, {self.n})")
        view, rb = memoryview(out).cast("B"), self.row_bytes
        for k, i in enumerate(idx.tolist()):
            if os.preadv(self._fd, [view[k * rb : (k + 1) * rb]], self.offset + i * rb) != rb:
                raise OSError(f"{self.path}: row {i} cut short")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


# The header the writers write before the row count is known, and rewrite in place after:
# .npy format 2.0 padded to this many bytes (a multiple of 64, as the format asks).
_RESERVED_HEADER = 256


def write_npy(path: Path, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]) -> str:
    """Write a .npy file of `shape` and `dtype` atomically from `chunks` (consecutive slices along
    the first axis, in order, together exactly `shape`), and return the SHA-256 of its array bytes.
    Raises ValueError if the chunks do not add up, and OSError (a full disk) with `path` left as
    it was."""
    return _write_rows(path, tuple(shape[1:]), dtype, chunks, expect=shape[0])[1]


def write_npy_rows(
    path: Path, row: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]
) -> tuple[int, str]:
    """write_npy for a number of rows known only at the end (a stream of samples): the rows of
    `chunks` (each of shape (k, *row)) go to the file as they come, then the header is rewritten
    with their count. Returns (rows, SHA-256 of the array bytes); atomic as write_npy."""
    return _write_rows(path, row, dtype, chunks, expect=None)


def _write_rows(path: Path, row: tuple[int, ...], dtype, chunks: Iterable[np.ndarray],
                expect: int | None) -> tuple[int, str]:  # fmt: skip
    """Both writers: a reserved header, the chunks hashed as they are written, the header
    rewritten with the count; `expect` rows exactly when given (ValueError otherwise)."""
    dtype = np.dtype(dtype)
    digest = hashlib.sha256()
    rows = 0

    def header(n: int) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
             "shape": (n, *row)}  # fmt: skip
        text = repr(d).encode("latin1")
        pad = _RESERVED_HEADER - 12 - len(text) - 1
        if pad < 0:
            raise ValueError(f"an array header too long for {_RESERVED_HEADER} bytes: {d}")
        body = text + b" " * pad + b"\n"
        return b"\x93NUMPY\x02\x00" + len(body).to_bytes(4, "little") + body

    def write(f) -> None:
        nonlocal rows
        f.write(header(0))
        for chunk in chunks:
            c = np.ascontiguousarray(chunk, dtype=dtype)
            if c.shape[1:] != tuple(row) or (expect is not None and rows + len(c) > expect):
                raise ValueError(
                    f"a chunk of shape {c.shape} after {rows} rows of shape {row}, "
                    f"{expect} rows in all"
                )
            view = memoryview(c).cast("B") if c.size else b""
            digest.update(view)
            f.write(view)
            rows += c.shape[0]
        if expect is not None and rows != expect:
            raise ValueError(f"{rows} rows written of {expect}")
        f.seek(0)
        f.write(header(rows))
        f.seek(0, 2)

    atomic_write_with(path, write)
    return rows, digest.hexdigest()
