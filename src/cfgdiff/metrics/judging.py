"""The judge of each kind of condition, and measuring a sampling job at several guidance scales.

Owns: which rows an evaluation samples for n samples (a class model: labels 0, 1, ..., K-1, 0,
...; a text model: whole rounds of its held-out prompts, or of a file's), what it measures on
each scale's samples against which reference, the real-vs-real floor, the options of the real
data each judge reads, and `measure_scales` (every scale sampled in one job from the same noise,
then judged). `JUDGES` is keyed by sampling.conditions.Condition.metric: a new kind of
condition names the judge it is measured by, or brings one. eval.py and sweep.py are the
commands' records around this; reports.py prints them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from cfgdiff import dist
from cfgdiff.errors import ConfigError
from cfgdiff.metrics.adherence import (
    ADHERENCE_KEYS,
    FIDELITY_KEYS,
    MIN_REFERENCE,
    PromptSet,
    adherence_row,
    held_out_set,
    labelled_prompts,
    samples_per_prompt,
)
from cfgdiff.metrics.evaluate import (
    METRIC_KEYS,
    ReferenceOptions,
    build_reference,
    floor,
    judge_for,
    measure,
)
from cfgdiff.sampling.conditions import (
    Asks,
    ClassLabels,
    Condition,
    Model,
    TextPrompts,
    read_lines,
)
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.request import SamplingJob


class ClassJudge:
    """A class model's samples, labels 0..K-1 in turn, against n real images: FID, KID, IS,
    precision/recall and memorisation in the reference's features, class accuracy by the
    dataset's classifier; the real floor is n held-out images measured the same way."""

    reads = ("dataset", "features", "inception")

    def __init__(self, model: Model, asks: Asks, n: int, options: ReferenceOptions, *,
                 device, log=None, world: dist.World | None = None):  # fmt: skip
        cfg, world = model.cfg, world or dist.World()
        with dist.main_first(world):  # rank 0 may train and cache a judge; the others read it
            options = dataclasses.replace(options, device=device)
            self.ref = build_reference(cfg, n, options, log=log if world.is_main else None)
        self.labels = torch.arange(n) % cfg.model.num_classes
        self.rows: Condition = ClassLabels.of_labels(model, self.labels, asks)
        self.n = n

    def measure(self, images: torch.Tensor, scale: float, world=None) -> dict:
        m = measure(self.ref, images, self.labels, world)
        return {"scale": scale, "w": scale - 1, **m}

    def floor(self, world=None) -> dict | None:
        return floor(self.ref, world)

    def record(self) -> dict:
        return {
            "dataset": self.ref.dataset,
            "features": self.ref.features.name,
            "classifier_test_accuracy": self.ref.classifier_meta["test_accuracy"],
        }

    def eval_record(self, base: dict, row: dict, floor: dict | None) -> dict:
        """An evaluation's record: `base` (how it was sampled), the judge, the generated
        samples' figures beside the floor's, and flat copies of the headline numbers."""
        gen = {k: v for k, v in row.items() if k not in ("scale", "w")}
        return {
            **base, **self.record(), "generated": gen, "real_floor": floor,
            "class_accuracy": gen["class_accuracy"], "fid": gen["fid"],
        }  # fmt: skip

    # a sweep's row (sweep.csv's columns)
    sweep_keys = ("scale", "w", *METRIC_KEYS, "kid_std", "is_std")

    def csv_rows(self, record: dict) -> list[dict]:
        """sweep.csv: a row per scale, the real floor last."""
        real = record["real_floor"]
        return [*record["rows"], {"scale": "real", "w": "", **{k: real[k] for k in
                                                                 self.sweep_keys[2:]}}]  # fmt: skip

    def plots(self, record: dict, job: SamplingJob, out: Path) -> None:
        """The sweep's plots (pictures.plots.sweep_plots) and its guidance strip, drawn with
        the preview sampler in the sweep's steps and seed (sampling.previews)."""
        from cfgdiff.pictures.images import save_png
        from cfgdiff.pictures.plots import sweep_plots
        from cfgdiff.sampling.previews import guidance_strip, preview_settings

        sweep_plots(record["scales"], record["rows"], record["real_floor"], record["features"], out)
        cfg, s = job.model.cfg, job.settings
        strip_settings = dataclasses.replace(
            preview_settings(cfg, s.precision, s.steps), seed=s.seed
        )
        strip = guidance_strip(
            job.model.net, cfg, cfg.label_names(), strip_settings, scales=record["scales"]
        )
        save_png(strip, out / "strip.png")


