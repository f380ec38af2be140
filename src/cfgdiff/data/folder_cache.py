"""The cache of decoded image folders: a folder is decoded once per size and channel count,
and read back while its files are unchanged.

Owns: data_dir/cache/folders/KEY/FINGERPRINT entries (KEY: folder, size, channels, decoder
version; FINGERPRINT: the names, sizes and modification times of its files), their atomic
writing with a disk-space headroom, and what `data info` says of a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from cfgdiff.data import folders
from cfgdiff.data.folders import Log
from cfgdiff.data.mapped import file_sha256, open_mapped, write_npy
from cfgdiff.errors import DataError
from cfgdiff.files import atomic_write_bytes

CACHE_VERSION = 1


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of the array's bytes in C order, hashed a block of rows at a time (no copy of a
    whole array, mapped or not)."""
    h = hashlib.sha256()
    if a.ndim == 0 or a.size == 0:
        h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    rows = max(1, (16 << 20) // a[:1].nbytes)
    for i in range(0, len(a), rows):
        h.update(memoryview(np.ascontiguousarray(a[i : i + rows])).cast("B"))
    return h.hexdigest()


def folder_caches(data_dir: Path) -> Path:
    return data_dir / "cache" / "folders"


def _folder_cache_key(root: Path, image_size: int | None, channels: int | None) -> str:
    """One cache slot per folder, size, channel count (as asked: None is "as the data is") and
    decoder version; it holds the latest decoding only."""
    key = [os.path.abspath(root), image_size, channels, folders.DECODE_VERSION]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


# Space left free on the data directory's disk after writing a folder cache; a cache that would
# not leave it is not written (the folder is decoded by every command instead).
FOLDER_CACHE_HEADROOM = 512 << 20


def load_folder(
    root: Path,
    image_size: int | None,
    channels: int | None,
    data_dir: Path,
    *,
    listing: folders.FolderListing | None = None,
    write: bool = True,
    log: Log | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """folders.folder_dataset(root, image_size, channels), through a cache of the decoded images
    in data_dir/cache/folders/KEY/FINGERPRINT, written a chunk of images at a time as they are
    decoded and read back memory-mapped (data/mapped.py): the fingerprint (names, sizes and
    modification times of the files) is checked on every load, so an added, removed or
    rewritten image means decoding again (see FolderListing.fingerprint for its one blind
    spot). A cache that cannot be written (read-only or full disk) is skipped, said through
    `log`; one that cannot be read is rebuilt.
    listing: list_folder(root) or scan_folder(root) if the caller has it already.
    write: False to read a cache but not write one."""
    listing = listing or folders.list_folder(root)
    fingerprint = listing.fingerprint()
    slot = folder_caches(data_dir) / _folder_cache_key(root, image_size, channels)
    entry = slot / fingerprint[:16]
    large = len(listing.files) >= folders.LOG_DECODING_FROM
    got = read_entry(entry, fingerprint)
    if got is not None:
        if log is not None and large:
            log(f"{root}: {len(listing.files):,} images as decoded before, from {entry}")
        return got
    scan = listing if isinstance(listing, folders.FolderScan) else None
    scan = scan or folders.scan_folder(root, listing)
    if not write:
        return folders.folder_dataset(root, image_size, channels, scan=scan, log=log)
    decoding = folders.decode_folder(root, image_size, channels, scan=scan, log=log)
    try:
        _write_folder_cache(slot, entry, fingerprint, decoding, image_size, channels)
        got = read_entry(entry, fingerprint, verify=False)  # just written and hashed
        if got is None:
            raise OSError(f"{entry}: the cache just written cannot be read back")
    except OSError as e:
        if log is not None:
            log(f"{root}: decoded images not cached ({e}); every command decodes the folder")
        return folders.folder_dataset(root, image_size, channels, scan=scan, log=log)
    if log is not None and large:
        log(f"{root}: decoded images cached in {entry} ({got[0].nbytes / 2**20:,.0f} MiB)")
    return got


def read_entry(entry: Path, fingerprint: str, verify: bool = True):
    """(images, labels, class names) of a complete, intact cache entry (of a folder or of shards)
    for these files, the arrays memory-mapped (their checksums checked in chunks first unless
    `verify` is False); None otherwise (absent, written by another version, torn or corrupted:
    the caller decodes)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        paths = entry / "images.npy", entry / "labels.npy"
        want = [meta["images_sha256"], meta["labels_sha256"]]
        if verify and [file_sha256(p) for p in paths] != want:
            return None
        x, y = (open_mapped(p) for p in paths)
        if list(x.shape) != meta["shape"] or y.shape != (x.shape[0],):
            return None
        return x, y, [str(c) for c in meta["class_names"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # any damage: a miss
        return None


def _write_folder_cache(slot: Path, entry: Path, fingerprint: str, decoding, image_size,
                        channels) -> None:  # fmt: skip
    """Decode `decoding` (folders.FolderDecoding) a chunk at a time straight into the entry's
    images.npy, then labels.npy, then meta.json last (an entry without it is incomplete), then
    remove the slot's older entries. Raises OSError (no space, read-only, ...) with nothing
    partial left; a DataError of a bad image, likewise."""
    shape = decoding.shape
    nbytes = int(np.prod(shape, dtype=np.int64))
    need = nbytes + 8 * shape[0] + FOLDER_CACHE_HEADROOM
    probe, free = free_space(entry)
    if need > free:
        raise OSError(
            f"{nbytes / 2**20:,.0f} MiB would leave under "
            f"{FOLDER_CACHE_HEADROOM >> 20} MiB free on {probe}"
        )
    y = decoding.labels
    meta = {
        "version": CACHE_VERSION,
        "root": os.path.abspath(decoding.root),
        "image_size": image_size,
        "channels": channels,
        "decode_version": folders.DECODE_VERSION,
        "fingerprint": fingerprint,
        "class_names": decoding.class_names,
        "shape": list(shape),
    }
    try:
        chunks = (c for _, c in decoding.chunks())
        meta["images_sha256"] = write_npy(entry / "images.npy", shape, np.uint8, chunks)
        meta["labels_sha256"] = write_npy(entry / "labels.npy", y.shape, np.int64, [y])
        atomic_write_bytes(entry / "meta.json", json.dumps(meta, indent=1).encode())
    except BaseException:
        shutil.rmtree(entry, ignore_errors=True)
        raise
    keep_only(slot, entry)


def free_space(path: Path) -> tuple[Path, int]:
    """(the nearest existing folder at or above `path`, the free bytes of its disk): the disk a
    new cache entry at `path` would go to."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def keep_only(slot: Path, entry: Path) -> None:
    """Remove the entries of `slot` other than `entry`: a cache slot keeps its latest decoding
    (of a folder or of shards)."""
    for old in slot.iterdir():
        if old != entry and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def cached_folder_entries(data_dir: Path, root: Path) -> list[dict]:
    """The caches of folder `root` in data_dir: [{path, shape, bytes}], one per size decoded."""
    out = []
    want = os.path.abspath(root)
    for meta_path in sorted(folder_caches(data_dir).glob("*/*/meta.json")):
        d = meta_path.parent
        try:  # an entry being replaced or removed by another command is left out
            meta = json.loads(meta_path.read_text())
            if meta.get("root") == want:
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                out.append({"path": str(d), "shape": list(meta["shape"]), "bytes": size})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def folder_info(name: str, root: Path, data_dir: Path, log: Log | None = None) -> dict:
    """A folder's classes, counts, image sizes and modes from the image headers; shape and
    checksums of the decoded images where it loads as it is (one square size), else a note
    saying what training needs (an image size)."""
    scan = folders.scan_folder(root)
    counts = Counter(k for _, k in scan.files)
    train: dict = {"counts": [counts[k] for k in range(len(scan.class_names))]}
    out = {
        "name": name,
        "path": str(root),
        "class_names": scan.class_names,
        "image_sizes": {f"{w}x{h}": n for (w, h), n in Counter(s for _, s in scan.headers).items()},
        "modes": dict(Counter(m for m, _ in scan.headers)),
        "skipped": [str(p) for p in scan.skipped],
        "splits": {"train": train},
    }
    out["caches"] = cached_folder_entries(data_dir, root)
    try:  # decoded as load_dataset reads it, from the same scan (and cache, not written here)
        x, y, _ = load_folder(root, None, None, data_dir, listing=scan, write=False, log=log)
    except DataError as e:
        out["note"] = str(e)
        return out
    train["shape"] = list(x.shape)
    train["images_sha256"] = array_sha256(x)
    train["labels_sha256"] = array_sha256(y)
    return out
