"""The training loop as an importable function, read top to bottom.

Owns: one run's sequence (state, outputs, the optional compiled step, then steps with their
logging, previews, evaluations and checkpoints, then the end) and the faults that stop it
(a non-finite loss or gradient, running out of memory). What a step carries is state.py's,
the run folder's files run_folder.py's, time accounting budget.py's. Nothing here prints or
exits: progress goes to the `on_event` callback, and a stop is requested through `should_stop`
(the CLI wires both to the terminal and to signals).

Under torchrun (dist.world() of several processes) the same loop runs on every process: the
network in DistributedDataParallel, each process on its part of the global batch; the stop
request, the first non-finite step, the loss and a time budget's step count are agreed over the
processes at the points where one process alone would read them; rank 0 alone holds the run
lock and writes files; the EMA is checked equal on all processes before each checkpoint. Every
collective is called by all processes at the same step, never under a rank condition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from cfgdiff import checkpoint as ckpt_io
from cfgdiff import dist
from cfgdiff.compiled import check_compiled_gradients
from cfgdiff.config import RunConfig
from cfgdiff.diffusion import training_loss
from cfgdiff.ema import EMA
from cfgdiff.errors import ConfigError, RuntimeFault
from cfgdiff.records import checkpoint_step
from cfgdiff.run_layout import CAPTIONS_FILE, CHECKPOINTS
from cfgdiff.runtime import autocast, error_line, is_out_of_memory
from cfgdiff.sampling.previews import guidance_strip, preview_grid, preview_settings, real_grid
from cfgdiff.train.budget import TimeBudget
from cfgdiff.train.run_folder import RunLock, RunOutputs
from cfgdiff.train.state import Event, TrainState, lr_at
from cfgdiff.unet import count_parameters


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    stopped_early: bool
    images_per_s: float
    elapsed_s: float
    last_loss: float | None
    # seconds spent on previews, evaluations, checkpoints and the strip, which a time budget
    # does not count, and on everything else (setup, compilation, the steps), which it does
    aside_s: float = 0.0
    train_s: float = 0.0


@dataclass(frozen=True)
class TrainOptions:
    """How a run trains, beside its config (train's settings object; run.prepare decides them
    from what a user asks: the device, the precision a resume keeps, whether to compile).

    evaluator: called with the EMA network every cfg.train.eval_every steps; its numbers go to
    eval.csv (metrics.evaluate.TrainingEvaluator measures a small-N FID and class accuracy).
    compile: torch.compile the network for the training step, if it compiles and its gradients
    match the eager network's on one batch; otherwise training goes on eagerly (a "compile"
    event says which, and why). channels_last: NHWC memory format. time_budget: seconds of
    training (setup and compilation included; previews, evaluations and checkpoints not) that
    size a new run's step count, and so its LR schedule, in place of cfg.train.steps
    (budget.TimeBudget; a "schedule" event gives the count)."""

    device: torch.device | str = "cpu"
    precision: str = "fp32"  # "fp32" | "bf16": autocast of the forward pass
    resume: bool = False  # continue from the run's latest checkpoint
    final_strip: bool = True  # the guidance strip at the end
    evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None
    compile: bool = False
    channels_last: bool = False
    time_budget: float | None = None


@dataclass(frozen=True)
class _Options(TrainOptions):
    """TrainOptions and the run's listeners and processes, for the loop."""

    emit: Event = lambda name, info: None  # noqa: E731
    should_stop: Callable[[], bool] = lambda: False  # noqa: E731
    world: dist.World = field(default_factory=dist.World)


