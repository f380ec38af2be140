"""Image folders as datasets: one sub-folder per class, read with Pillow.

Owns: what counts as an image and a class folder, listing a folder (names only) and scanning it
(image headers), and decoding it to uint8 arrays at one square size (centre crop, EXIF
orientation, transparency over black, 16-bit grayscale scaled), on threads. The cache of decoded
folders is folder_cache.py's.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfgdiff.errors import DataError

Log = Callable[[str], None]


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LOG_DECODING_FROM = 1000  # images: a folder this large is announced before it is decoded
LOG_PROGRESS_EVERY = 15.0  # seconds between progress lines while such a folder is decoded
# The version of the pixels folder_dataset makes from a folder: bump it when _decode or the crop
# and resize change them, so that caches of decoded folders (folder_cache.py) are rebuilt.
DECODE_VERSION = 1
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# The most pixels an image may have to be decoded (8192 x 8192): a few-kilobyte PNG can declare
# a size whose decoding needs gigabytes (a decompression bomb). Checked from the header, before
# any decoding, with Pillow's own bomb check turned into the same error.
MAX_IMAGE_PIXELS = 1 << 26


def _unreadable():
    """The exceptions Pillow raises for a file it cannot or will not decode (broken data, a
    chunk that decompresses too large, a decompression bomb): each becomes one DataError."""
    from PIL import Image, UnidentifiedImageError

    return (
        UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
        Image.DecompressionBombError, Image.DecompressionBombWarning,
    )  # fmt: skip


def _check_pixels(p: Path, size: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{p}: image is {size[0]}x{size[1]}, more than the {MAX_IMAGE_PIXELS:,} pixels "
            "cfgdiff decodes (a decompression bomb, or a picture to scale down first)"
        )


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


def decode_image(where, im, mode: str, size: int) -> np.ndarray:
    """One opened image (from file or archive member `where`, named in errors) as uint8
    (C, size, size): upright (_decode), its centre square, resized (bicubic) to `size`. Raises
    DataError for one too large to decode, and what _unreadable() lists for a broken one."""
    from PIL import Image

    _check_pixels(where, im.size)  # a file may have changed since its scan
    a = _decode(im, mode, size)
    h, w = a.shape[:2]
    if h != w:  # the centre square: resizing a 4:3 photo to a square would squash it
        top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
        a = a[top : top + min(h, w), left : left + min(h, w)]
    if a.shape[:2] != (size, size):
        resized = Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC)
        a = np.asarray(resized, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


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
            # ._x.png: macOS; only regular files (through links): opening a FIFO blocks
            if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file():
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
    from PIL import Image

    listing = listing or list_folder(root)
    headers = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for p, _ in listing.files:
            try:
                with Image.open(p) as im:
                    headers.append((im.mode, im.size))
            except _unreadable() as e:
                raise DataError(f"{p}: cannot read image ({type(e).__name__}: {e})") from None
            _check_pixels(p, headers[-1][1])
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
    """One sub-folder per class (sorted by name), images read with Pillow, decoded whole into
    memory: the chunks of decode_folder put together (folder_cache writes them to its cache
    file one at a time instead).

    Images are cropped to their centre square and resized to image_size when given; otherwise all
    must share one square size.
    channels: 1 (grayscale), 3 (RGB) or None (1 if every image is grayscale, else 3).
    scan: scan_folder(root) if the caller has it already.
    workers: decoding threads (default: the cores, at most 8).
    log: told what is being decoded, for folders large enough to take a while, and then how far
    it has got every LOG_PROGRESS_EVERY seconds.
    """
    d = decode_folder(root, image_size, channels, scan=scan, workers=workers, log=log)
    out = np.empty(d.shape, dtype=np.uint8)
    for start, chunk in d.chunks():
        out[start : start + chunk.shape[0]] = chunk
    return out, d.labels, d.class_names


# Images decoded at a time (and so held in memory at once) by decode_folder: 4096 RGB 64x64
# images are 48 MiB.
DECODE_CHUNK = 4096


@dataclass
class FolderDecoding:
    """A folder about to be decoded: the shape of its array, its labels and classes, and the
    decoding itself as consecutive chunks (`chunks()`), so that a folder larger than memory can
    go to a file a chunk at a time."""

    root: Path
    files: list[tuple[Path, int]]
    class_names: list[str]
    shape: tuple[int, int, int, int]
    workers: int
    chunk: int
    log: Log | None

    @property
    def labels(self) -> np.ndarray:
        return np.array([k for _, k in self.files], dtype=np.int64)

    def chunks(self):
        """Yield (start, uint8 array of the images start .. start + len) in order, each decoded
        on `workers` threads; the first file (in sorted order) that fails raises DataError."""
        from PIL import Image

        n, channels, size, _ = self.shape
        mode = "L" if channels == 1 else "RGB"
        files, log = self.files, self.log
        announced = log is not None and n >= LOG_DECODING_FROM
        if announced:
            log(
                f"{self.root}: decoding {n:,} images of {len(self.class_names)} classes to "
                f"{channels}x{size}x{size}"
            )

        def read(out: np.ndarray, start: int, i: int) -> None:
            p = files[i][0]
            try:
                with Image.open(p) as im:
                    out[i - start] = decode_image(p, im, mode, size)
            except _unreadable() as e:
                raise DataError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from None

        # Pillow releases the GIL while decoding and resizing, so threads use every core. Each
        # image lands at its own index: the array is the same whatever the order the threads
        # finish in, and whatever the chunk size.
        t0 = last = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, n, self.chunk):
                stop = min(start + self.chunk, n)
                out = np.empty((stop - start, channels, size, size), dtype=np.uint8)
                futures = [pool.submit(read, out, start, i) for i in range(start, stop)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:  # a bad file or Ctrl-C: do not decode the rest first
                    pool.shutdown(cancel_futures=True)
                    raise
                now = time.monotonic()
                if announced and now - last >= LOG_PROGRESS_EVERY and stop < n:
                    last = now
                    rate = stop / (now - t0)
                    log(
                        f"{self.root}: {stop:,} of {n:,} images decoded "
                        f"({rate:,.0f}/s, about {(n - stop) / rate:,.0f} s left)"
                    )
                yield start, out


def decode_folder(
    root: Path,
    image_size: int | None,
    channels: int | None,
    *,
    scan: FolderScan | None = None,
    workers: int | None = None,
    log: Log | None = None,
    chunk: int | None = None,
) -> FolderDecoding:
    """The decoding of folder `root` (folder_dataset's rules), its shape decided from the image
    headers and nothing decoded yet; `chunk` images at a time (default DECODE_CHUNK)."""
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
                    "pass `image_size` to resize every image"
                )
        if w != h:
            raise DataError(
                f"{files[0][0]}: image is {w}x{h}, not square; pass `image_size` to crop and resize"
            )
        image_size = w
    return FolderDecoding(
        root, list(files), list(scan.class_names),
        (len(files), channels, image_size, image_size),
        workers or min(8, os.cpu_count() or 1), max(1, int(chunk or DECODE_CHUNK)), log,
    )  # fmt: skip