class PromptJudge:
    """A text model's samples of prompts it never saw in training (its run's held-out
    phrasings, or a file's `CLASS<TAB>prompt` lines): the judge's class accuracy, the rank
    correlations of requested and measured attributes, and for the held-out phrasings, which
    ask for the data's mix, FID, IS, precision and recall against real images (adherence.py)."""

    reads = ("dataset",)

    def __init__(self, model: Model, asks: Asks, n: int, options: ReferenceOptions, *,
                 device, log=None, world: dist.World | None = None):  # fmt: skip
        cfg, world = model.cfg, world or dist.World()
        self.prompts = _prompt_set(model, asks)
        self.held_out = asks.prompts_file is None
        self.per_prompt = samples_per_prompt(n, len(self.prompts.prompts))
        self.n_asked, self.n = n, len(self.prompts.prompts) * self.per_prompt
        self.reference = None
        main_log = log if world.is_main else None
        with dist.main_first(world):  # rank 0 may train and cache the judge; the others read it
            if self.held_out:  # they ask for the data's mix: compare with real images
                only = ReferenceOptions(options.dataset, data_dir=options.data_dir, device=device)
                ref = build_reference(cfg, self.n, only, log=main_log, at_most=True)
                self.judge, self.meta = ref.classifier, ref.classifier_meta
                self.reference = ref if ref.n >= MIN_REFERENCE else None
                if self.reference is None and main_log:  # a tiny folder: too few for k-NN
                    main_log(
                        f"only {ref.n} real images to compare the samples with (at least "
                        f"{MIN_REFERENCE}): no FID, IS, precision or recall"
                    )
            else:
                self.judge, self.meta = judge_for(
                    cfg, options.dataset, data_dir=options.data_dir, device=device, log=main_log
                )
        ps = self.prompts
        prompts = [p for p in ps.prompts for _ in range(self.per_prompt)]
        labels = ps.labels.repeat_interleave(self.per_prompt)
        self.rows = TextPrompts.of_prompts(model, prompts, labels, asks)

    def measure(self, images: torch.Tensor, scale: float, world=None) -> dict:
        return adherence_row(
            self.judge, images, self.prompts, self.per_prompt, scale, self.reference, world
        )

    def floor(self, world=None) -> dict | None:
        if self.reference is None:
            return None
        real = floor(self.reference, world)
        return {k: real[k] for k in FIDELITY_KEYS}

    def record(self) -> dict:
        out = {
            "n_asked": self.n_asked, "per_prompt": self.per_prompt,
            "num_prompts": len(self.prompts.prompts), "prompts": self.prompts.source,
            "levels": self.prompts.levels, "dataset": self.meta["dataset"],
            "classifier_test_accuracy": self.meta["test_accuracy"],
        }  # fmt: skip
        if self.reference is not None:
            out |= {"reference_n": self.reference.n, "features": self.reference.features.name}
        return out

    def eval_record(self, base: dict, row: dict, floor: dict | None) -> dict:
        """An evaluation's record: the scale, `base` (how it was sampled), what was measured
        and the row's figures at the top level."""
        rest = {k: v for k, v in base.items() if k not in ("scale", "w")}
        real = {"real_floor": floor} if floor is not None else {}
        return {"scale": row["scale"], "w": row["w"], **rest, **self.record(), **real, **row}

    # a sweep's row (sweep.csv's columns; sweep.json has the per-prompt rows too)
    sweep_keys = ("scale", "w", "n", *ADHERENCE_KEYS, *FIDELITY_KEYS)

    def csv_rows(self, record: dict) -> list[dict]:
        return record["rows"]

    def plots(self, record: dict, job: SamplingJob, out: Path) -> None:
        from cfgdiff.pictures.plots import adherence_plot

        adherence_plot(record["rows"], out / "adherence_vs_scale")


def _prompt_set(model: Model, asks: Asks) -> PromptSet:
    """The prompts a text model is measured on: a file's, or its run's held-out phrasings
    (refused, before any judge or sample, for a run without its caption table and for
    attribute levels on colour images)."""
    cfg = model.cfg
    if asks.prompts_file is not None:
        ps = labelled_prompts(read_lines(asks.prompts_file), str(asks.prompts_file), cfg)
        model.embed(ps.prompts)  # every prompt through the encoder now, before any judge
        return ps
    if model.captions is None:
        raise ConfigError(
            f"`checkpoint` {model.path}: no captions.safetensors beside it (a model file "
            "from cfgdiff export?); the held-out prompts are read from the run folder's "
            "caption table (`prompts_file` FILE measures prompts of your own)"
        )
    ps = held_out_set(model.captions, cfg.label_names())
    if ps.levels and cfg.model.in_channels != 1:
        raise ConfigError(
            "text adherence measures stroke thickness and slant on one-channel images; this "
            f"model makes {cfg.model.in_channels}-channel ones (`prompts_file` FILE measures "
            "class accuracy alone)"
        )
    return ps


# The judge of each Condition.metric.
JUDGES = {"classes": ClassJudge, "prompts": PromptJudge}


def judge_of(
    model: Model, asks: Asks, n: int, options: ReferenceOptions, *, device, log=None, world=None
):
    """The judge of `model`'s kind of condition for n samples, what it reads checked first."""
    kind = model.kind
    kind.check(asks)
    judge = JUDGES[kind.metric]
    options.check(judge.reads, kind.kind)
    return judge(model, asks, n, options, device=device, log=log, world=world)


def measure_scales(
    job: SamplingJob, judge, scales: list[float], *, log=None, world: dist.World | None = None
) -> tuple[list[dict], float]:
    """Sample the job's rows (the judge's) at every scale of `scales` in one job (sample i has
    the same noise at every scale) with the job's guidance and settings, and judge each scale;
    returns a row per scale and the sampling's images per second. Every process of `world`
    calls."""
    rows = job.condition  # the judge's
    n, k = len(rows), len(scales)
    if k == 1:  # a single scale as a float: the images are exactly `cfgdiff sample`'s
        scale = float(scales[0])
    else:
        scale = torch.tensor([float(s) for s in scales for _ in range(n)], dtype=torch.float32)
    cond = rows.cond.repeat(k, *([1] * (rows.cond.ndim - 1)))
    t0 = time.perf_counter()
    images = generate(
        job.model.net, job.model.cfg, cond, settings=job.settings,
        guidance=dataclasses.replace(job.guidance, scale=scale),
        indices=list(range(n)) * k, log=log, world=world,
    )  # fmt: skip
    per_s = n * k / max(time.perf_counter() - t0, 1e-9)
    out = []
    for i, s in enumerate(scales):
        out.append(judge.measure(images[i * n : (i + 1) * n], float(s), world))
    return out, per_s
