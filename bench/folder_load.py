"""Loading a folder of camera-sized JPEGs at training size, as `folder:PATH` does the first time
(reduced-scale JPEG decoding on one thread per core) against a full decode on one thread (how it was
read before) and a full decode on every core, in the same run, on the same files; and as every later
command loads it, from the decoded-folder cache in the data directory.

    python bench/folder_load.py [--quick] [--n 200] [--photo 1024x768] [--sizes 32,64,128]

The folder is synthetic (a gradient plus noise per image, 2 classes, JPEG quality 90) and lives
in a temporary directory. The table prints seconds per load and images/s for each training size,
the speed-up over the one-thread full decode, the mean absolute pixel difference between the
full and the reduced decode, and the time of a load from the cache (its checks included: a stat of
every file, the checksum of the arrays).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cfgdiff.data import load_folder
from cfgdiff.data.folders import folder_dataset


def make_folder(root: Path, n: int, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    for i in range(n):
        cls = root / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        a = (ramp + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(cls / f"{i:05d}.jpg", quality=90)


def load(root: Path, size: int, reduced: bool, workers: int | None) -> tuple[float, np.ndarray]:
    from PIL import JpegImagePlugin

    draft = JpegImagePlugin.JpegImageFile.draft
    if not reduced:  # the full decode: draft does nothing
        JpegImagePlugin.JpegImageFile.draft = lambda im, mode, size, *a: None
    try:
        t = time.perf_counter()
        x, _, _ = folder_dataset(root, size, None, workers=workers)
        return time.perf_counter() - t, x
    finally:
        JpegImagePlugin.JpegImageFile.draft = draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 images of 256x192, sizes 32")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--photo", default="1024x768", help="WxH of the synthetic photos")
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--device", default="cpu", help="ignored: decoding is on the CPU")
    a = ap.parse_args()
    n, photo, sizes = a.n, a.photo, a.sizes
    if a.quick:
        n, photo, sizes = 20, "256x192", "32"
    width, height = (int(v) for v in photo.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root, dd = Path(tmp) / "photos", Path(tmp) / "data-dir"
        make_folder(root, n, width, height)
        load(root, 32, True, None)  # warm the page cache and Pillow's imports
        print(f"{n} JPEGs of {width}x{height}, centre-cropped and resized; {os.cpu_count()} cores")
        print(
            f"{'size':>5} {'full, 1 thread':>15} {'full, threads':>14} {'reduced, threads':>17} "
            f"{'speed-up':>9} {'mean |diff|':>12} {'cached':>14} {'vs reduced':>11}"
            "   (seconds; img/s in brackets)"
        )
        for size in (int(s) for s in sizes.split(",")):
            t_one, _ = load(root, size, False, 1)
            t_full, x_full = load(root, size, False, None)
            t_red, x_red = load(root, size, True, None)
            diff = np.abs(x_full.astype(np.float64) - x_red.astype(np.float64)).mean()
            load_folder(root, size, None, dd)  # decodes and writes the cache
            t = time.perf_counter()
            x_cached, _, _ = load_folder(root, size, None, dd)
            t_cached = time.perf_counter() - t
            assert np.array_equal(x_cached, x_red)
            cells = [f"{t:.3f} ({n / t:.0f})" for t in (t_one, t_full, t_red, t_cached)]
            print(
                f"{size:>5} {cells[0]:>15} {cells[1]:>14} {cells[2]:>17} "
                f"{t_one / t_red:>8.2f}x {diff:>12.2f} {cells[3]:>14} {t_red / t_cached:>10.0f}x"
            )


if __name__ == "__main__":
    main()
