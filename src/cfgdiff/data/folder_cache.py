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
from cfgdiff.errors import DataError
from cfgdiff.files import atomic_write_bytes, atomic_write_with

CACHE_VERSION = 1


def array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


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
    in data_dir/cache/folders/KEY/FINGERPRINT: the fingerprint (names, sizes and modification
    times of the files) is checked on every load, so an added, removed or rewritten image means
    decoding again (see FolderListing.fingerprint for its one blind spot). A cache that cannot
    be written (read-only or full disk) is skipped, said through `log`; one that cannot be read
    is rebuilt.
    listing: list_folder(root) or scan_folder(root) if the caller has it already.
    write: False to read a cache but not write one."""
    listing = listing or folders.list_folder(root)
    fingerprint = listing.fingerprint()
    slot = folder_caches(data_dir) / _folder_cache_key(root, image_size, channels)
    entry = slot / fingerprint[:16]
    large = len(listing.files) >= folders.LOG_DECODING_FROM
    got = _read_folder_cache(entry, fingerprint)
    if got is not None:
        if log is not None and large:
            log(f"{root}: {len(listing.files):,} images as decoded before, from {entry}")
        return got
    scan = listing if isinstance(listing, folders.FolderScan) else None
    scan = scan or folders.scan_folder(root, listing)
    x, y, class_names = folders.folder_dataset(root, image_size, channels, scan=scan, log=log)
    if not write:
        return x, y, class_names
    meta = {
        "version": CACHE_VERSION,
        "root": os.path.abspath(root),
        "image_size": image_size,
        "channels": channels,
        "decode_version": folders.DECODE_VERSION,
        "fingerprint": fingerprint,
        "class_names": class_names,
        "shape": list(x.shape),
        "images_sha256": array_sha256(x),
        "labels_sha256": array_sha256(y),
    }
    try:
        _write_folder_cache(slot, entry, meta, x, y)
    except OSError as e:
        if log is not None:
            log(f"{root}: decoded images not cached ({e}); every command decodes the folder")
    else:
        if log is not None and large:
            log(f"{root}: decoded images cached in {entry} ({x.nbytes / 2**20:,.0f} MiB)")
    return x, y, class_names


def _read_folder_cache(entry: Path, fingerprint: str):
    """(images, labels, class names) of a complete, intact cache entry for these files; None
    otherwise (absent, written by another version, torn or corrupted: the caller decodes)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        x = np.load(entry / "images.npy", allow_pickle=False)
        y = np.load(entry / "labels.npy", allow_pickle=False)
        if array_sha256(x) != meta["images_sha256"] or array_sha256(y) != meta["labels_sha256"]:
            return None
        return x, y, [str(c) for c in meta["class_names"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # any damage: a miss
        return None


def _write_folder_cache(slot: Path, entry: Path, meta: dict, x: np.ndarray, y: np.ndarray):
    """Arrays first, meta.json last (an entry without it is incomplete), then the slot's older
    entries are removed. Raises OSError (no space, read-only, ...) with nothing partial left."""
    need = x.nbytes + y.nbytes + FOLDER_CACHE_HEADROOM
    probe = entry
    while not probe.exists():  # the nearest existing folder is on the disk it would go to
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise OSError(
            f"{x.nbytes / 2**20:,.0f} MiB would leave under "
            f"{FOLDER_CACHE_HEADROOM >> 20} MiB free on {probe}"
        )
    try:
        for name, a in (("images.npy", x), ("labels.npy", y)):
            atomic_write_with(entry / name, lambda f, a=a: np.save(f, a, allow_pickle=False))
        atomic_write_bytes(entry / "meta.json", json.dumps(meta, indent=1).encode())
    except OSError:
        shutil.rmtree(entry, ignore_errors=True)
        raise
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
