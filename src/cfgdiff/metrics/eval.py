"""`cfgdiff eval` as a library call: `EvalRequest` -> `evaluate` -> `Evaluation`.

Owns eval's rules and defaults: a checkpoint sampled at one scale (n samples, 1000 by default,
rows chosen by the judge of its kind of condition: judging.py), or samples made elsewhere
(`samples`: an .npz or a folder, measured against `reference.dataset`, nothing sampled); the
evaluation's record (how it was sampled, on which machine, what was measured) and its JSON
file. reports.py says it in lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cfgdiff import dist
from cfgdiff.config import bounded, check_ranges
from cfgdiff.errors import ConfigError
from cfgdiff.files import atomic_write_json, check_output_file, refuse_overlap
from cfgdiff.metrics.evaluate import ReferenceOptions
from cfgdiff.metrics.judging import judge_of, measure_scales
from cfgdiff.metrics.reports import eval_lines
from cfgdiff.sampling.request import (
    SampleRequest,
    check_before_work,
    guidance_scale,
    job_for,
    load_model,
    model_inputs,
)

DEFAULT_N = 1000  # samples of an evaluation


@dataclass(frozen=True)
class EvalRequest:
    """What a user asks of an evaluation (`cfgdiff eval`'s flags as parameters): `sampling`'s
    checkpoint at its scale (or w), its guidance and settings (its `out` and `per_class` are
    not read); or `samples` made elsewhere, against `reference.dataset`."""

    sampling: SampleRequest | None = None
    n: int | None = bounded(None, 10, 1_000_000)  # samples in all (default DEFAULT_N)
    reference: ReferenceOptions = field(default_factory=ReferenceOptions)
    samples: Path | None = None  # an .npz or a folder of class folders, measured as they are
    json: Path | None = None  # also write the record here

    def validate(self) -> None:
        """The rules of what goes with what, before any work."""
        check_ranges(self)
        if self.samples is not None:
            if self.sampling is not None:
                raise ConfigError(
                    "`samples`: not with `checkpoint`, `scale` or `w` (nothing is sampled)"
                )
            if self.n is not None:
                raise ConfigError(
                    "`samples`: not with `n` (every sample in the file or folder is used)"
                )
            if self.reference.dataset is None:
                raise ConfigError(
                    "`samples`: `dataset` is required (the real data to compare with)"
                )
            return
        if self.sampling is None or self.sampling.checkpoint is None:
            raise ConfigError("eval: `checkpoint` is required (or use: eval train-classifier)")
        if self.sampling.scale is None and self.sampling.w is None:
            raise ConfigError("eval: one of `scale` or `w` is required")

    def outputs(self) -> None:
        """Refuse, before any work, a `json` that cannot be written or that is an input."""
        if self.json is None:
            return
        check_output_file(self.json, "`json`")
        inputs = [("the samples", self.samples), *self.reference.inputs()]
        if self.sampling is not None:
            inputs += model_inputs(self.sampling.checkpoint, self.sampling.guide_checkpoint)
        refuse_overlap(self.json, inputs, "`json`")


@dataclass
class Evaluation:
    """An evaluation's record (what --json writes) and the names of the classes measured."""

    record: dict
    metric: str  # the judge's (judging.JUDGES), "classes" for samples made elsewhere
    names: list[str]

    def lines(self) -> list[str]:
        return eval_lines(self)

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.record)


def evaluate(req: EvalRequest, *, log=None, world: dist.World | None = None) -> Evaluation | None:
    """Run the evaluation `req` asks for. Under torchrun (`world`) every process samples its
    share; rank 0 alone gets the Evaluation (the others None) and writes `req.json`."""
    req.validate()
    req.outputs()
    world = world or dist.World()
    if req.samples is not None:
        return _evaluate_samples(req, log, world)
    from cfgdiff.runtime import describe_machine

    sr = req.sampling
    scale, given = guidance_scale(sr.scale, sr.w)
    # everything checked before the judge: building the reference may train one for minutes
    model, device = load_model(sr)
    for s in model.skipped if log is not None and world.is_main else ():
        log(s.line())  # the run's checkpoints passed over for the one evaluated
    check_before_work(model, sr)
    judge = judge_of(
        model, sr.asks, req.n or DEFAULT_N, req.reference, device=device, log=log, world=world
    )
    job = job_for(model, sr.asks, sr, scale, given, rows=judge.rows)
    for s in job.guide_skipped if log is not None and world.is_main else ():
        log(s.line())
    if log is not None and world.is_main:
        log(f"network: {job.backend_words()}")
    (row,), per_s = measure_scales(job, judge, [scale], log=log if world.is_main else None,
                                   world=world)  # fmt: skip
    floor = judge.floor(world)
    if not world.is_main:
        return None
    base = {
        **job.record(), "n": judge.n, "sampling_images_per_s": per_s, "device": device.type,
        "machine": describe_machine(device),
    }  # fmt: skip
    result = Evaluation(
        judge.eval_record(base, row, floor), model.kind.metric, model.cfg.label_names()
    )
    if req.json is not None:
        result.write(req.json)
    return result


def _evaluate_samples(req: EvalRequest, log, world: dist.World) -> Evaluation | None:
    """Samples made elsewhere (another sampler, another tool's model), against the dataset, at
    the samples' size and channels. Under torchrun rank 0 alone does it (nothing to sample)."""
    from cfgdiff.metrics.evaluate import evaluation, samples_reference

    if not world.is_main:
        return None
    ref, images, labels, names = samples_reference(req.samples, req.reference, log=log)
    record = evaluation(ref, images, labels, {"samples": str(req.samples), "n": len(images)})
    result = Evaluation(record, "classes", list(names))
    if req.json is not None:
        result.write(req.json)
    return result