def train(
    cfg: RunConfig,
    run_dir: Path,
    data,
    options: TrainOptions = TrainOptions(),
    *,
    on_event: Event | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or resume) a run of `cfg` on `data` (a data.Dataset) in run_dir, as `options`
    say: checkpoints in run_dir/checkpoints, the files of run_folder.py beside them. Progress
    goes to `on_event(name, info)`; `should_stop()` asks for a stop after the current step."""
    cfg.validate()
    world = dist.world()
    if world.enabled:
        dist.per_rank_batch(cfg.train.batch_size, world)
    check_budget(options.time_budget, options.resume)
    m = cfg.model
    if (data.channels, data.image_size, data.num_classes) != (
        m.in_channels,
        m.image_size,
        m.num_classes,
    ):
        raise ConfigError(
            f"dataset has channels={data.channels}, image_size={data.image_size}, "
            f"classes={data.num_classes}; model expects {m.in_channels}, {m.image_size}, "
            f"{m.num_classes}"
        )
    run_dir = Path(run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    given = {f.name: getattr(options, f.name) for f in fields(TrainOptions)}
    o = _Options(**{**given, "device": torch.device(options.device)}, world=world)
    if on_event is not None:
        o = dataclasses.replace(o, emit=on_event)
    if should_stop is not None:
        o = dataclasses.replace(o, should_stop=should_stop)
    # rank 0 alone holds the lock; the others never touch the folder's files
    with RunLock(run_dir) if world.is_main else contextlib.nullcontext(), dist.peer_faults(world):
        return _run(cfg, run_dir, data, o)


def check_budget(time_budget: float | None, resume: bool, steps_given: bool = False) -> None:
    """A time budget sizes a new run's step count: not with a resume (which keeps its own) or
    a step count given; and it must be positive. The one place that says so (run.prepare
    asks before the data is read, train before the loop starts)."""
    if time_budget is None:
        return
    if resume or steps_given:
        other = "`steps`" if steps_given else "`resume=True`"
        raise ConfigError(
            f"`time_budget={time_budget:g}` s: not with {other} (`time_budget` sizes a new "
            "run's step count; a resumed run keeps its own, and `steps` extends it)"
        )
    if not time_budget > 0:
        raise ConfigError(f"`time_budget` must be > 0 seconds, got {time_budget}")


def _run(cfg: RunConfig, run_dir: Path, data, o: _Options) -> TrainResult:
    began = time.perf_counter()
    t, emit, w = cfg.train, o.emit, o.world

    # --- the state (a new run's, or that of the run's latest checkpoint) and rank 0's files
    ckpt_root = run_dir / CHECKPOINTS
    last_ckpt = _existing_checkpoint(ckpt_root, run_dir, o.resume, w, emit)
    state = TrainState.create(cfg, data, o.device, o.precision, w)
    if o.resume:
        state.load(last_ckpt, emit)
    out = _outputs(state, run_dir, data, o) if w.is_main else None
    emit("start", {
        "step": state.step, "total": None if o.time_budget is not None else t.steps,
        "params": count_parameters(state.net), "device": str(o.device),
        "precision": o.precision, "run_dir": str(run_dir), "world_size": w.size,
        "batch_size": t.batch_size, "batch_size_per_rank": t.batch_size // w.size,
        "data": state.batches.words,
    })  # fmt: skip

    # --- the step's network: eager, or compiled and checked against eager (timed with the run)
    faults = _Faults(o.device, t.skip_nonfinite, t.batch_size)
    with faults.out_of_memory(state.step, last_ckpt):
        forward = _network(state, o)
    budget = TimeBudget(o.time_budget, began)

    # --- the steps
    start, stopped, ips, images = state.step, False, 0.0, 0
    t0 = t_window = time.perf_counter()
    while state.step < budget.total(t.steps):
        # one optimizer step; a batch with a non-finite loss is skipped where that is allowed
        lr = lr_at(state.step, t, budget.total(t.steps))
        for g in state.opt.param_groups:
            g["lr"] = lr
        x, y = state.batches.next()
        if o.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with faults.out_of_memory(state.step, last_ckpt):
            loss = state.loss(forward, x, y)
            finite = torch.isfinite(loss.detach())
            if t.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), t.grad_clip)
                finite = finite & torch.isfinite(norm)
            if t.skip_nonfinite and not dist.every_rank(bool(finite), w):
                skipped = faults.skip(state.step + 1, last_ckpt)
                emit("skip", {"step": state.step + 1, "skipped": skipped})
                continue
            state.opt.step()
        faults.record(state.step + 1, finite)
        state.finish_step(loss)
        images += x.shape[0] * w.size

        # a time budget fixes the step count once its probe steps are timed
        if budget.observe(state.step, o.device) is not None:
            budget.fixed = dist.broadcast_int(budget.fixed, w)  # rank 0's clock decides for all
            state.fix_steps(budget.fixed)
            info = {"total": budget.fixed, "steps_per_s": budget.rate, "budget_s": budget.seconds}
            emit("schedule", info)
        total = budget.total(t.steps)

        # what is due after this step; faults are checked once before any of it (rank 0 alone
        # writes, previews and evaluates; the others wait at the next collective)
        due = _due(state.step, total, t, o.evaluator is not None or w.enabled)
        if due:
            faults.check(last_ckpt, w)
        if "log" in due:  # the loss: summed on the device, read once per log interval
            now = time.perf_counter()
            ips, t_window, images = images / max(now - t_window, 1e-9), now, 0
            mean = state.take_loss()
            if out is not None:
                out.add_loss(state.step, mean, lr, ips, now - t0)
        last_loss = out.last_loss if out is not None else None
        emit("step", {"step": state.step, "loss": last_loss, "images_per_s": ips, "lr": lr})
        with budget.aside():  # previews, evaluations and checkpoints: a budget does not count them
            if "preview" in due and out is not None:
                _preview(state, out, data, emit)
            if "eval" in due and o.evaluator is not None and out is not None:
                metrics = o.evaluator(state.ema_model())
                out.add_eval(state.step, metrics)
                emit("eval", {"step": state.step, **metrics})
            if "checkpoint" in due:
                last_ckpt = _checkpoint(state, ckpt_root, emit)
        # a stop asked of any rank stops all of them after this same step
        if dist.any_rank(o.should_stop(), w) and state.step < total:
            stopped = True
            break

    # --- the end: a last checkpoint, the loss plot, a last preview and the guidance strip
    faults.check(last_ckpt, w)
    with budget.aside():
        if last_ckpt is None or not last_ckpt.name.endswith(f"{state.step:07d}"):
            last_ckpt = _checkpoint(state, ckpt_root, emit)
        if out is not None:
            _finish(state, out, data, o, stopped)
    end = time.perf_counter()
    return TrainResult(
        state.step, last_ckpt, stopped, (state.step - start) * t.batch_size / max(end - t0, 1e-9),
        end - t0, out.last_loss if out is not None else None, budget.aside_s,
        budget.training_seconds(end),
    )  # fmt: skip


def _due(step: int, total: int, t, evaluating: bool) -> set[str]:
    """What is due after `step` of `total`: a loss row, a preview, an evaluation, a checkpoint
    (each by its interval; the loss at the last step too). It depends on the step only, never
    on the rank, so every process reaches the same collectives."""
    due = set()
    if step % t.log_every == 0 or step == total:
        due.add("log")
    if t.sample_every and step % t.sample_every == 0:
        due.add("preview")
    if evaluating and t.eval_every and step % t.eval_every == 0:
        due.add("eval")
    if t.checkpoint_every and step % t.checkpoint_every == 0:
        due.add("checkpoint")
    return due


def _outputs(state: TrainState, run_dir: Path, data, o: _Options) -> RunOutputs:
    """Rank 0's files: the run folder's outputs (a resumed run keeps its rows up to its
    checkpoint), the grid of real images and a text model's caption table (sampling its
    captions needs no encoder)."""
    note = lambda text: o.emit("note", {"text": text})  # noqa: E731
    out = RunOutputs(run_dir, state.step if o.resume else None, note=note)
    out.real_grid(lambda: real_grid(data, state.cfg.train.preview_per_class))
    if state.text is not None:
        state.text.save(run_dir / CAPTIONS_FILE)
    return out


def _network(state: TrainState, o: _Options):
    """The network the step runs: channels_last where asked, compiled where asked and checked
    against eager (_compiled_or_eager), in DistributedDataParallel under torchrun."""
    if o.channels_last:
        state.net = state.net.to(memory_format=torch.channels_last)
    forward = state.net
    if o.compile:
        forward = _compiled_or_eager(state, o.channels_last, o.emit)
    if o.world.enabled:
        # DDP's construction broadcasts rank 0's weights; the EMA starts from them (a resumed
        # EMA was read from the same checkpoint on every rank). Dropout, the one draw from the
        # global RNG, gets a stream of its own per rank, from (seed, rank, step).
        ddp = dist.wrap(state.net, o.device)
        forward = torch.compile(ddp) if forward is not state.net else ddp
        if not o.resume:
            state.ema = EMA(state.net, state.cfg.train.ema_decay)
        torch.manual_seed(dist.rank_seed(state.cfg.train.seed, o.world.rank, state.step))
    return forward


def _finish(state: TrainState, out: RunOutputs, data, o: _Options, stopped: bool) -> None:
    """Rank 0's end of a run: the loss plot, and for a run that was not stopped a last preview
    (unless the last step made one) and the guidance strip."""
    out.loss_plot()
    if stopped:
        return
    t = state.cfg.train
    if not t.sample_every or state.step % t.sample_every:
        _preview(state, out, data, o.emit)
    if o.final_strip:
        strip = guidance_strip(
            state.ema_model(), state.cfg, data.class_names,
            preview_settings(state.cfg, o.precision),
            conditions=state.text.class_condition if state.text else None,
        )  # fmt: skip
        o.emit("strip", {"path": str(out.strip(strip))})


def _existing_checkpoint(
    ckpt_root: Path, run_dir: Path, resume: bool, w: dist.World, emit: Event
) -> Path | None:
    """The checkpoint a resume continues from (None for a new run): the newest that a resume can
    read (checkpoint.choose with check_resumable), each one passed over said by a
    "checkpoint_skipped" event (its Skipped record and the line to say). A new run in a folder
    that holds checkpoints, a resume in one that holds none it can use, and a step-N entry past
    the start that cfgdiff did not write (checkpoint.clear_to_save) are refused before anything
    is written. Leftovers of a killed process are removed first (by rank 0, which holds the run
    lock; the others look after it)."""
    if w.is_main:
        ckpt_io.clean_stale(ckpt_root)
    dist.barrier(w)
    skipped: tuple[ckpt_io.Skipped, ...] = ()
    if resume:
        choice = ckpt_io.choose(ckpt_root, ckpt_io.check_resumable)
        existing = choice.require("`resume=True`", ckpt_root)
        start, skipped = checkpoint_step(existing.name), choice.skipped
    else:
        existing, start = None, 0
        if ckpt_io.latest_checkpoint(ckpt_root) is not None:
            raise ConfigError(
                f"`run_dir` {run_dir}: already holds checkpoints; pass `resume=True` to continue "
                "it or choose another `run_dir`"
            )
    own = ckpt_io.clear_to_save(ckpt_root, start)
    for s in skipped:
        text = s.line("resuming from") + (f" ({_replaced(s.path)})" if s.path in own else "")
        emit("checkpoint_skipped", {"skipped": s, "text": text})
    for p in own:
        if p not in {s.path for s in skipped}:  # a new run's: nothing was chosen over them
            why = ckpt_io.incomplete(p) or "a checkpoint"
            emit("note", {"text": f"{p}: {why}; {_replaced(p)}"})
    return existing


def _replaced(ckpt: Path) -> str:
    """What becomes of a broken or incomplete checkpoint folder of cfgdiff's past the start."""
    step = checkpoint_step(ckpt.name)
    return f"it is left as it is; this run replaces it if it saves step {step}"


