"""Pictures of a model during and after training: preview grids (rows = classes), the grid of
real training images to hold them against, and guidance strips (rows = classes, columns =
scales, the same noise in every cell of a row). Denoising animations are animation.py's.

Owns: what goes in each picture and how it is sampled (the preview settings of the run's
config: sampler, steps, scale); pictures.images draws them.
"""

from __future__ import annotations

import torch

from cfgdiff.config import RunConfig
from cfgdiff.pictures.images import labelled_grid
from cfgdiff.sampling.generate import class_grid_labels, generate
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.settings import SamplingSettings

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


def preview_settings(cfg: RunConfig, precision: str, steps: int | None = None) -> SamplingSettings:
    """How previews, strips and the training evaluator sample: the preview sampler and steps
    of the run's config, in the precision it trains in, on the network's device."""
    t = cfg.train
    return SamplingSettings(
        sampler=t.preview_sampler, steps=steps or t.preview_steps, precision=precision
    )


def preview_grid(net, cfg: RunConfig, class_names, precision: str, conditions=None):
    """Rows = classes (shown_classes), `preview_per_class` samples each at the preview scale.
    conditions: for a text model, class labels -> caption embeddings (text.TextConditions)."""
    t = cfg.train
    classes = shown_classes(cfg.model.num_classes)
    labels = class_grid_labels(classes, t.preview_per_class)
    imgs = generate(
        net,
        cfg,
        labels if conditions is None else conditions(labels),
        settings=preview_settings(cfg, precision),
        guidance=Guidance(scale=t.preview_scale),
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
    settings: SamplingSettings,
    scales=STRIP_SCALES,
    conditions=None,
):
    """Rows = classes (shown_classes), columns = guidance scales; every cell starts from the
    same noise (stream 0 of `settings`' seed). conditions: as preview_grid's."""
    classes = shown_classes(cfg.model.num_classes)
    labels = torch.tensor([c for c in classes for _ in scales])
    per = torch.tensor([float(s) for _ in classes for s in scales])
    imgs = generate(
        net,
        cfg,
        labels if conditions is None else conditions(labels),
        settings=settings,
        guidance=Guidance(scale=per),
        indices=[0] * len(labels),
    )
    return labelled_grid(
        imgs, len(scales), [str(class_names[c])[:12] for c in classes], [f"s={s:g}" for s in scales]
    )
