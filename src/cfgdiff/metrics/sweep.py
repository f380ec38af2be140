"""The guidance sweep: every metric at several guidance scales, from the same noise, and the
files that show the trade-off.

Owns: sampling n images per scale in one job (sample i gets the same noise at every scale),
measuring each scale against one reference, and the sweep folder: sweep.csv (one row per scale
and the real floor), sweep.json, the plots fid_vs_scale, accuracy_vs_scale,
precision_recall_vs_scale and fid_vs_is (each .png and .svg; plots.py draws them) and strip.png.
A text model's sweep (`text_sweep`) is its prompt and attribute adherence at each scale
(text_adherence.py): sweep.csv, sweep.json and adherence_vs_scale (.png and .svg).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from cfgdiff import dist
from cfgdiff.files import atomic_write_csv, atomic_write_json
from cfgdiff.guidance import Guidance
from cfgdiff.metrics.evaluate import METRIC_KEYS, Reference, floor, measure
from cfgdiff.metrics.text_adherence import ADHERENCE_KEYS, FIDELITY_KEYS, text_adherence
from cfgdiff.plots import adherence_plot, sweep_plots
from cfgdiff.previews import guidance_strip
from cfgdiff.sample import generate
from cfgdiff.viz import save_png

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# The sweep's plots (plots.sweep_plots), each written as NAME.png and NAME.svg.
PLOTS = ("fid_vs_scale", "accuracy_vs_scale", "precision_recall_vs_scale", "fid_vs_is")


def default_sweep_dir(checkpoint: Path) -> Path:
    """Where a sweep of a checkpoint goes: RUN/sweep for RUN/checkpoints/step-N, FILE-sweep
    beside a model file."""
    if checkpoint.is_file():
        return checkpoint.with_name(checkpoint.stem + "-sweep")
    return checkpoint.parent.parent / "sweep"


def sweep(
    loaded,
    guidance: Guidance,
    scales: list[float],
    n: int,
    ref: Reference,
    out: Path,
    *,
    record: dict,
    sampler: str,
    steps: int,
    spacing: str,
    eta: float,
    seed: int,
    batch_size: int | None,
    compile: str,
    device: torch.device,
    precision: str,
    log=None,
    world: dist.World | None = None,
) -> dict | None:
    """Sample n images at each scale with `guidance` (its scale replaced per sample), measure
    each scale and the real floor against `ref`, and write the sweep folder `out`. `loaded`:
    checkpoint.load_for_sampling's. Returns what sweep.json holds: `record` (how it was sampled,
    without a single scale) then the scales, rows and floor. `world`: the processes of a
    torchrun job, which share the sampling; rank 0 alone measures and writes (the others
    return None)."""
    world = world or dist.World()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        log = None
    k = loaded.cfg.model.num_classes
    per_sample = torch.tensor([s for s in scales for _ in range(n)], dtype=torch.float32)
    labels = (torch.arange(n) % k).repeat(len(scales))
    t0 = time.perf_counter()
    images = generate(
        loaded.net, loaded.cfg, labels, guidance=dataclasses.replace(guidance, scale=per_sample),
        sampler=sampler, steps=steps, eta=eta, spacing=spacing, seed=seed, batch_size=batch_size,
        indices=list(range(n)) * len(scales),  # the same noise at every scale
        device=device, precision=precision, compile=compile, log=log, world=world,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    rows = []
    for i, s in enumerate(scales):
        m = measure(ref, images[i * n : (i + 1) * n], labels[:n], world)
        rows.append({"scale": s, "w": s - 1, **{key: m[key] for key in METRIC_KEYS}})
        rows[-1].update(kid_std=m["kid_std"], is_std=m["is_std"])
        if log is not None:
            log(
                f"s={s:g}: FID {m['fid']:.3f}, IS {m['is']:.3f}, accuracy "
                f"{m['class_accuracy']:.4f}, precision {m['precision']:.3f}, recall "
                f"{m['recall']:.3f}"
            )
    real = floor(ref, world)
    if not world.is_main:
        return None
    real_row = {"scale": "real", "w": "", **{key: real[key] for key in METRIC_KEYS}}
    real_row.update(kid_std=real["kid_std"], is_std=real["is_std"])
    atomic_write_csv(out / "sweep.csv", [*rows, real_row], list(rows[0]))
    record = {k: v for k, v in record.items() if k not in ("scale", "w")}
    result = {
        **record, "scales": scales, "n": n, "dataset": ref.dataset,
        "features": ref.features.name, "rows": rows, "real_floor": real,
        "sampling_images_per_s": len(labels) / dt,
    }  # fmt: skip
    atomic_write_json(out / "sweep.json", result)
    sweep_plots(scales, rows, real, ref.features.name, out)
    strip = guidance_strip(
        loaded.net, loaded.cfg, loaded.cfg.label_names(), device, precision, seed=seed,
        scales=scales, steps=steps,
    )  # fmt: skip
    save_png(strip, out / "strip.png")
    return result


def text_sweep(loaded, scales: list[float], n: int, out: Path, **kwargs) -> dict | None:
    """A text model's sweep: text_adherence (its keyword arguments: guidance, record, sampler,
    steps, ..., world) at every scale, written to the sweep folder `out` as sweep.csv (a row per
    scale), sweep.json (the record) and the adherence_vs_scale plot. Rank 0 of a torchrun job
    alone writes and returns the record (the others share the sampling and return None)."""
    world = kwargs.get("world") or dist.World()
    result = text_adherence(loaded, scales, n, **kwargs)
    if not world.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    fields = ["scale", "w", "n", *ADHERENCE_KEYS, *FIDELITY_KEYS]
    atomic_write_csv(out / "sweep.csv", result["rows"], fields)
    atomic_write_json(out / "sweep.json", result)
    adherence_plot(result["rows"], out / "adherence_vs_scale")
    return result
