"""Denoising animations: a job's rows (classes or prompts) at one or several guidance scales
side by side, one frame per sampler step, showing the predicted clean image or the noisy one.

Owns: what a frame holds and which steps become frames; the images come from the job's own
sampling (sampling.generate's per-step callback), so its last frame's images are the ones
`cfgdiff sample --out` writes for the same job. pictures.images draws and saves them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from cfgdiff.errors import ConfigError
from cfgdiff.pictures.images import captioned, labelled_grid
from cfgdiff.sampling.generate import generate, to_uint8
from cfgdiff.sampling.request import SamplingJob

# What an animation shows: the predicted clean image x0_hat, or the noisy x_t itself.
SHOWS = {"x0": "predicted x0", "xt": "x_t"}
ANIMATION_MAX_IMAGES = 400  # images per frame: an animation is for looking at


@dataclasses.dataclass
class Animation:
    """denoising_animation's result: the frames, and the final images with their rows'
    conditions and scales in the frames' order (row by row; in a row, scale by scale)."""

    frames: list
    images: torch.Tensor
    labels: torch.Tensor
    scales: list[float]
    seconds: float = 0.0  # the sampling's


def denoising_animation(
    job: SamplingJob,
    scales: Sequence[float] | None = None,
    *,
    show: str = "x0",
    max_frames: int = 60,
    log=None,
) -> Animation:
    """The denoising trajectory of `job` as frames: one row per row of the job (a class or a
    prompt), in each row the job's `per_class` images at each scale of `scales` (default: the
    job's scale) side by side, one frame per sampler step (every k-th step and the last when
    there are more than `max_frames`). `show`: "x0" (the predicted clean image, x0_hat) or "xt"
    (the noisy sample itself).

    Image j of row r starts from noise stream r * per_class + j at every scale, the stream the
    job's own images have: each scale's images are those of the job at that scale. The job's
    guidance variants are kept, its scale replaced by `scales`."""
    if show not in SHOWS:
        raise ConfigError(f"`show` must be one of {', '.join(SHOWS)}, got {show!r}")
    if scales is not None and not scales:
        raise ConfigError("`scales`: at least one guidance scale")
    if max_frames < 1:
        raise ConfigError(f"`max_frames` must be >= 1, got {max_frames}")
    scales = list(scales) if scales is not None else [job.scale]
    rows, per_class, steps = job.condition, job.per_class, job.settings.steps
    n = len(rows) * len(scales) * per_class
    if n > ANIMATION_MAX_IMAGES:
        raise ConfigError(
            f"`animate` draws at most {ANIMATION_MAX_IMAGES} images a frame, got {n} "
            f"({len(rows)} {rows.row_word} x {len(scales)} scales x {per_class} per class)"
        )
    cells = [(r, s, j) for r in range(len(rows)) for s in scales for j in range(per_class)]
    cond = rows.cond[torch.tensor([r for r, _, _ in cells], dtype=torch.long)]
    if len(scales) == 1:  # a float scale: the images are exactly the job's
        g = dataclasses.replace(job.guidance, scale=float(scales[0]))
    else:
        g = dataclasses.replace(job.guidance, scale=torch.tensor([float(s) for _, s, _ in cells]))
    every = math.ceil(steps / max_frames)
    shown = {0, steps - 1, *range(every - 1, steps, every)}
    grabbed: dict[int, torch.Tensor] = {}

    def grab(i, t, x_t, x0_hat):
        if i in shown:
            grabbed[i] = to_uint8(x0_hat if show == "x0" else x_t).cpu()

    t0 = time.perf_counter()
    images = generate(
        job.model.net, job.model.cfg, cond, guidance=g,
        settings=dataclasses.replace(job.settings, batch_size=n),  # a frame is one batch
        indices=[r * per_class + j for r, _, j in cells], log=log, callback=grab,
    )  # fmt: skip
    cols = [f"s={s:g}" if j == 0 else "" for s in scales for j in range(per_class)]
    ncols = len(scales) * per_class
    frames = [
        captioned(
            labelled_grid(grabbed[i], ncols, rows.row_labels(), cols),
            f"step {i + 1}/{steps}: {SHOWS[show]}",
        )
        for i in sorted(grabbed)
    ]
    if job.model.cfg.model.in_channels == 1:
        frames = [f.convert("L") for f in frames]
    seconds = time.perf_counter() - t0
    return Animation(frames, images, cond, [float(s) for _, s, _ in cells], seconds)


def describe(anim: Animation, job: SamplingJob, scales: Sequence[float], show: str) -> str:
    """What an animation shows, as a command says it."""
    s = job.settings
    return (
        f"{len(anim.frames)} frames of {s.steps} {s.sampler} steps, {SHOWS[show]}; rows = "
        f"{job.condition.row_word}, columns = s {','.join(f'{v:g}' for v in scales)} x "
        f"{job.per_class} (seed {s.seed})"
    )
