"""`cfgdiff sweep` as a library call: `SweepRequest` -> `sweep` -> `Sweep`, every figure of a
model's judge at several guidance scales, from the same noise, and the files that show the
trade-off.

Owns the sweep's rules and defaults (the scales, or the paper's w = s - 1; 5000 samples a scale;
the folder RUN/sweep) and its folder: sweep.csv (a row per scale, and the real floor where it
was measured), sweep.json (the record), and the plots of its kind of model: for a class model
fid_vs_scale, accuracy_vs_scale, precision_recall_vs_scale, fid_vs_is and strip.png, for a text
model adherence_vs_scale (each plot .png and .svg; pictures.plots draws them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cfgdiff import dist
from cfgdiff.config import bounded, check_ranges
from cfgdiff.errors import ConfigError
from cfgdiff.files import atomic_write_csv, atomic_write_json, refuse_overlap
from cfgdiff.metrics.evaluate import ReferenceOptions
from cfgdiff.metrics.judging import judge_of, measure_scales
from cfgdiff.metrics.reports import sweep_lines
from cfgdiff.sampling.request import (
    SampleRequest,
    check_before_work,
    job_for,
    model_inputs,
)

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
DEFAULT_N = 5000  # samples per scale


def default_sweep_dir(checkpoint: Path) -> Path:
    """Where a sweep of a checkpoint goes: RUN/sweep for RUN/checkpoints/step-N, FILE-sweep
    beside a model file."""
    if checkpoint.is_file():
        return checkpoint.with_name(checkpoint.stem + "-sweep")
    return checkpoint.parent.parent / "sweep"


@dataclass(frozen=True)
class SweepRequest:
    """What a user asks of a sweep (`cfgdiff sweep`'s flags as parameters): `sampling`'s
    checkpoint, guidance variants and settings (its scale, `out` and `per_class` are not
    read) at each of `scales` (or of the paper's `ws`, s = w + 1; default DEFAULT_SCALES)."""

    sampling: SampleRequest
    scales: tuple[float, ...] | None = None
    ws: tuple[float, ...] | None = None
    n: int = bounded(DEFAULT_N, 10, 1_000_000)  # samples per scale
    reference: ReferenceOptions = field(default_factory=ReferenceOptions)
    out: Path | None = None  # the sweep folder (default: default_sweep_dir)

    def scale_list(self) -> list[float]:
        if self.scales is not None and self.ws is not None:
            raise ConfigError("pass `scales` or `ws`, not both")
        if self.ws is not None:
            return [w + 1 for w in self.ws]
        return list(self.scales or DEFAULT_SCALES)

    def validate(self) -> None:
        check_ranges(self)
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"`out` {self.out}: is a file; `out` names a folder here")
        if self.out is not None:
            sr = self.sampling
            inputs = model_inputs(sr.checkpoint, sr.guide_checkpoint) + self.reference.inputs()
            refuse_overlap(self.out, inputs, "`out`")


@dataclass
class Sweep:
    """A sweep's record (sweep.json), its folder and its judge's metric."""

    record: dict
    out: Path
    metric: str

    def lines(self) -> list[str]:
        return sweep_lines(self)


def sweep(req: SweepRequest, *, log=None, world: dist.World | None = None) -> Sweep | None:
    """Run the sweep `req` asks for and write its folder. Under torchrun (`world`) every
    process samples its share; rank 0 alone measures, writes and returns the Sweep (the others
    None)."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.runtime import describe_machine, resolve_device
    from cfgdiff.sampling.conditions import Model

    req.validate()
    scales = req.scale_list()
    world = world or dist.World()
    sr = req.sampling
    sr.settings.validate()
    device = resolve_device(sr.settings.device)
    model = Model.of(load_for_sampling(sr.checkpoint, device))
    out = req.out if req.out is not None else default_sweep_dir(model.path)
    for s in model.skipped if log is not None and world.is_main else ():
        log(s.line())  # the run's checkpoints passed over for the one swept
    # everything checked before the judge: building the reference may train one for minutes
    check_before_work(model, sr)
    main_log = log if world.is_main else None
    judge = judge_of(model, sr.asks, req.n, req.reference, device=device, log=log, world=world)
    job = job_for(model, sr.asks, sr, 1.0, rows=judge.rows, guided=any(s != 1 for s in scales))
    for s in job.guide_skipped if log is not None and world.is_main else ():
        log(s.line())
    if main_log is not None:
        main_log(f"network: {job.backend_words()}")
    rows, per_s = measure_scales(job, judge, scales, log=main_log, world=world)
    floor = judge.floor(world)
    if not world.is_main:
        return None
    base = {k: v for k, v in job.record().items() if k not in ("scale", "w")}
    record = {
        **base, "scales": scales, "n": judge.n, **judge.record(),
        "rows": [{k: r[k] for k in judge.sweep_keys} | _extra(r) for r in rows],
        **({"real_floor": floor} if floor is not None else {}),
        "sampling_images_per_s": per_s, "device": device.type,
        "machine": describe_machine(device),
    }  # fmt: skip
    for r in record["rows"]:
        if main_log is not None and "fid" in r and r["fid"] is not None:
            main_log(
                f"s={r['scale']:g}: FID {r['fid']:.3f}, IS {r['is']:.3f}, accuracy "
                f"{r['class_accuracy']:.4f}, precision {r['precision']:.3f}, recall "
                f"{r['recall']:.3f}"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write(out, record, judge, job)
    return Sweep(record, out, model.kind.metric)


def _extra(row: dict) -> dict:
    """What a sweep.json row keeps beyond sweep.csv's columns (a file's prompts, each)."""
    return {"prompt_rows": row["prompt_rows"]} if "prompt_rows" in row else {}


def _write(out: Path, record: dict, judge, job) -> None:
    """The sweep folder: sweep.csv, sweep.json and the plots of the judge's kind."""
    atomic_write_csv(out / "sweep.csv", judge.csv_rows(record), list(judge.sweep_keys))
    atomic_write_json(out / "sweep.json", record)
    judge.plots(record, job, out)
