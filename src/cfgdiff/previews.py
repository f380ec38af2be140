"""Pictures of a model: preview grids (rows = classes), the grid of real training images to hold
them against, and guidance strips (rows = classes, columns = scales, the same noise in every
cell of a row).

Owns: what goes in each picture and how it is sampled (the preview settings of the run's
config); viz.py draws them.
"""

from __future__ import annotations

import torch

from cfgdiff.config import RunConfig
from cfgdiff.sample import class_grid_labels, generate
from cfgdiff.viz import labelled_grid

STRIP_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)


def preview_grid(net, cfg: RunConfig, class_names, device, precision: str, seed: int = 0):
    t = cfg.train
    classes = list(range(cfg.model.num_classes))
    labels = class_grid_labels(classes, t.preview_per_class)
    imgs = generate(
        net,
        cfg,
        labels,
        scale=t.preview_scale,
        sampler=t.preview_sampler,
        steps=t.preview_steps,
        seed=seed,
        device=device,
        precision=precision,
    )
    return labelled_grid(imgs, t.preview_per_class, [str(c)[:12] for c in class_names])


def real_grid(data, per_class: int):
    """The first `per_class` training images of each class as training reads them (size,
    channels), laid out like the preview grids: the baseline to hold them against."""
    rows = []
    for c in range(len(data.class_names)):
        idx = (data.labels == c).nonzero().flatten()[:per_class]
        row = data.images[idx]
        if len(row) < per_class:  # a class with fewer images: blank (white) cells
            pad = torch.full((per_class - len(row), *row.shape[1:]), 255, dtype=torch.uint8)
            row = torch.cat([row, pad])
        rows.append(row)
    return labelled_grid(torch.cat(rows), per_class, [str(c)[:12] for c in data.class_names])


def guidance_strip(
    net,
    cfg: RunConfig,
    class_names,
    device,
    precision: str,
    seed: int = 0,
    scales=STRIP_SCALES,
    steps: int | None = None,
):
    """Rows = classes, columns = guidance scales; every cell starts from the same noise."""
    k = cfg.model.num_classes
    labels = torch.tensor([c for c in range(k) for _ in scales])
    per = torch.tensor([float(s) for _ in range(k) for s in scales])
    imgs = generate(
        net,
        cfg,
        labels,
        scale=per,
        sampler=cfg.train.preview_sampler,
        steps=steps or cfg.train.preview_steps,
        seed=seed,
        indices=[0] * len(labels),
        device=device,
        precision=precision,
    )
    return labelled_grid(
        imgs, len(scales), [str(c)[:12] for c in class_names], [f"s={s:g}" for s in scales]
    )
