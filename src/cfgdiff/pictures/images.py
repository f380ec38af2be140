"""Pictures and sample files: image grids, animations (GIF, WebP), folders of single images, and
the three forms `cfgdiff sample` writes (a PNG grid, an .npz of arrays, a folder of PNGs), with
Pillow. Plots (loss curve, sweep) are plots.py's, with matplotlib."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from cfgdiff.data.folders import class_folder_names
from cfgdiff.errors import ConfigError
from cfgdiff.files import atomic_write_bytes, writing

PROMPT_LABEL_CHARS = 48  # of a text model's prompt as a grid's row label (sample, serve)


def grid_image(images: torch.Tensor, ncols: int, pad: int = 2, upscale: int = 1) -> Image.Image:
    """uint8 (N, C, H, W) -> one PIL image, row-major, `ncols` per row."""
    n, c, h, w = images.shape
    nrows = max(1, math.ceil(n / ncols))
    canvas = torch.full(
        (c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=torch.uint8
    )
    for i in range(n):
        r, k = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        canvas[:, y0 : y0 + h, x0 : x0 + w] = images[i]
    arr = canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)  # 2-D uint8 -> "L", (H, W, 3) uint8 -> "RGB"
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """The PNG file of an image, as save_png writes it."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: Image.Image, path: Path) -> Path:
    atomic_write_bytes(Path(path), png_bytes(img))
    return Path(path)


# What an animation may be written as, by suffix (Pillow's format names).
ANIMATION_FORMATS = {".gif": "GIF", ".webp": "WEBP"}


def animation_format(path: Path) -> str:
    """Pillow's format for an animation path (.gif or .webp), checked before any work."""
    fmt = ANIMATION_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"`animate` must end in {' or '.join(ANIMATION_FORMATS)}, got {Path(path).name}"
        )
    return fmt


def save_animation(
    frames: Sequence[Image.Image], path: Path, frame_ms: int = 120, hold_ms: int = 2000
) -> Path:
    """Frames as a looping GIF or WebP (by the suffix), each shown `frame_ms`, the last held
    `hold_ms`; written atomically. Grayscale ("L") frames stay grayscale, which keeps a GIF's
    palette exact and the file small."""
    if not frames:
        raise ConfigError("`frames`: an animation needs at least one frame")
    fmt = animation_format(path)
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    buf = io.BytesIO()
    first, *rest = [f if f.mode in ("L", "RGB") else f.convert("RGB") for f in frames]
    # Pillow's GIF palette optimisation changed pixels of grayscale frames (tested), so it is off
    extra = {"lossless": True} if fmt == "WEBP" else {"optimize": False}
    first.save(
        buf, format=fmt, save_all=True, append_images=rest, duration=durations, loop=0, **extra
    )
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def captioned(img: Image.Image, text: str) -> Image.Image:
    """The image with one line of text in a white band below it."""
    font = ImageFont.load_default()
    out = Image.new("RGB", (img.width, img.height + 14), "white")
    out.paste(img.convert("RGB"), (0, 0))
    ImageDraw.Draw(out).text((4, img.height + 1), text, fill="black", font=font)
    return out


def labelled_grid(
    images: torch.Tensor,
    ncols: int,
    row_labels: Sequence[str],
    col_labels: Sequence[str] | None = None,
    upscale: int = 2,
) -> Image.Image:
    """A grid with text labels left of each row and (optionally) above each column."""
    grid = grid_image(images, ncols, upscale=upscale).convert("RGB")
    font = ImageFont.load_default()
    left = 8 + 7 * max((len(s) for s in row_labels), default=1)
    top = 16 if col_labels else 0
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    cell_h = (grid.height - 2 * upscale) / max(1, len(row_labels))
    for r, s in enumerate(row_labels):
        draw.text((4, top + r * cell_h + cell_h / 2 - 5), s, fill="black", font=font)
    if col_labels:
        cell_w = (grid.width - 2 * upscale) / max(1, len(col_labels))
        for k, s in enumerate(col_labels):
            draw.text((left + k * cell_w + cell_w / 2 - 3 * len(s), 2), s, fill="black", font=font)
    return out