def _preview(state: TrainState, out: RunOutputs, data, emit: Event) -> None:
    img = preview_grid(
        state.ema_model(), state.cfg, data.class_names, state.precision,
        conditions=state.text.class_condition if state.text else None,
    )  # fmt: skip
    emit("sample", {"step": state.step, "path": str(out.preview(state.step, img))})


def _checkpoint(state: TrainState, ckpt_root: Path, emit: Event) -> Path:
    """Rank 0 writes the checkpoint, after the EMA was found equal on every rank and the loss
    sum averaged over them (both collectives); the others return the path it writes."""
    w = state.world
    dist.check_equal(state.ema.state_dict(), "the EMA", w)
    state.average_loss()
    if not w.is_main:
        return ckpt_root / f"step-{state.step:07d}"
    path = state.save(ckpt_root)
    emit("checkpoint", {"step": state.step, "path": str(path)})
    return path


class _Faults:
    """What stops a run that cannot go on. A non-finite loss or gradient: without skipping, the
    first bad step is recorded on the device (no host sync per step) and checked before anything
    is logged or saved; with skip_nonfinite N, every step is checked and up to N bad batches are
    skipped (no optimizer or EMA update). Running out of memory: one line saying what to lower."""

    def __init__(self, device: torch.device, skip_nonfinite: int, batch_size: int):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.allowed, self.skipped = skip_nonfinite, 0
        self.device, self.batch_size = device, batch_size

    def record(self, step: int, finite: torch.Tensor) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)

    def check(self, last_ckpt: Path | None, w: dist.World | None = None) -> None:
        """A RuntimeFault when a step was non-finite, on this rank or (w) any other."""
        bad = int(self.first_bad)
        if w is not None:
            bad = dist.first_step(bad, w)
        if bad >= 0:
            raise RuntimeFault(
                f"loss or gradient became non-finite at step {bad}; stopped without saving "
                f"(last good checkpoint: {last_ckpt or 'none'}); lower `lr`, or pass "
                "`skip_nonfinite` N to skip up to N bad batches"
            )

    def skip(self, step: int, last_ckpt: Path | None) -> int:
        self.skipped += 1
        if self.skipped > self.allowed:
            raise RuntimeFault(
                f"more than `skip_nonfinite` {self.allowed} batches had a non-finite loss or "
                f"gradient (the last at step {step}); stopped without saving (last good "
                f"checkpoint: {last_ckpt or 'none'}); lower `lr`"
            )
        return self.skipped

    @contextlib.contextmanager
    def out_of_memory(self, step: int, last_ckpt: Path | None):
        """An allocation failure (CUDA or host) becomes a RuntimeFault that says what to do."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise RuntimeFault(
                f"out of memory at step {step + 1} with `batch_size` {self.batch_size} on "
                f"{self.device}: lower `batch_size` (last checkpoint: {last_ckpt or 'none'})"
            ) from None


def _compiled_or_eager(state: TrainState, channels_last: bool, emit: Event):
    """torch.compile(net) if it compiles and its gradients match the eager network's on a
    training batch (compiled.check_compiled_gradients), else net; a "compile" event says which
    and why. The check leaves the network, the batch order and the RNG states as they were."""
    net, cfg, device, precision = state.net, state.cfg, state.device, state.precision
    position = state.batches.state()
    x, y = state.batches.next()
    state.batches.load_state(position)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    d, seed = cfg.diffusion, cfg.train.seed

    def loss_of(f):
        gen = torch.Generator(device=device).manual_seed(seed)
        c = state.condition(y, gen)
        with autocast(device, precision):
            return training_loss(f, x, c, state.schedule, d, cfg.model.num_classes, gen)

    compiled = torch.compile(net)
    try:
        check = check_compiled_gradients(net, compiled, loss_of, precision, seed=seed)
    except Exception as e:  # compilation failures come in many types
        if is_out_of_memory(e):
            raise
        emit("compile", {"ok": False, "error": error_line(e)})
        return net
    if not check.ok:
        # a compile that runs can still be wrong (docs/DESIGN.md, "Compilation policy")
        emit("compile", {"ok": False, "error": f"compiled gradients differ: {check.describe()}"})
        return net
    emit("compile", {"ok": True, "check": check.describe()})
    return compiled
