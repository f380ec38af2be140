"""WebDataset tar shards as a dataset: `shards:PATTERN`, read with the `webdataset` library.

PATTERN is a folder (every .tar in it, in name order) or a brace pattern such as
`/data/train-{000000..000127}.tar`. Each sample of a shard is an image (`.png`, `.jpg`, `.jpeg`,
`.webp` or `.bmp`) and its class: `.cls`, an integer, as img2dataset and most WebDataset
classification sets write it. Class names come from a `classes.txt` beside the shards (one name
per line, line i naming class i) when there is one, else they are the numbers 0 .. K-1.

Owns: listing and fingerprinting shards, and decoding them a chunk of images at a time (the
folder decoder's rules: centre square, EXIF orientation, transparency over black) straight into
a memory-mapped cache in data_dir/cache/shards/KEY/FINGERPRINT, like a folder's
(folder_cache.py). Training then draws its batches from the cache, so a run on shards resumes
exactly and does not depend on its number of processes, as on any other dataset; the shards are
read once, by the process that builds the cache (rank 0 under torchrun, on every core), not
streamed by each training process (docs/datasets.md, "Tar shards").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cfgdiff.data import folders
from cfgdiff.data.folder_cache import (
    CACHE_VERSION,
    FOLDER_CACHE_HEADROOM,
    free_space,
    keep_only,
    read_entry,
)
from cfgdiff.data.folders import Log
from cfgdiff.data.mapped import write_npy, write_npy_rows
from cfgdiff.errors import DataError
from cfgdiff.files import atomic_write_bytes

INSTALL = "pip install 'cfgdiff[shards]'"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")
CLASS_NAMES_FILE = "classes.txt"


def list_shards(pattern: str) -> list[Path]:
    """The shard files `pattern` names: a folder's .tar files in name order, or a brace
    pattern's expansion (each must exist). DataError when there are none."""
    root = Path(pattern)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
        if not files:
            raise DataError(f"shards:{pattern}: a folder with no .tar shards in it")
        return files
    from braceexpand import braceexpand

    files = [Path(p) for p in braceexpand(pattern)]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise DataError(
            f"shards:{pattern}: {missing[0]} is not a file ({len(missing)} of {len(files)} "
            "named shards missing)"
        )
    return files


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _class_names_file(files: list[Path]) -> list[str] | None:
    path = files[0].parent / CLASS_NAMES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names in it (one per line)")
    return names


def _samples(files: list[Path]):
    """(key, image bytes, class index) of every sample, shard by shard, in order."""
    try:
        import webdataset as wds
    except ImportError:
        raise DataError(f"shards: need the webdataset library ({INSTALL})") from None
    urls = [str(p) for p in files]
    stream = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    for s in stream:
        key = f"{s.get('__url__')}:{s.get('__key__')}"
        image = next((s[k] for k in IMAGE_KEYS if k in s), None)
        if image is None:
            raise DataError(f"{key}: a sample with no image ({', '.join(IMAGE_KEYS)})")
        if "cls" not in s:
            raise DataError(f"{key}: a sample with no class (.cls)")
        try:
            label = int(bytes(s["cls"]).decode().strip())
        except ValueError:
            raise DataError(f"{key}: .cls must be a whole number, got {s['cls'][:20]!r}") from None
        if label < 0:
            raise DataError(f"{key}: .cls must be >= 0, got {label}")
        yield key, image, label


