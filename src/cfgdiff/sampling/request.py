"""A sampling job from what a user asks for: `SampleRequest` -> `prepare` -> `SamplingJob` ->
`run` -> `Samples`, which write themselves.

Owns the decisions made once before anything is sampled: the guidance scale (s, or the paper's
w = s - 1), the outputs asked for (checked, and refused where they would overwrite an input),
the model loaded (with its caption table), the autoguidance network, the rows (conditions.py:
classes or prompts), the guidance with the condition's reference, and the settings resolved
against the model's own defaults; then the record of how the images were made, which every
output file carries. `cfgdiff sample`, `eval`, `sweep` and the page all build their jobs here
(eval and sweep choose their own rows: metrics.judging).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cfgdiff import dist
from cfgdiff.config import bounded, check_ranges
from cfgdiff.errors import ConfigError
from cfgdiff.files import refuse_overlap
from cfgdiff.pictures.images import animation_format, sample_output_kind, write_samples
from cfgdiff.sampling.backends import choose
from cfgdiff.sampling.conditions import Asks, Condition, Model
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance, scale_from_w
from cfgdiff.sampling.settings import SamplingSettings

Log = Callable[[str], None]
# The range of a guidance scale s a command takes (and of w = s - 1, one lower).
SCALE_RANGE = (-20.0, 100.0)


def guidance_scale(scale: float | None, w: float | None) -> tuple[float | None, str]:
    """The scale s of `scale` or of the paper's `w` (s = w + 1), and which was given ("scale"
    or "w"; both None: (None, "scale"))."""
    if scale is not None and w is not None:
        raise ConfigError("pass `scale` or `w`, not both")
    if w is not None:
        return scale_from_w(w), "w"
    return scale, "scale"


def model_inputs(checkpoint: Path | None, guide_checkpoint: Path | None = None):
    """What an output must not be or lie inside (files.refuse_overlap): the checkpoint and
    autoguidance network read, with their runs' own files (checkpoint.input_paths)."""
    from cfgdiff.checkpoint import input_paths

    inputs: list = []
    for path in (checkpoint, guide_checkpoint):
        if path is not None:
            inputs += input_paths(path)
    return inputs


@dataclass(frozen=True)
class SampleRequest:
    """What a user asks of a sampling job (`cfgdiff sample`'s flags as parameters)."""

    checkpoint: Path  # a checkpoint folder, a run folder (its latest) or a model file
    scale: float | None = None  # guidance scale s; or
    w: float | None = None  # the paper's guidance weight, s = w + 1
    asks: Asks = Asks()  # the rows (classes or prompts) and the guidance reference
    per_class: int = bounded(8, 1, 100_000)  # images per row
    # the guidance variants (interval, rescale, thresholding, APG); its scale is `scale`'s
    guidance: Guidance = Guidance()
    guide_checkpoint: Path | None = None  # autoguidance: a weaker checkpoint as the reference
    settings: SamplingSettings = SamplingSettings()
    # FILE.png (a grid), FILE.npz (arrays) or a new or empty FOLDER, checked before any work
    # (Samples.write writes it; None: the images are only returned)
    out: Path | None = None
    animate: Path | None = None  # FILE.gif or FILE.webp: the denoising, a frame per step
    animate_scales: tuple[float, ...] | None = None  # several scales side by side (no `out`)
    animate_show: str = "x0"  # animation.SHOWS


