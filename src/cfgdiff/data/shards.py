"""WebDataset tar shards as a dataset: `shards:PATTERN`, read with the `webdataset` library.

PATTERN is a folder (every .tar in it, in name order) or a brace pattern such as
`/data/train-{000000..000127}.tar`. Each sample of a shard is an image (`.png`, `.jpg`, `.jpeg`,
`.webp` or `.bmp`) with its class, its caption or both: `.cls`, an integer, as img2dataset and
most WebDataset classification sets write it, and `.txt`, a UTF-8 caption, as img2dataset and
image-text sets write it. Class names come from a `classes.txt` beside the shards (one name per
line, line i naming class i) when there is one, else they are the numbers 0 .. K-1; shards
without any `.cls` are one class, `image`, for a text model trained on their captions.

Owns: listing and fingerprinting shards, and decoding them a chunk of images at a time (the
folder decoder's rules: centre square, EXIF orientation, transparency over black) straight into
a memory-mapped cache in data_dir/cache/shards/KEY/FINGERPRINT, like a folder's
(folder_cache.py), with the captions beside the images. Under torchrun each process first
decodes its own shards (shard i by rank i mod world size) into a part of the cache
(decode_own_shards); rank 0 then joins the parts in shard order. Training draws its batches from
the joined cache, so a run on shards resumes exactly and does not depend on its number of
processes, as on any other dataset (docs/datasets.md, "WebDataset tar shards").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from cfgdiff.data.mapped import file_sha256, open_mapped, write_npy, write_npy_rows
from cfgdiff.errors import DataError
from cfgdiff.files import atomic_write_bytes

INSTALL = "pip install 'cfgdiff[shards]'"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")
CLASS_KEY = "cls"
CAPTION_KEY = "txt"
CLASS_NAMES_FILE = "classes.txt"
CAPTIONS_FILE = "captions.json"  # in a cache entry: each image's caption or null, in order
ONE_CLASS = "image"  # the class of shards without any .cls


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


@dataclass(frozen=True)
class ShardSet:
    """What shards load as: the images and labels memory-mapped from their cache, the class
    names, and each image's caption (None where its sample has none; `captions` None when no
    sample has one)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    captions: list[str | None] | None


