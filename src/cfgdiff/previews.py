"""Pictures of a model: preview grids (rows = classes), the grid of real training images to hold
them against, guidance strips (rows = classes, columns = scales, the same noise in every cell of
a row) and denoising animations (the same layout, one frame per sampler step).

Owns: what goes in each picture and how it is sampled (the preview settings of the run's
config); viz.py draws them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from cfgdiff.config import RunConfig
from cfgdiff.errors import ConfigError
from cfgdiff.guidance import Guidance
from cfgdiff.sample import class_grid_labels, generate, to_uint8
from cfgdiff.viz import PROMPT_LABEL_CHARS, captioned, labelled_grid

STRIP_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
# Rows of a preview grid, real grid or guidance strip: a run of more classes shows this many,
# spread evenly over them, so that its pictures cost the same whatever the number of classes.
MAX_SHOWN_CLASSES = 20


def shown_classes(num_classes: int, cap: int = MAX_SHOWN_CLASSES) -> list[int]:
    """Every class when there are at most `cap`; else `cap` of them spread evenly, the first
    and the last among them."""
    if num_classes <= cap:
        return list(range(num_classes))
    return sorted({round(i * (num_classes - 1) / (cap - 1)) for i in range(cap)})


# What an animation shows: the predicted clean image x0_hat, or the noisy x_t itself.
SHOWS = {"x0": "predicted x0", "xt": "x_t"}
ANIMATION_MAX_IMAGES = 400  # images per frame: an animation is for looking at


def preview_grid(
    net, cfg: RunConfig, class_names, device, precision: str, seed: int = 0, conditions=None
):
    """Rows = classes (shown_classes), `preview_per_class` samples each at the preview scale.
    conditions: for a text model, class labels -> caption embeddings (text.TextConditions)."""
    t = cfg.train
    classes = shown_classes(cfg.model.num_classes)
    labels = class_grid_labels(classes, t.preview_per_class)
    imgs = generate(
        net,
        cfg,
        labels if conditions is None else conditions(labels),
        scale=t.preview_scale,
        sampler=t.preview_sampler,
        steps=t.preview_steps,
        seed=seed,
        device=device,
        precision=precision,
    )
    return labelled_grid(imgs, t.preview_per_class, [str(class_names[c])[:12] for c in classes])


def real_grid(data, per_class: int):
    """The first `per_class` training images of each class (shown_classes) as training reads
    them (size, channels), laid out like the preview grids: the baseline to hold them against."""
    rows = []
    classes = shown_classes(len(data.class_names))
    for c in classes:
        idx = (data.labels == c).nonzero().flatten()[:per_class]
        row = data.images[idx]
        if len(row) < per_class:  # a class with fewer images: blank (white) cells
            pad = torch.full((per_class - len(row), *row.shape[1:]), 255, dtype=torch.uint8)
            row = torch.cat([row, pad])
        rows.append(row)
    names = [str(data.class_names[c])[:12] for c in classes]
    return labelled_grid(torch.cat(rows), per_class, names)


def guidance_strip(
    net,
    cfg: RunConfig,
    class_names,
    device,
    precision: str,
    seed: int = 0,
    scales=STRIP_SCALES,
    steps: int | None = None,
    conditions=None,
):
    """Rows = classes (shown_classes), columns = guidance scales; every cell starts from the
    same noise. conditions: as preview_grid's."""
    classes = shown_classes(cfg.model.num_classes)
    labels = torch.tensor([c for c in classes for _ in scales])
    per = torch.tensor([float(s) for _ in classes for s in scales])
    imgs = generate(
        net,
        cfg,
        labels if conditions is None else conditions(labels),
        scale=per,
        sampler=cfg.train.preview_sampler,
        steps=steps or cfg.train.preview_steps,
        seed=seed,
        indices=[0] * len(labels),
        device=device,
        precision=precision,
    )
    return labelled_grid(
        imgs, len(scales), [str(class_names[c])[:12] for c in classes], [f"s={s:g}" for s in scales]
    )


@dataclasses.dataclass
class Animation:
    """denoising_animation's result: the frames, and the final images with their labels and
    scales in the frames' order (row by row; in a row, scale by scale)."""

    frames: list
    images: torch.Tensor
    labels: torch.Tensor
    scales: list[float]