@dataclass
class SamplingJob:
    """A job ready to sample: everything decided, nothing sampled. `condition`: its rows,
    `per_class` images each; `settings`: resolved (SamplingSettings.resolve)."""

    model: Model
    condition: Condition
    per_class: int
    guidance: Guidance
    settings: SamplingSettings
    given: str = "scale"  # which of `scale` or `w` the user gave
    guide_checkpoint: Path | None = None
    from_model: tuple[str, ...] = ()  # the settings that took the model's own default
    asks: Asks = Asks()  # what the rows and the reference were made from
    guide_skipped: tuple = ()  # checkpoint.Skipped: the guide's run's checkpoints passed over
    backend_reason: str = ""  # why settings.backend runs the network (backends.Choice)

    @property
    def scale(self) -> float:
        return float(self.guidance.scale)

    @property
    def models_sampler(self) -> bool:
        """Whether the sampler is the model's own (none was asked for)."""
        return "sampler" in self.from_model

    def sampler_words(self) -> str:
        """Which sampler, and whether it is the model's own: "ddpm 20 steps (the model's
        own)"."""
        own = "the model's own" if self.models_sampler else "as asked"
        return f"{self.settings.describe()} ({own})"

    def backend_words(self) -> str:
        """What runs the network, in which precision, and why: "onnxruntime fp32 (auto: ...)"."""
        s = self.settings
        return f"{s.backend} {s.precision}" + (
            f" ({self.backend_reason})" if self.backend_reason else ""
        )

    def note(self) -> str:
        """The line a command starts with: which sampler and seed, and what runs the network."""
        seed = self.settings.seed
        return f"sampling with {self.sampler_words()}, seed {seed}; {self.backend_words()}"

    def skipped_lines(self) -> list[str]:
        """A line for each of the run's checkpoints passed over for the one sampled (a run
        folder's newest that is incomplete or broken: checkpoint.choose)."""
        return [s.line() for s in (*self.model.skipped, *self.guide_skipped)]

    def record(self) -> dict:
        """How the images are made, as output files record it (settings.json, .npz, --json):
        the guidance (its convention named), the sampler settings, the checkpoint (and any of
        its run's passed over for it) and the rows' record."""
        guide = self.guide_checkpoint
        skipped = [s.record() for s in (*self.model.skipped, *self.guide_skipped)]
        return {
            **self.guidance.to_record(),
            **self.settings.record(),
            "checkpoint": str(self.model.path),
            **({"skipped_checkpoints": skipped} if skipped else {}),
            "guide_checkpoint": str(guide) if guide is not None else None,
            "sampler_from": "model" if self.models_sampler else "request",
            **self.condition.record(),
        }

    def run(
        self,
        *,
        log: Log | None = None,
        callback: Callable | None = None,
        world: dist.World | None = None,
    ) -> Samples:
        """Sample `per_class` images of each row (split over the processes of `world`)."""
        t0 = time.perf_counter()
        images = generate(
            self.model.net, self.model.cfg, self.condition.repeat(self.per_class).cond,
            settings=self.settings, guidance=self.guidance, log=log, callback=callback,
            world=world,
        )  # fmt: skip
        return self.samples(images, time.perf_counter() - t0)

    def samples(self, images: torch.Tensor, seconds: float = 0.0) -> Samples:
        """This job's images (made by `run`, or by the animation of the job) as Samples."""
        rows = self.condition.repeat(self.per_class)
        record = {**self.record(), "given": self.given}
        return Samples(images, rows, self.condition, self.per_class, record, seconds)


@dataclass
class Samples:
    """A job's images (uint8, N x C x H x W, row by row), its rows (`rows`: one per image;
    `grid_rows`: one per grid row), and the record of how they were made."""

    images: torch.Tensor
    rows: Condition
    grid_rows: Condition
    per_class: int
    record: dict
    seconds: float

    def write(self, out: Path) -> str:
        """Write the images in the form `out` asks for (pictures.images.sample_output_kind): a
        grid, an .npz or a folder of PNGs with settings.json; returns where they went."""
        kind = sample_output_kind(out)
        names, labels = self.rows.file_classes(folder=kind == "folder")
        write_samples(
            out, self.images, labels, names, self.record, per_class=self.per_class,
            rows=self.grid_rows.row_labels(),
        )  # fmt: skip
        return f"{out}/CLASS/NNNNN.png" if kind == "folder" else str(out)

    def summary(self, where: str) -> str:
        """The line a command prints after writing them."""
        r, n = self.record, len(self.images)
        rows = len(self.grid_rows)
        what = f"{n} images" + (f" of {rows} prompts" if "prompts" in r else "")
        negative = ", negative prompt" if "negative_prompt" in r else ""
        return (
            f"wrote {what} to {where} (s={r['scale']:g}, w={r['w']:g}{negative}, "
            f"{r['sampler']} {r['steps']} steps, seed {r['seed']}; "
            f"{n / max(self.seconds, 1e-9):.1f} images/s)"
        )


