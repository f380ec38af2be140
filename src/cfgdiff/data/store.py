"""Datasets as uint8 tensors: the `Dataset` object, the cache of the built-in datasets, and
loading any dataset by name.

Owns: the data directory, the uint8 caches of the built-in datasets under it (obtained once by
their spec's fetcher, verified on every read), `load_dataset` (built-ins and folders, at a size
and channel count) and `info`. Knows nothing about diffusion; turning uint8 into [-1, 1] floats
happens where batches are drawn (`batches.py`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cfgdiff.data import folder_cache, folders, shards
from cfgdiff.data.folder_cache import CACHE_VERSION, array_sha256
from cfgdiff.data.mapped import file_sha256, mapped_file, open_mapped
from cfgdiff.data.specs import DatasetName
from cfgdiff.errors import DataError
from cfgdiff.files import atomic_write_bytes

Log = Callable[[str], None]
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Dataset:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: tuple[str, ...]
    # the .npy files `images` and `labels` are mapped from, whole (None: in memory), so that
    # their bytes can be read again without making the map resident (train.state.data_identity)
    files: tuple[Path, Path] | None = None
    # each image's own caption (None where it has none), for data that carries captions per
    # image (tar shards' .txt); None for data without (a folder's captions.txt is read by the
    # text conditions from the folder itself)
    captions: tuple[str | None, ...] | None = None
    # where `images` and `labels` start when they are the maps of `files`: a Dataset whose
    # arrays were replaced since (dataclasses.replace) is not read from the files
    map_ptrs: tuple[int, int] | None = field(default=None, compare=False, repr=False)

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

    def mapped_files(self) -> tuple[Path, Path] | None:
        """`files` while `images` and `labels` are still their maps (not replaced since, as a
        padded or converted copy would be), else None."""
        if self.files is None or self.map_ptrs is None:
            return None
        if (self.images.data_ptr(), self.labels.data_ptr()) != self.map_ptrs:
            return None
        return self.files

    def hold_out(self, every: int) -> tuple[Dataset, Dataset]:
        """(the rest, every `every`-th image from the first): a held-out split for data that has
        no test split (a folder; its classes are contiguous, so each is represented)."""
        held = torch.arange(len(self)) % every == 0

        def part(keep: torch.Tensor) -> Dataset:
            caps = self.captions
            if caps is not None:
                caps = tuple(c for c, k in zip(caps, keep.tolist(), strict=True) if k)
            return dataclasses.replace(
                self, images=self.images[keep], labels=self.labels[keep], files=None,
                captions=caps,
            )  # fmt: skip

        return part(~held), part(held)


def default_data_dir() -> Path:
    """$CFGDIFF_DATA_DIR, else ~/.cache/cfgdiff/data."""
    env = os.environ.get("CFGDIFF_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cfgdiff" / "data"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def cache_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "cache" / name


def write_cache(data_dir: Path, name: str, arrays: Arrays, class_names, source: str):
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
            "images_sha256": array_sha256(x),
            "labels_sha256": array_sha256(y),
            "counts": np.bincount(y, minlength=len(class_names)).tolist(),
        }
    atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=1).encode())


def read_cache(data_dir: Path, name: str, split: str, verify: bool = True):
    """(images, labels, meta) from the cache, or None if it is absent or incomplete: the arrays
    memory-mapped (mapped.open_mapped), their checksums checked in chunks first."""
    d = cache_dir(data_dir, name)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or split not in meta.get("splits", {}):
        return None
    s = meta["splits"][split]
    paths = d / f"{split}_images.npy", d / f"{split}_labels.npy"
    try:
        if verify and [file_sha256(p) for p in paths] != [s["images_sha256"], s["labels_sha256"]]:
            raise DataError(
                f"{d}: cache checksum mismatch for {split}; delete the folder to rebuild"
            )
        x, y = (open_mapped(p) for p in paths)
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: unreadable cache ({e}); delete the folder to rebuild it") from None
    return x, y, meta


def obtain(name: str, data_dir: Path, log: Log | None = None, timeout: float = 10.0) -> dict:
    """Make sure the cache of a built-in dataset exists (its spec's fetcher: local files, then
    mirrors, then the offline fallbacks) and return its meta.json content."""
    ds = DatasetName.parse(name)
    if ds.spec.fetch is None:
        raise DataError(f"{name}: folder datasets are read in place, there is nothing to fetch")
    d = cache_dir(data_dir, ds.spec.name)
    if (d / "meta.json").is_file():
        return json.loads((d / "meta.json").read_text())
    arrays, source = ds.spec.fetch(data_dir, log, timeout)
    write_cache(data_dir, ds.spec.name, arrays, ds.spec.class_names, source)
    return json.loads((d / "meta.json").read_text())


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
    ds = DatasetName.parse(name)
    if split not in ("train", "test"):
        raise DataError(f"`split` must be 'train' or 'test', got {split!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"`channels` must be 1 or 3, got {channels}")
    if image_size is not None and not 8 <= image_size <= 1024:
        raise DataError(f"`image_size` must be in [8, 1024], got {image_size}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if ds.folder is not None:
        if split != "train":
            raise DataError(f"{name}: folder datasets have only a train split")
        x, y, class_names = folder_cache.load_folder(
            ds.folder, image_size, channels, data_dir, log=log
        )
        return _dataset(name, x, y, class_names)
    if ds.shards is not None:
        if split != "train":
            raise DataError(f"{name}: shards are one train split")
        got = shards.load_shards(ds.shards, image_size, channels, data_dir, log=log)
        captions = tuple(got.captions) if got.captions is not None else None
        return _dataset(name, got.images, got.labels, got.class_names, captions)
    meta = obtain(name, data_dir, log)
    got = read_cache(data_dir, name, split)
    if got is None:
        raise DataError(f"{cache_dir(data_dir, name)}: cache has no {split} split")
    x, y, meta = got
    mapped = torch.from_numpy(x)
    images = convert_images(mapped, image_size, channels)
    if images is not mapped:  # converted: in memory
        return Dataset(name, images, torch.from_numpy(y), tuple(meta["class_names"]))
    return _dataset(name, x, y, meta["class_names"])


def _dataset(name: str, x: np.ndarray, y: np.ndarray, class_names, captions=None) -> Dataset:
    """A Dataset of arrays as a cache gives them, remembering the files they are mapped from."""
    files = (mapped_file(x), mapped_file(y))
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    return Dataset(
        name, images, labels, tuple(class_names), files if None not in files else None,
        captions, (images.data_ptr(), labels.data_ptr()),
    )  # fmt: skip


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


def class_names_of(name: str, data_dir: Path | None = None, log: Log | None = None) -> list[str]:
    """A dataset's class names, without decoding it: a folder's from its sub-folder names (at
    any image size, mixed or not), a built-in's from its cache (obtained first if needed)."""
    ds = DatasetName.parse(name)
    if ds.folder is not None:
        return folders.list_folder(ds.folder).class_names
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if ds.shards is not None:
        try:
            return shards.shard_class_names(ds.shards)
        except DataError:  # no classes.txt: the classes the decoded shards hold
            return shards.load_shards(ds.shards, None, None, data_dir, log=log).class_names
    return list(obtain(name, data_dir, log)["class_names"])


def info(name: str, data_dir: Path | None = None, log: Log | None = None) -> dict:
    """Where the cached files are, counts per class and checksums (does not download).
    log: told about a large folder's decoding (to checksum it) as it goes."""
    ds = DatasetName.parse(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if ds.folder is not None:
        return folder_cache.folder_info(name, ds.folder, data_dir, log)
    if ds.shards is not None:
        got = shards.load_shards(ds.shards, None, None, data_dir, log=log)
        counts = np.bincount(got.labels, minlength=len(got.class_names)).tolist()
        captioned = sum(c is not None for c in got.captions or ())
        return {
            "name": name, "path": ds.shards, "class_names": got.class_names,
            "shards": [str(p) for p in shards.list_shards(ds.shards)],
            "splits": {"train": {"shape": list(got.images.shape), "counts": counts,
                                 "captioned": captioned}},
        }  # fmt: skip
    d = cache_dir(data_dir, name)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        raise DataError(f"{name}: not in {d}; run `cfgdiff data fetch {name}` first") from None
    meta["path"] = str(d)
    meta["files"] = sorted(str(p) for p in d.glob("*.npy"))
    return meta
