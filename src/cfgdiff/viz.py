"""Pictures and sample files: image grids, line plots, folders of single images, and the three
forms `cfgdiff sample` writes (a PNG grid, an .npz of arrays, a folder of PNGs), with Pillow
only."""

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
from cfgdiff.files import atomic_write_bytes


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


def save_png(img: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


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


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    size: tuple[int, int] = (640, 400),
    point_labels: Sequence[str] | None = None,
) -> Image.Image:
    """A minimal line plot: one polyline per series, axes with min/max ticks, a legend."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ml, mr, mt, mb = 70, 20, 30, 45
    pw, ph = size[0] - ml - mr, size[1] - mt - mb

    def fy(v: float) -> float:
        return math.log10(max(v, 1e-12)) if logy else v

    xs = [x for xv, _ in series.values() for x in xv]
    ys = [fy(y) for _, yv in series.values() for y in yv if math.isfinite(y)]
    draw.text((ml, 8), title, fill="black", font=font)
    draw.rectangle([ml, mt, ml + pw, mt + ph], outline="black")
    draw.text((ml + pw // 2 - 3 * len(xlabel), size[1] - 18), xlabel, fill="black", font=font)
    draw.text((4, mt + ph // 2), ylabel, fill="black", font=font)
    if not xs or not ys:
        return img
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return ml + (x - x0) / (x1 - x0) * pw, mt + ph - (fy(y) - y0) / (y1 - y0) * ph

    for i in range(5):  # ticks
        fx = x0 + (x1 - x0) * i / 4
        gx = ml + pw * i / 4
        draw.line([gx, mt + ph, gx, mt + ph + 4], fill="black")
        draw.text((gx - 12, mt + ph + 6), f"{fx:.4g}", fill="black", font=font)
        fv = y0 + (y1 - y0) * i / 4
        gy = mt + ph - ph * i / 4
        draw.line([ml - 4, gy, ml, gy], fill="black")
        label = f"{10**fv:.3g}" if logy else f"{fv:.3g}"
        draw.text((ml - 8 - 6 * len(label), gy - 5), label, fill="black", font=font)
    for k, (name, (xv, yv)) in enumerate(series.items()):
        color = colors[k % len(colors)]
        pts = [px(x, y) for x, y in zip(xv, yv, strict=True) if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts if len(pts) <= 30 else []:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        if point_labels is not None and k == 0:
            for p, text in zip(pts, point_labels, strict=False):
                draw.text((p[0] + 4, p[1] - 12), text, fill=color, font=font)
        draw.text((ml + pw - 150, mt + 6 + 12 * k), name, fill=color, font=font)
    return img


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts: dict[str, int] = {}
        for img, label in zip(images, labels, strict=True):
            folder = folders[int(label)]
            j = counts.get(folder, 0)
            counts[folder] = j + 1
            (tmp / folder).mkdir(exist_ok=True)
            arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(tmp / folder / f"{j:05d}.png")
        meta = {**settings, "class_folders": dict(zip(names, folders, strict=True))}
        meta["counts"] = counts
        (tmp / "settings.json").write_text(json.dumps(meta, indent=2) + "\n")
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
    classes: Sequence[int],
) -> None:
    """Samples in the form `out` asks for (sample_output_kind): a grid with one row of
    `per_class` images per class of `classes`; an .npz with images uint8 (N, C, H, W), labels
    (class indices; class_names[i] names index i), the guidance and sampler settings and
    `record` whole as JSON; or a folder of PNGs with settings.json. `record`: what made them
    (guidance.to_record and the sampler's settings)."""
    import numpy as np

    kind = sample_output_kind(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        write_image_folder(images, labels.tolist(), names, out, record)
    elif kind == "png":
        save_png(labelled_grid(images, per_class, [names[c][:12] for c in classes]), out)
    else:
        buf = io.BytesIO()
        np.savez(
            buf,
            images=images.numpy(),
            labels=labels.numpy(),
            class_names=np.array(list(names), dtype=np.str_),
            scale=np.float64(record["scale"]),
            w=np.float64(record["w"]),
            convention=np.str_(record["convention"]),
            given=np.str_(record["given"]),
            sampler=np.str_(record["sampler"]),
            steps=np.int64(record["steps"]),
            eta=np.float64(record["eta"]),
            seed=np.int64(record["seed"]),
            checkpoint=np.str_(record["checkpoint"]),
            settings=np.str_(json.dumps(record)),  # everything, guidance variants included
        )
        atomic_write_bytes(out, buf.getvalue())