def _decode_image(key: str, data: bytes, mode: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return folders.decode_image(key, im, mode, size)
    except folders._unreadable() as e:
        raise DataError(f"{key}: cannot decode image ({type(e).__name__}: {e})") from None


def _first_image(files: list[Path]) -> tuple[str, int]:
    """(mode, side) of the first sample's image: the channels and size the shards decode to
    when not asked."""
    from PIL import Image

    key, data, _ = next(_samples(files))
    with Image.open(io.BytesIO(data)) as im:
        return ("L" if im.mode in folders.GRAY_MODES else "RGB"), im.size[0]


def load_shards(
    pattern: str,
    image_size: int | None,
    channels: int | None,
    data_dir: Path,
    *,
    log: Log | None = None,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images, labels and class names of the shards `pattern` names, memory-mapped from
    their cache (decoded first, a chunk at a time, when the cache is missing or the shards
    changed). channels None: the first image's (1 if it is grayscale, else 3); image_size
    None: the first image's width (every image cropped to its centre square and resized to it,
    as `image_size` does)."""
    files = list_shards(pattern)
    fingerprint = _fingerprint(files)
    key = json.dumps([os.path.abspath(pattern), image_size, channels, folders.DECODE_VERSION])
    slot = data_dir / "cache" / "shards" / hashlib.sha256(key.encode()).hexdigest()[:16]
    entry = slot / fingerprint[:16]
    got = read_entry(entry, fingerprint)
    if got is not None:
        if log is not None:
            log(f"shards:{pattern}: {len(got[1]):,} images as decoded before, from {entry}")
        return got
    mode0, size0 = _first_image(files)
    if channels is None:
        channels = 1 if mode0 == "L" else 3
    if image_size is None:
        image_size = size0
    mode = "L" if channels == 1 else "RGB"
    row = (channels, image_size, image_size)
    if log is not None:
        side = f"{channels}x{image_size}x{image_size}"
        log(f"shards:{pattern}: decoding {len(files)} shards to {side}")
    probe, free = free_space(slot)
    total = sum(p.stat().st_size for p in files)
    if free < total + FOLDER_CACHE_HEADROOM:  # decoded PNGs are larger
        raise DataError(
            f"shards:{pattern}: {total / 2**20:,.0f} MiB of shards would leave under "
            f"{FOLDER_CACHE_HEADROOM >> 20} MiB free on {probe} once decoded; free some space"
        )
    labels: list[int] = []
    chunk = chunk or folders.DECODE_CHUNK
    workers = min(8, os.cpu_count() or 1)
    t0 = last = time.monotonic()

    def chunks():
        nonlocal last
        batch: list[tuple[str, bytes]] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def flush():
                out = np.stack(list(pool.map(lambda s: _decode_image(*s, mode, image_size), batch)))
                batch.clear()
                return out

            for key, data, label in _samples(files):
                batch.append((key, data))
                labels.append(label)
                if len(batch) == chunk:
                    yield flush()
                    now = time.monotonic()
                    if log is not None and now - last >= folders.LOG_PROGRESS_EVERY:
                        last = now
                        log(f"shards:{pattern}: {len(labels):,} images decoded "
                            f"({len(labels) / (now - t0):,.0f}/s)")  # fmt: skip
            if batch:
                yield flush()

    try:
        n, images_sha = write_npy_rows(entry / "images.npy", row, np.uint8, chunks())
        if n == 0:
            raise DataError(f"shards:{pattern}: no samples in the shards")
        y = np.asarray(labels, dtype=np.int64)
        names = _class_names_file(files) or [str(i) for i in range(int(y.max()) + 1)]
        if y.max() >= len(names):
            raise DataError(
                f"shards:{pattern}: class {int(y.max())} in the shards, but {CLASS_NAMES_FILE} "
                f"names {len(names)} classes"
            )
        labels_sha = write_npy(entry / "labels.npy", y.shape, np.int64, [y])
        meta = {
            "version": CACHE_VERSION, "pattern": os.path.abspath(pattern),
            "fingerprint": fingerprint, "class_names": names, "shape": [n, *row],
            "images_sha256": images_sha, "labels_sha256": labels_sha,
        }  # fmt: skip
        atomic_write_bytes(entry / "meta.json", json.dumps(meta, indent=1).encode())
    except BaseException:
        shutil.rmtree(entry, ignore_errors=True)
        raise
    keep_only(slot, entry)
    got = read_entry(entry, fingerprint, verify=False)
    if got is None:
        raise DataError(f"{entry}: the cache just written cannot be read back")
    if log is not None:
        log(f"shards:{pattern}: {n:,} images cached in {entry} "
            f"({got[0].nbytes / 2**20:,.0f} MiB)")  # fmt: skip
    return got


def shard_class_names(pattern: str) -> list[str]:
    """The class names of the shards, without decoding images where classes.txt names them;
    else from the cache's record after decoding (load_shards)."""
    names = _class_names_file(list_shards(pattern))
    if names is None:
        raise DataError(
            f"shards:{pattern}: no {CLASS_NAMES_FILE} beside the shards; the classes are known "
            "once the shards are decoded (`cfgdiff data info` or training decodes them)"
        )
    return names
