"""A whole training run from what a user asks for: a preset, a dataset, overrides, resume.

Owns the decisions made once before the loop starts: the run's config (config.resolve_config:
the preset or the resumed run's config, the dataset's changes, the overrides), the data at the
run's size and channels, the device and precision (a resumed run keeps the precision it trained
with where "auto" would now pick another), whether to compile (runtime.compile_training), and
the in-training evaluator. Then it calls the loop (loop.train).

Under torchrun the same decisions are made on every process (the global batch refused first
when it does not split over them); rank 0 reads the data first, so that a cache is written
once, and alone builds and runs the in-training evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cfgdiff import checkpoint as ckpt_io
from cfgdiff import dist
from cfgdiff.config import RunConfig
from cfgdiff.data import DatasetName, check_name, default_data_dir, load_dataset
from cfgdiff.data.shards import decode_own_shards
from cfgdiff.errors import CheckpointError, ConfigError
from cfgdiff.files import refuse_overlap
from cfgdiff.presets import (
    MACHINE_PRESETS,
    budget_preset,
    config_for_dataset,
    machine_preset,
    resolve_config,
)
from cfgdiff.records import checkpoint_step
from cfgdiff.run_layout import CHECKPOINTS
from cfgdiff.runtime import compile_training, describe_machine, resolve_device, resolve_precision
from cfgdiff.train.loop import TrainOptions, TrainResult, check_budget, train
from cfgdiff.train.state import Event

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunRequest:
    """What a user asks of a training run (the `cfgdiff train` flags, as parameters)."""

    run_dir: Path
    dataset: str | None = None  # default mnist; on resume the run's
    preset: str | None = None  # default cpu-demo; on resume the run's (another is refused)
    overrides: dict[str, Any] = field(default_factory=dict)  # {"train.lr": 1e-3, ...}
    resume: bool = False
    data_dir: Path | None = None
    image_size: int | None = None  # default the data's (on resume the run's)
    channels: int | None = None  # default the data's (on resume the run's)
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    channels_last: bool = False
    time_budget: float | None = None  # seconds; sizes a new run's step count


@dataclass
class PreparedRun:
    """A run ready to train: everything decided, nothing trained yet."""

    request: RunRequest
    cfg: RunConfig
    data: Any  # data.Dataset
    device: torch.device
    machine: str  # runtime.describe_machine
    precision: str
    compile: bool
    evaluator: Callable | None
    start_notes: tuple[str, ...]  # said when training starts (after the resume's own checks)


def prepare(req: RunRequest, log: Log | None = None) -> PreparedRun:
    """Decide everything about the run `req` asks for, refusing bad requests before anything
    is written. `log` hears notes (a dataset's preset change, the data being read)."""
    if req.dataset is not None:
        check_name(req.dataset)
    check_budget(req.time_budget, req.resume, "train.steps" in req.overrides)
    if req.run_dir.exists() and not req.run_dir.is_dir():
        raise ConfigError(f"`run_dir` {req.run_dir}: is a file; `run_dir` names a folder here")
    device = resolve_device(req.device)
    found = resumed = None
    root = req.run_dir / CHECKPOINTS
    if req.resume:  # the checkpoint the loop will choose, and what it passes over (said there)
        choice = ckpt_io.choose(root, ckpt_io.check_resumable)  # each MANIFEST checked first
        found, resumed = choice.require("`resume=True`", root), choice.value
    # before the data is read: a step-N entry past the start that cfgdiff did not write
    ckpt_io.clear_to_save(root, checkpoint_step(found.name) if found is not None else 0)
    precision, notes = _precision(req, found, device)
    preset, chosen = req.preset, None
    if preset in MACHINE_PRESETS:  # a resumed run keeps the preset it was trained with
        preset, chosen = (None, None) if resumed else machine_preset(preset, device.type, precision)
    elif preset is None and req.time_budget is not None and not req.resume:
        preset, chosen = budget_preset(req.time_budget, device.type, precision)
    resolved = resolve_config(req.overrides, preset=preset, dataset=req.dataset, resumed=resumed)
    if chosen is not None and log is not None:
        log(chosen)
    folder = DatasetName.parse(resolved.dataset).folder
    if folder is not None:  # the run's pictures would become images of the dataset
        refuse_overlap(req.run_dir, [("the dataset folder", folder)], "`run_dir`")
    for note in resolved.notes:
        if log is not None:
            log(note)
    # A resumed run reads its data at the checkpoint's size and channels; a new run at the
    # data's own unless asked otherwise.
    size, channels = req.image_size, req.channels
    if resumed is not None:
        size, channels = size or resumed.model.image_size, channels or resumed.model.in_channels
    world = dist.world()
    if world.enabled:
        dist.per_rank_batch(resolved.config.train.batch_size, world)
    shards = DatasetName.parse(resolved.dataset).shards
    if world.enabled and shards is not None:  # each process decodes its own shards first
        decode_own_shards(shards, size, channels, req.data_dir or default_data_dir(),
                          (world.rank, world.size), log=log)  # fmt: skip
        dist.barrier(world)
    with dist.main_first(world):  # rank 0 writes the data cache, the others read it
        data = load_dataset(
            resolved.dataset, req.data_dir, image_size=size, channels=channels, log=log
        )
    cfg = config_for_dataset(resolved.config, data, resolved.dataset)
    evaluator = None
    if cfg.train.eval_every and world.is_main:
        from cfgdiff.metrics.evaluate import TrainingEvaluator

        evaluator = TrainingEvaluator(
            cfg, dataset=resolved.dataset, data_dir=req.data_dir, device=device,
            precision=precision, log=log,
        )  # fmt: skip
    compiled = compile_training(
        req.compile, device, cfg.train.steps, cfg.train.batch_size, req.time_budget
    )
    machine = describe_machine(device)
    return PreparedRun(req, cfg, data, device, machine, precision, compiled, evaluator, notes)


def _precision(req: RunRequest, found: Path | None, device: torch.device):
    """The precision to train in, and the note to give when a resume keeps its own: a resumed
    run keeps the precision it trained with on this kind of device, even where auto now picks
    another (a newer policy, another CPU), so its loss trace goes on as it was."""
    precision = resolve_precision(req.precision, device)
    if found is None or req.precision != "auto":
        return precision, ()
    try:
        was = ckpt_io.recorded_precision(found)
    except CheckpointError:  # unreadable: train() verifies the checkpoint and says why
        was = None
    if was is None or was[0] != device.type or was[1] == precision:
        return precision, ()
    note = (
        f"`precision=auto`: {was[1]}, as the run trained (auto would pick {precision} here; "
        f"pass `precision` {precision} to switch)"
    )
    return was[1], (note,)


def run(
    prepared: PreparedRun,
    *,
    log: Log | None = None,
    on_event: Event | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the prepared run (loop.train with what prepare decided)."""
    p, req = prepared, prepared.request

    def emit(name: str, info: dict) -> None:
        if name == "start" and log is not None:
            for note in p.start_notes:
                log(note)
        if on_event is not None:
            on_event(name, info)

    options = TrainOptions(
        device=p.device, precision=p.precision, resume=req.resume, evaluator=p.evaluator,
        compile=p.compile, channels_last=req.channels_last, time_budget=req.time_budget,
    )  # fmt: skip
    return train(p.cfg, req.run_dir, p.data, options, on_event=emit, should_stop=should_stop)