def denoising_animation(
    net,
    cfg: RunConfig,
    classes: Sequence[int] | torch.Tensor,
    *,
    scales: Sequence[float],
    per_class: int = 1,
    names: Sequence[str] | None = None,
    guidance: Guidance | None = None,
    sampler: str = "dpmpp-2m",
    steps: int = 20,
    eta: float = 0.0,
    spacing: str = "trailing",
    seed: int = 0,
    device="cpu",
    precision: str = "fp32",
    show: str = "x0",
    max_frames: int = 60,
    log=None,
) -> Animation:
    """The denoising trajectory as frames: one row per class of `classes`, in each row
    `per_class` images at each scale of `scales` side by side, one frame per sampler step (every
    k-th step and the last when there are more than `max_frames`). `show`: "x0" (the predicted
    clean image, x0_hat) or "xt" (the noisy sample itself).

    Image j of class row r starts from noise stream r * per_class + j at every scale, which is
    the stream `cfgdiff sample --classes ... --per-class per_class` gives it: each scale's images
    are that command's. `guidance`: its variants are kept, its scale replaced by `scales`.

    A text model's rows are prompts: `classes` is then their (R, cond_dim) embeddings
    (text.embed_prompts) and `names` the prompts, the rows' labels (default: class names)."""
    if show not in SHOWS:
        raise ConfigError(f"`show` must be one of {', '.join(SHOWS)}, got {show!r}")
    if not scales:
        raise ConfigError("`scales`: at least one guidance scale")
    if per_class < 1 or len(classes) == 0:
        raise ConfigError("`per_class` and `classes`: at least one image of one class")
    if max_frames < 1:
        raise ConfigError(f"`max_frames` must be >= 1, got {max_frames}")
    n = len(classes) * len(scales) * per_class
    if n > ANIMATION_MAX_IMAGES:
        raise ConfigError(
            f"`animate` draws at most {ANIMATION_MAX_IMAGES} images a frame, got {n} "
            f"({len(classes)} classes x {len(scales)} scales x {per_class} per class)"
        )
    cells = [(r, s, j) for r in range(len(classes)) for s in scales for j in range(per_class)]
    text = isinstance(classes, torch.Tensor) and classes.is_floating_point()
    if text:
        labels = classes[torch.tensor([r for r, _, _ in cells], dtype=torch.long)]
    else:
        labels = torch.tensor([classes[r] for r, _, _ in cells], dtype=torch.long)
    base = guidance or Guidance()
    if len(scales) == 1:  # a float scale: the images are exactly `cfgdiff sample --scale s`'s
        g = dataclasses.replace(base, scale=float(scales[0]))
    else:
        g = dataclasses.replace(base, scale=torch.tensor([float(s) for _, s, _ in cells]))
    every = math.ceil(steps / max_frames)
    shown = {0, steps - 1, *range(every - 1, steps, every)}
    grabbed: dict[int, torch.Tensor] = {}

    def grab(i, t, x_t, x0_hat):
        if i in shown:
            grabbed[i] = to_uint8(x0_hat if show == "x0" else x_t).cpu()

    images = generate(
        net, cfg, labels, guidance=g, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
        seed=seed, batch_size=n, indices=[r * per_class + j for r, _, j in cells],
        device=device, precision=precision, log=log, callback=grab,
    )  # fmt: skip
    if names is not None:
        rows = [str(name)[:PROMPT_LABEL_CHARS] for name in names]
    else:
        class_names = cfg.label_names()
        rows = [str(class_names[c])[:12] for c in classes]
    cols = [f"s={s:g}" if j == 0 else "" for s in scales for j in range(per_class)]
    ncols = len(scales) * per_class
    frames = [
        captioned(
            labelled_grid(grabbed[i], ncols, rows, cols), f"step {i + 1}/{steps}: {SHOWS[show]}"
        )
        for i in sorted(grabbed)
    ]
    if cfg.model.in_channels == 1:
        frames = [f.convert("L") for f in frames]
    return Animation(frames, images, labels, [float(s) for _, s, _ in cells])