def _samples(path: Path):
    """(key, image bytes, class index or None, caption or None) of every sample of one shard,
    in order."""
    try:
        import webdataset as wds
    except ImportError:
        raise DataError(f"shards: need the webdataset library ({INSTALL})") from None
    stream = wds.WebDataset(
        [str(path)], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    for s in stream:
        key = f"{s.get('__url__')}:{s.get('__key__')}"
        image = next((s[k] for k in IMAGE_KEYS if k in s), None)
        if image is None:
            raise DataError(f"{key}: a sample with no image ({', '.join(IMAGE_KEYS)})")
        label = caption = None
        if CLASS_KEY in s:
            try:
                label = int(bytes(s[CLASS_KEY]).decode().strip())
            except ValueError:
                raise DataError(
                    f"{key}: .cls must be a whole number, got {bytes(s[CLASS_KEY])[:20]!r}"
                ) from None
            if label < 0:
                raise DataError(f"{key}: .cls must be >= 0, got {label}")
        if CAPTION_KEY in s:
            try:
                caption = bytes(s[CAPTION_KEY]).decode("utf-8-sig").strip() or None
            except UnicodeDecodeError:
                raise DataError(f"{key}: .txt must be UTF-8 text") from None
        if label is None and caption is None:
            raise DataError(f"{key}: a sample with no class (.cls) and no caption (.txt)")
        yield key, image, label, caption


def _decode_image(key: str, data: bytes, mode: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return folders.decode_image(key, im, mode, size)
    except folders._unreadable() as e:
        raise DataError(f"{key}: cannot decode image ({type(e).__name__}: {e})") from None


def _first_image(path: Path) -> tuple[str, int]:
    """(mode, side) of the first image of shard `path`, read from its tar without the
    pipeline: the channels and size the shards decode to when not asked."""
    import tarfile

    from PIL import Image

    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.rpartition(".")[2].lower() in IMAGE_KEYS:
                    key = f"{path}:{member.name}"
                    try:
                        with Image.open(tar.extractfile(member)) as im:
                            return ("L" if im.mode in folders.GRAY_MODES else "RGB"), im.size[0]
                    except folders._unreadable() as e:
                        raise DataError(
                            f"{key}: cannot decode image ({type(e).__name__}: {e})"
                        ) from None
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable tar file ({e})") from None
    raise DataError(f"{path}: no image in the first shard ({', '.join(IMAGE_KEYS)})")


@dataclass(frozen=True)
class _Layout:
    """Where the cache of a pattern's shards goes, and what they decode to."""

    pattern: str
    files: list[Path]
    fingerprint: str
    slot: Path
    entry: Path
    parts: Path  # each process's decoded shards before they are joined into `entry`
    mode: str
    row: tuple[int, int, int]  # (channels, size, size)


def _layout(pattern: str, image_size: int | None, channels: int | None, data_dir: Path):
    files = list_shards(pattern)
    fingerprint = _fingerprint(files)
    key = json.dumps([os.path.abspath(pattern), image_size, channels, folders.DECODE_VERSION])
    slot = data_dir / "cache" / "shards" / hashlib.sha256(key.encode()).hexdigest()[:16]
    entry = slot / fingerprint[:16]
    mode = size = None
    if channels is None or image_size is None:
        mode, size = _first_image(files[0])
    channels = channels or (1 if mode == "L" else 3)
    image_size = image_size or size
    mode = "L" if channels == 1 else "RGB"
    parts = slot / f"{fingerprint[:16]}.parts"
    return _Layout(pattern, files, fingerprint, slot, entry, parts, mode, (channels, image_size,
                   image_size))  # fmt: skip


def _check_space(lay: _Layout, files: list[Path]) -> None:
    probe, free = free_space(lay.slot)
    total = sum(p.stat().st_size for p in files)
    if free < total + FOLDER_CACHE_HEADROOM:  # decoded PNGs are larger
        raise DataError(
            f"shards:{lay.pattern}: {total / 2**20:,.0f} MiB of shards would leave under "
            f"{FOLDER_CACHE_HEADROOM >> 20} MiB free on {probe} once decoded; free some space"
        )


def _decode_shard(lay: _Layout, path: Path, labels: list, captions: list, chunk: int,
                  workers: int):  # fmt: skip
    """The images of shard `path` decoded `chunk` at a time (on `workers` threads), its labels
    and captions appended to `labels` and `captions` as they come."""
    size = lay.row[1]
    batch: list[tuple[str, bytes]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def flush():
            out = np.stack(list(pool.map(lambda s: _decode_image(*s, lay.mode, size), batch)))
            batch.clear()
            return out

        for key, data, label, caption in _samples(path):
            batch.append((key, data))
            labels.append(label)
            captions.append(caption)
            if len(batch) == chunk:
                yield flush()
        if batch:
            yield flush()


def _part_files(lay: _Layout, i: int) -> tuple[Path, Path]:
    return lay.parts / f"{i:06d}.npy", lay.parts / f"{i:06d}.json"


def _read_part(lay: _Layout, i: int) -> dict | None:
    """Shard i's decoded part, complete and intact ({"images": mapped array, "labels",
    "captions"}), else None."""
    npy, meta_path = _part_files(lay, i)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != lay.fingerprint or file_sha256(npy) != meta["sha256"]:
            return None
        x = open_mapped(npy)
        if x.shape[1:] != lay.row or not len(meta["labels"]) == len(x) == len(meta["captions"]):
            return None
        return {"images": x, "labels": meta["labels"], "captions": meta["captions"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def decode_own_shards(
    pattern: str,
    image_size: int | None,
    channels: int | None,
    data_dir: Path,
    part: tuple[int, int],
    *,
    log: Log | None = None,
    chunk: int | None = None,
) -> int:
    """Process `part` = (rank, world size)'s share of decoding: shards i with i % world == rank,
    each into a part of the cache (data_dir/cache/shards/KEY/FINGERPRINT.parts), skipping those
    decoded already and doing nothing when the cache is complete. load_shards joins the parts.
    Returns the number of shards this call decoded."""
    rank, world = part
    lay = _layout(pattern, image_size, channels, data_dir)
    if read_entry(lay.entry, lay.fingerprint, verify=False) is not None:
        return 0
    mine = [i for i in range(rank, len(lay.files), world) if _read_part(lay, i) is None]
    if not mine:
        return 0
    _check_space(lay, [lay.files[i] for i in mine])
    if log is not None:
        log(f"shards:{pattern}: process {rank} of {world} decoding {len(mine)} of "
            f"{len(lay.files)} shards")  # fmt: skip
    workers = max(1, min(8, (os.cpu_count() or 1) // world))
    for i in mine:
        labels: list = []
        captions: list = []
        npy, meta_path = _part_files(lay, i)
        chunks = _decode_shard(lay, lay.files[i], labels, captions, chunk or folders.DECODE_CHUNK,
                               workers)  # fmt: skip
        _, sha = write_npy_rows(npy, lay.row, np.uint8, chunks)
        meta = {"fingerprint": lay.fingerprint, "sha256": sha, "labels": labels,
                "captions": captions}  # fmt: skip
        atomic_write_bytes(meta_path, json.dumps(meta).encode())
    return len(mine)


def _class_labels(lay: _Layout, labels: list[int | None], where) -> tuple[np.ndarray, list[str]]:
    """The labels as an array and the class names: every sample's .cls, or none (one class,
    `image`). where(i): which sample the i-th is, in words."""
    names = _class_names_file(lay.files)
    missing = [i for i, v in enumerate(labels) if v is None]
    if len(missing) == len(labels):
        if names is not None:
            raise DataError(
                f"shards:{lay.pattern}: {CLASS_NAMES_FILE} names {len(names)} classes, but no "
                "sample has a class (.cls)"
            )
        return np.zeros(len(labels), dtype=np.int64), [ONE_CLASS]
    if missing:
        raise DataError(
            f"shards:{lay.pattern}: sample {where(missing[0])} has no class (.cls) where "
            f"{len(labels) - len(missing):,} others have one; give every sample a .cls or none"
        )
    y = np.asarray(labels, dtype=np.int64)
    names = names or [str(i) for i in range(int(y.max()) + 1)]
    if y.max() >= len(names):
        raise DataError(
            f"shards:{lay.pattern}: class {int(y.max())} in the shards, but {CLASS_NAMES_FILE} "
            f"names {len(names)} classes"
        )
    return y, names


def load_shards(
    pattern: str,
    image_size: int | None,
    channels: int | None,
    data_dir: Path,
    *,
    log: Log | None = None,
    chunk: int | None = None,
) -> ShardSet:
    """The images, labels, class names and captions of the shards `pattern` names, the images
    memory-mapped from their cache. A missing cache (or one of shards since changed) is
    written first: the parts decode_own_shards left are joined in shard order, and the shards
    without one decoded here, a chunk at a time. channels None: the first image's (1 if it is
    grayscale, else 3); image_size None: the first image's width (every image cropped to its
    centre square and resized to it, as `image_size` does)."""
    lay = _layout(pattern, image_size, channels, data_dir)
    got = _read_shard_entry(lay)
    if got is not None:
        if log is not None:
            log(f"shards:{pattern}: {len(got.labels):,} images as decoded before, from "
                f"{lay.entry}")  # fmt: skip
        return got
    parts = [_read_part(lay, i) for i in range(len(lay.files))]
    todo = [p for p, got in zip(lay.files, parts, strict=True) if got is None]
    if log is not None:
        c, s, _ = lay.row
        done = f" ({len(lay.files) - len(todo)} decoded by the processes)" if len(todo) < len(
            lay.files) else ""  # fmt: skip
        log(f"shards:{pattern}: decoding {len(lay.files)} shards to {c}x{s}x{s}{done}")
    _check_space(lay, todo)
    labels: list[int | None] = []
    captions: list[str | None] = []
    chunk = chunk or folders.DECODE_CHUNK
    workers = min(8, os.cpu_count() or 1)
    t0 = last = time.monotonic()

    starts: list[tuple[int, Path]] = []  # (index of its first sample, shard)

    def where(i: int) -> str:
        first, path = next((f, p) for f, p in reversed(starts) if f <= i)
        return f"{i - first} of {path}"

    def chunks():
        nonlocal last
        for path, part in zip(lay.files, parts, strict=True):
            starts.append((len(labels), path))
            if part is not None:
                labels.extend(part["labels"])
                captions.extend(part["captions"])
                x = part["images"]
                for i in range(0, len(x), chunk):
                    yield np.array(x[i : i + chunk])
                continue
            for c in _decode_shard(lay, path, labels, captions, chunk, workers):
                yield c
                now = time.monotonic()
                if log is not None and now - last >= folders.LOG_PROGRESS_EVERY:
                    last = now
                    log(f"shards:{pattern}: {len(labels):,} images decoded "
                        f"({len(labels) / (now - t0):,.0f}/s)")  # fmt: skip

    entry = lay.entry
    try:
        n, images_sha = write_npy_rows(entry / "images.npy", lay.row, np.uint8, chunks())
        if n == 0:
            raise DataError(f"shards:{pattern}: no samples in the shards")
        y, names = _class_labels(lay, labels, where)
        labels_sha = write_npy(entry / "labels.npy", y.shape, np.int64, [y])
        meta = {
            "version": CACHE_VERSION, "pattern": os.path.abspath(pattern),
            "fingerprint": lay.fingerprint, "class_names": names, "shape": [n, *lay.row],
            "images_sha256": images_sha, "labels_sha256": labels_sha,
        }  # fmt: skip
        if any(c is not None for c in captions):
            text = json.dumps(captions, ensure_ascii=False).encode()
            atomic_write_bytes(entry / CAPTIONS_FILE, text)
            meta["captions_sha256"] = hashlib.sha256(text).hexdigest()
        atomic_write_bytes(entry / "meta.json", json.dumps(meta, indent=1).encode())
    except BaseException:
        shutil.rmtree(entry, ignore_errors=True)
        raise
    keep_only(lay.slot, entry)  # the parts too
    got = _read_shard_entry(lay, verify=False)
    if got is None:
        raise DataError(f"{entry}: the cache just written cannot be read back")
    if log is not None:
        log(f"shards:{pattern}: {n:,} images cached in {entry} "
            f"({got.images.nbytes / 2**20:,.0f} MiB)")  # fmt: skip
    return got


def _read_shard_entry(lay: _Layout, verify: bool = True) -> ShardSet | None:
    """The complete, intact cache entry of the shards with its captions, else None."""
    got = read_entry(lay.entry, lay.fingerprint, verify=verify)
    if got is None:
        return None
    try:
        meta = json.loads((lay.entry / "meta.json").read_text())
        captions = None
        if "captions_sha256" in meta:
            text = (lay.entry / CAPTIONS_FILE).read_bytes()
            if hashlib.sha256(text).hexdigest() != meta["captions_sha256"]:
                return None
            captions = json.loads(text)
            if not isinstance(captions, list) or len(captions) != len(got[1]):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ShardSet(*got, captions)


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