def prepare(
    req: SampleRequest, *, model: Model | None = None, log: Log | None = None
) -> SamplingJob:
    """Decide everything about the job `req` asks for, refusing a bad request before the model
    is loaded or anything is written. `model`: one already loaded (a server's); else the
    checkpoint is loaded on the settings' device."""
    check_ranges(req)
    scale, given = guidance_scale(req.scale, req.w)
    _check_outputs(req, scale)
    if scale is None:  # --animate-scales alone: the first stands for the job's scale
        scale = req.animate_scales[0]
    if model is None:
        model, _ = load_model(req)
    return job_for(model, req.asks, req, scale, given)


def load_model(req: SampleRequest) -> tuple[Model, torch.device]:
    """The checkpoint `req` names, verified and loaded on its settings' device (checked
    first), with what its conditions need; and that device."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.runtime import resolve_device

    req.settings.validate()
    device = resolve_device(req.settings.device)
    return Model.of(load_for_sampling(req.checkpoint, device)), device


def job_for(
    model: Model,
    asks: Asks,
    req: SampleRequest,
    scale: float,
    given: str = "scale",
    rows: Condition | None = None,
    guided: bool | None = None,
) -> SamplingJob:
    """The job of `model` for the rows `asks` asks for (or `rows`, made from `asks` elsewhere:
    an evaluation's), with `req`'s guidance, guide network, images per row and settings.
    `guided`: whether its batches are guided pairs, for auto's measurement of the backends
    (default: scale != 1; a sweep's job stands for several scales)."""
    from cfgdiff.sampling.generate import network_device

    device = network_device(model.net)
    condition = rows if rows is not None else model.kind.of(model, asks)
    guide_net, guide_skipped = None, ()
    if req.guide_checkpoint is not None:
        from cfgdiff.checkpoint import Loaded, load_guide

        loaded = Loaded(model.path, model.cfg, model.net)
        guide = load_guide(req.guide_checkpoint, loaded, device)
        guide_net, guide_skipped = guide.net, guide.skipped
    guidance = condition.guided(dataclasses.replace(req.guidance, scale=scale, guide_net=guide_net))
    guidance.validate(model.cfg.model.num_classes)
    settings = req.settings.resolve(model.cfg, device)
    # what runs the network: as asked, or auto's measured choice for this job's batches
    images = len(condition) * req.per_class
    guided = scale != 1 if guided is None else guided
    choice = choose(model.net, model.cfg, settings, images, guided=guided)
    return SamplingJob(
        model, condition, req.per_class, guidance, settings.with_backend(choice.backend), given,
        req.guide_checkpoint, req.settings.from_model(), asks, guide_skipped, choice.reason,
    )  # fmt: skip


def check_before_work(model: Model, req: SampleRequest) -> None:
    """What can be refused before a long preparation (an evaluation's judge, a reference): the
    asks the model's kind does not read, the settings against the model, and the guidance
    (its ranges and combinations; the guide network is loaded later)."""
    model.kind.check(req.asks)
    req.settings.resolve(model.cfg, "cpu")
    stand_in = (lambda x, t, y: x) if req.guide_checkpoint is not None else None
    g = dataclasses.replace(
        req.guidance, negative_class=req.asks.negative_class, guide_net=stand_in
    )
    g.validate(model.cfg.model.num_classes)


def _check_outputs(req: SampleRequest, scale: float | None) -> None:
    """What `out`, `animate` and their companions ask for, checked before any work."""
    if scale is None and req.animate_scales is None:
        raise ConfigError("one of the arguments `scale` `w` is required")
    if req.animate is None and (req.animate_scales is not None or req.animate_show != "x0"):
        raise ConfigError("`animate_scales` and `animate_show` go with `animate` FILE")
    if req.animate_scales is not None and req.out is not None:
        raise ConfigError(
            "`out` takes the images of one scale, `scale`: with `animate_scales`, leave out `out`"
        )
    if req.animate is not None:
        animation_format(req.animate)
        if dist.world().enabled:
            raise ConfigError("`animate` runs in one process, not under torchrun")
    if req.out is not None:
        sample_output_kind(req.out)
    inputs = model_inputs(req.checkpoint, req.guide_checkpoint)
    for arg, path in (("`out`", req.out), ("`animate`", req.animate)):
        if path is not None:
            refuse_overlap(path, inputs, arg)