def write_image_folder(
    images: torch.Tensor, labels: Sequence[int], names: Sequence[str], out: Path, settings: dict
) -> dict[str, int]:
    """One PNG per image in out/CLASS/NNNNN.png (numbered per class, in order), and
    out/settings.json: the layout `--dataset folder:PATH` reads, for other tools and for eval.

    The folder is written beside `out` under a temporary name and renamed into place, so a
    failure leaves nothing half-written; `out` must not exist or be an empty folder.
    Returns the number of images written per class folder."""
    out = Path(out)
    folders = class_folder_names(names)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts: dict[str, int] = {}
        for img, label in zip(images, labels, strict=True):
            folder = folders[int(label)]
            j = counts.get(folder, 0)
            counts[folder] = j + 1
            arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
            # each file's write errors name it (files.writing: a full disk is exit status 1)
            with writing(out / folder / f"{j:05d}.png"):
                (tmp / folder).mkdir(exist_ok=True)
                Image.fromarray(arr).save(tmp / folder / f"{j:05d}.png")
        meta = {**settings, "class_folders": dict(zip(names, folders, strict=True))}
        meta["counts"] = counts
        with writing(out / "settings.json"):
            (tmp / "settings.json").write_text(json.dumps(meta, indent=2) + "\n")
        with writing(out):
            os.chmod(tmp, 0o755)
            if out.is_dir():
                out.rmdir()  # empty (checked by the caller; rmdir refuses otherwise)
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def sample_output_kind(out: Path) -> str:
    """What a sample output path asks for: "png" (a grid), "npz" (arrays) or "folder" (one PNG
    per image, a new or empty folder); checked before any work."""
    out = Path(out)
    suffix = out.suffix.lower()
    if out.is_dir() or (suffix == "" and not out.exists()):
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(
                f"`out` {out}: folder is not empty (a folder of images is written only into a "
                "new or empty one)"
            )
        return "folder"
    if suffix not in (".png", ".npz"):
        raise ConfigError(
            f"`out` must end in .png (grid) or .npz (arrays), or name a new or empty folder "
            f"(one PNG per image), got {out}"
        )
    return suffix[1:]


def write_samples(
    out: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    record: dict,
    *,
    per_class: int,
    rows: Sequence[str],
) -> None:
    """Samples in the form `out` asks for (sample_output_kind): a grid of `per_class` images a
    row, `rows` its row labels; an .npz with images uint8 (N, C, H, W), labels (indices into
    `names`: class_names[i] names index i), the guidance and sampler settings and `record` whole
    as JSON; or a folder of PNGs (a folder per name) with settings.json. `record`: what made
    them (sampling.request.SamplingJob.record)."""
    import numpy as np

    kind = sample_output_kind(out)
    with writing(Path(out)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        write_image_folder(images, labels.tolist(), names, out, record)
    elif kind == "png":
        save_png(labelled_grid(images, per_class, list(rows)), out)
    else:
        buf = io.BytesIO()
        np.savez(
            buf,
            images=images.numpy(),
            labels=labels.numpy(),
            class_names=np.array(list(names), dtype=np.str_),
            **{k: kind(record[k]) for k, kind in _npz_types().items()},
            settings=np.str_(json.dumps(record)),  # everything, guidance variants included
        )
        atomic_write_bytes(out, buf.getvalue())


def _npz_types() -> dict:
    """The settings an .npz holds as arrays of their own, with their types (all of them are in
    its `settings` JSON)."""
    import numpy as np

    return {
        "scale": np.float64, "w": np.float64, "convention": np.str_, "given": np.str_,
        "sampler": np.str_, "steps": np.int64, "eta": np.float64, "seed": np.int64,
        "checkpoint": np.str_,
    }  # fmt: skip
