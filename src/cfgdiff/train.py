"""The training loop as an importable function.

Owns: the optimisation loop (AdamW, warmup + optional cosine decay, gradient clipping, EMA),
the run folder's files (loss.csv, loss.png, real.png, samples/, checkpoints/,
guidance_strip.png), resume and stop-on-request. Nothing here prints or exits: progress goes to
the `on_event` callback, and a stop is requested through `should_stop` (the CLI wires both to
the terminal and to signals).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.config import MAX_STEPS, RunConfig
from cfgdiff.data import Dataset, canonical_name
from cfgdiff.data.batches import DeviceBatches
from cfgdiff.data.download import atomic_write_bytes
from cfgdiff.diffusion import training_loss
from cfgdiff.ema import EMA
from cfgdiff.errors import CheckpointError, ConfigError, RuntimeFault
from cfgdiff.runtime import autocast as autocast_ctx
from cfgdiff.runtime import check_compiled_gradients, error_line, is_out_of_memory
from cfgdiff.sample import class_grid_labels, generate
from cfgdiff.schedule import make_schedule
from cfgdiff.unet import UNet, count_parameters
from cfgdiff.viz import labelled_grid, line_plot, save_png

Event = Callable[[str, dict[str, Any]], None]
# time_budget: steps [5, 25) of a run are timed to size its schedule (the first steps warm up
# caches and cuDNN autotuning); presets warm the LR up for longer than that, so the LR of every
# step equals that of a run given the final step count up front.
BUDGET_PROBE = (5, 25)
STRIP_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
LOSS_FIELDS = ["step", "loss", "lr", "images_per_s", "elapsed_s"]


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


# Datasets whose images mean the same mirrored, so training flips them by default: CIFAR-10 as
# DDPM (Ho et al. 2020, Appendix B) trains it. Digits are not; a folder's owner decides (--hflip).
HFLIP_BY_DEFAULT = ("cifar10",)


def config_for_dataset(cfg: RunConfig, data: Dataset, dataset_name: str) -> RunConfig:
    """Fill the data-dependent fields from the dataset: the model's channels, size and classes,
    and horizontal flips where the run leaves them to the dataset (train.hflip None)."""
    model = dataclasses.replace(
        cfg.model,
        in_channels=data.channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    )
    train = cfg.train
    if train.hflip is None:
        train = dataclasses.replace(train, hflip=dataset_name in HFLIP_BY_DEFAULT)
    names = tuple(str(c) for c in data.class_names)
    return dataclasses.replace(
        cfg, model=model, train=train, dataset=dataset_name, class_names=names
    )


def data_identity(data: Dataset) -> dict:
    """The training images and labels as a checkpoint records them (count and SHA-256), so that
    a resume can tell when a folder changed in between: training then goes on with the data as
    it is now, which cannot repeat the uninterrupted run exactly (the "data_changed" event)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.images.numpy()))
    h.update(np.ascontiguousarray(data.labels.numpy()))
    return {"n": len(data), "sha256": h.hexdigest()}


def steps_for_budget(step: int, seconds_left: float, steps_per_s: float) -> int:
    """The step count of a time-budgeted run: the steps done plus those that fit in the time
    left at the measured rate (at least the steps done, at most MAX_STEPS)."""
    more = max(0, math.floor(seconds_left * steps_per_s))
    return int(min(MAX_STEPS, step + more))


def make_optimizer(net: torch.nn.Module, t: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its fused kernel on CUDA and on the CPU: one pass over all the parameters
    instead of a loop of small ops per tensor (on the CPU 2.3 against 8.8 ms a step for the
    cpu-demo UNet's 167 tensors, bench/train_throughput.py --optimizer; the training step
    itself ~400 ms)."""
    return torch.optim.AdamW(
        net.parameters(),
        lr=t.lr,
        betas=t.adam_betas,
        weight_decay=t.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_at(step: int, t: Any) -> float:
    """Linear warmup over warmup_steps, then constant or cosine decay to lr_min_ratio * lr."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.lr_min_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class RunLock:
    """An fcntl lock on run_dir/.lock: held while training, released by the kernel even when the
    process is killed with SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise ConfigError(
                f"--out {self.path.parent}: another cfgdiff process is training in this folder"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _check_resume_compatible(saved: RunConfig, cfg: RunConfig) -> None:
    # the data first: a folder that gained a class is better told so than "num_classes=3 vs 4"
    if canonical_name(saved.dataset) != canonical_name(cfg.dataset):
        raise CheckpointError(
            f"--resume: checkpoint was trained on {saved.dataset!r}, "
            f"this run asks for {cfg.dataset!r}"
        )
    if saved.class_names and cfg.class_names and saved.class_names != cfg.class_names:
        raise CheckpointError(
            f"--resume: checkpoint's classes are {list(saved.class_names)}, this data's are "
            f"{list(cfg.class_names)}"
        )
    for section in ("model", "diffusion"):
        a, b = getattr(saved, section), getattr(cfg, section)
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                raise CheckpointError(
                    f"--resume: checkpoint has {section}.{f.name}={va}, this run asks for {vb}"
                )


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """Write a whole CSV atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _read_csv(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Rows of a per-step CSV up to and including `upto_step` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]


def write_loss_plot(rows: list[dict[str, Any]], path: Path) -> None:
    xs = [int(r["step"]) for r in rows]
    ys = [float(r["loss"]) for r in rows]
    save_png(line_plot({"training loss": (xs, ys)}, "loss", "step", "loss", logy=True), path)


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


def real_grid(data: Dataset, per_class: int):
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


def _compiled_or_eager(net, batches, channels_last, precision, cfg, schedule, emit):
    """torch.compile(net) if it compiles and its gradients match the eager network's on a
    training batch (runtime.check_compiled_gradients), else net; a "compile" event says which and
    why. The check leaves the network, the batch order and the RNG states as they were."""
    device = next(net.parameters()).device
    state = batches.state()
    x, y = batches.next()
    batches.load_state(state)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    d, seed = cfg.diffusion, cfg.train.seed

    def loss_of(f):
        gen = torch.Generator(device=device).manual_seed(seed)
        with autocast_ctx(device, precision):
            return training_loss(f, x, y, schedule, d, cfg.model.num_classes, gen)

    compiled = torch.compile(net)
    try:
        check = check_compiled_gradients(net, compiled, loss_of, precision, seed=seed)
    except Exception as e:  # compilation failures come in many types
        if is_out_of_memory(e):
            raise
        emit("compile", {"ok": False, "error": error_line(e)})
        return net
    if not check.ok:
        # Seen with torch 2.13's CPU inductor under bf16 autocast, before Upsample stopped using
        # F.interpolate: 120 of the cpu-demo UNet's 167 parameters got zero gradient, and a
        # 700-step run reached 41 % class accuracy at s = 3 instead of 99.8 % (docs/DESIGN.md).
        emit("compile", {"ok": False, "error": f"compiled gradients differ: {check.describe()}"})
        return net
    emit("compile", {"ok": True, "check": check.describe()})
    return compiled


def train(
    cfg: RunConfig,
    run_dir: Path,
    data: Dataset,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    resume: bool = False,
    on_event: Event | None = None,
    should_stop: Callable[[], bool] | None = None,
    final_strip: bool = True,
    evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    compile: bool = False,
    channels_last: bool = False,
    time_budget: float | None = None,
) -> TrainResult:
    """Train (or resume) a run in run_dir. See the module docstring for the files it writes.

    evaluator: called with the EMA network every cfg.train.eval_every steps; its numbers go to
    eval.csv (e.g. a small-N FID and class accuracy, see cli.py).
    compile: torch.compile the network for the training step, if it compiles and its gradients
    match the eager network's on one batch; otherwise training goes on eagerly. A "compile"
    event says which, and why. channels_last: NHWC memory format.
    time_budget: seconds of training (setup and compilation included; previews, evaluations
    and checkpoints not) that size a new run's step count, and so its LR schedule, in place of
    cfg.train.steps: steps BUDGET_PROBE are timed, the count is fixed from their rate (a
    "schedule" event gives it) and the run then trains that many steps, like one given the count
    up front, without looking at the clock again."""
    cfg.validate()
    if time_budget is not None and resume:
        raise ConfigError(
            "--time sizes a new run's schedule; a resumed run keeps its own (--steps extends it)"
        )
    if time_budget is not None and not time_budget > 0:
        raise ConfigError(f"--time must be > 0 seconds, got {time_budget}")
    device = torch.device(device)
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
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        return _train_locked(
            cfg,
            run_dir,
            data,
            device,
            precision,
            resume,
            on_event,
            should_stop,
            final_strip,
            evaluator,
            compile,
            channels_last,
            time_budget,
        )


def _train_locked(
    cfg,
    run_dir,
    data,
    device,
    precision,
    resume,
    on_event,
    should_stop,
    final_strip,
    evaluator,
    compile,
    channels_last,
    time_budget,
):
    began = time.perf_counter()
    emit = on_event or (lambda name, info: None)
    t = cfg.train
    ckpt_root = run_dir / "checkpoints"
    ckpt_io.clean_stale(ckpt_root)  # leftovers of a killed process (we hold the lock)
    existing = ckpt_io.latest_checkpoint(ckpt_root)
    if existing is not None and not resume:
        raise ConfigError(
            f"--out {run_dir}: already holds checkpoints; pass --resume to continue it "
            "or choose another --out"
        )
    if resume and existing is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_root}")

    torch.manual_seed(t.seed)
    net = UNet(cfg.model).to(device)
    ema = EMA(net, t.ema_decay)
    opt = make_optimizer(net, t, device)
    gen = torch.Generator(device=device).manual_seed(t.seed)
    batches = DeviceBatches(
        data.images, data.labels, t.batch_size, t.seed, device, hflip=bool(t.hflip)
    )
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    data_id = data_identity(data)
    start = 0
    loss_acc = torch.zeros((), device=device)
    acc_n = 0
    if resume:
        ckpt_io.verify(existing)
        saved = ckpt_io.read_config(existing)
        _check_resume_compatible(saved, cfg)
        ckpt_io.load_weights(existing, "model", net)
        ema_net = UNet(cfg.model)
        ckpt_io.load_weights(existing, "ema", ema_net)
        state = ckpt_io.load_state(existing)
        try:
            opt.load_state_dict(state["optimizer"])
            ema.load_state_dict(
                {k: v.to(device) for k, v in ema_net.state_dict().items()},
                int(state["ema_updates"]),
            )
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"])
            batches.load_state(state["data"])
            was = state.get("data_identity")  # absent in checkpoints of earlier versions
            if was is not None and was != data_id:
                emit("data_changed", {"was": int(was["n"]), "now": data_id["n"]})
            start = int(state["step"])
            loss_acc += float(state["loss_acc"])
            acc_n = int(state["loss_acc_n"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(
                f"{existing / 'state.pt'}: incompatible training state ({e})"
            ) from None
        del ema_net
    rows = _read_csv(run_dir / "loss.csv", start) if resume else []
    _write_csv(run_dir / "loss.csv", rows, LOSS_FIELDS)

    ema_net = UNet(cfg.model).to(device).eval()
    if not (run_dir / "real.png").exists():
        save_png(real_grid(data, t.preview_per_class), run_dir / "real.png")
    emit(
        "start",
        {
            "step": start,
            "total": None if time_budget is not None else t.steps,
            "params": count_parameters(net),
            "device": str(device),
            "precision": precision,
            "run_dir": str(run_dir),
        },
    )

    def save(step: int) -> Path:
        state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "ema_updates": ema.num_updates,
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "data": batches.state(),
            "data_identity": data_id,
            "loss_acc": float(loss_acc),
            "loss_acc_n": acc_n,
            # what --precision auto resolved to, so a resume trains as the run did
            "precision": {"device": device.type, "precision": precision},
        }
        path = ckpt_io.save_checkpoint(
            ckpt_root, step, cfg, net.state_dict(), ema.state_dict(), state, t.keep
        )
        emit("checkpoint", {"step": step, "path": str(path)})
        return path

    eval_rows = _read_csv(run_dir / "eval.csv", start) if resume else []

    def write_eval(step: int) -> None:
        ema.copy_to(ema_net)
        metrics = evaluator(ema_net)
        eval_rows.append({"step": step, **{k: f"{v:.6g}" for k, v in metrics.items()}})
        _write_csv(run_dir / "eval.csv", eval_rows, list(eval_rows[-1]))
        emit("eval", {"step": step, **metrics})

    def write_preview(step: int) -> None:
        ema.copy_to(ema_net)
        img = preview_grid(ema_net, cfg, data.class_names, device, precision)
        path = save_png(img, run_dir / "samples" / f"step-{step:07d}.png")
        emit("sample", {"step": step, "path": str(path)})

    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = net

    def forward_backward(fwd, x, y) -> torch.Tensor:
        with autocast_ctx(device, precision):
            loss = training_loss(fwd, x, y, schedule, cfg.diffusion, cfg.model.num_classes, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    net.train()
    t0 = time.perf_counter()
    t_window = t0
    images_window = 0
    last_ckpt: Path | None = existing if resume else None
    last_loss: float | None = float(rows[-1]["loss"]) if rows else None
    stopped = False
    step = start
    ips = 0.0
    # Non-finite loss or gradient: without --skip-nonfinite the first bad step is recorded on the
    # device (no host sync per step) and checked before anything is logged or saved; with it,
    # every step is checked and a bad batch is skipped (no optimizer or EMA update).
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    skipped = 0

    def check_finite() -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise RuntimeFault(
                f"loss or gradient became non-finite at step {bad}; stopped without saving "
                f"(last good checkpoint: {last_ckpt or 'none'}); lower --lr, or pass "
                "--skip-nonfinite N to skip up to N bad batches"
            )

    @contextlib.contextmanager
    def out_of_memory_as_fault(step: int):
        """An allocation failure (CUDA or host) becomes a RuntimeFault that says what to do."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise RuntimeFault(
                f"out of memory at step {step + 1} with --batch-size {t.batch_size} on {device}: "
                f"lower --batch-size (last checkpoint: {last_ckpt or 'none'})"
            ) from None

    # A time budget counts training, not previews, evaluations and checkpoints ("aside").
    aside_s = [0.0]

    @contextlib.contextmanager
    def aside():
        t_aside = time.perf_counter()
        try:
            yield
        finally:
            aside_s[0] += time.perf_counter() - t_aside

    probe: list[float] = []  # clock minus aside time at the BUDGET_PROBE steps
    if time_budget is not None:
        t = dataclasses.replace(t, steps=MAX_STEPS)  # until the probe fixes the count

    if compile:  # timed with the run: compiling is part of what it costs
        with out_of_memory_as_fault(step):
            forward = _compiled_or_eager(
                net, batches, channels_last, precision, cfg, schedule, emit
            )

    while step < t.steps:
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.next()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with out_of_memory_as_fault(step):
            loss = forward_backward(forward, x, y)
            finite = torch.isfinite(loss.detach())
            if t.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
                finite = finite & torch.isfinite(norm)
            if t.skip_nonfinite and not bool(finite):
                skipped += 1
                emit("skip", {"step": step + 1, "skipped": skipped})
                if skipped > t.skip_nonfinite:
                    raise RuntimeFault(
                        f"more than --skip-nonfinite {t.skip_nonfinite} batches had a non-finite "
                        f"loss or gradient (the last at step {step + 1}); stopped without saving "
                        f"(last good checkpoint: {last_ckpt or 'none'}); lower --lr"
                    )
                continue
            opt.step()
        first_bad = torch.where((first_bad < 0) & ~finite, step + 1, first_bad)
        ema.update(net)
        step += 1
        if time_budget is not None and step in BUDGET_PROBE:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # two host syncs in a budgeted run, no more
            probe.append(time.perf_counter() - aside_s[0])
            if step == BUDGET_PROBE[1]:
                rate = (BUDGET_PROBE[1] - BUDGET_PROBE[0]) / max(probe[1] - probe[0], 1e-9)
                total = steps_for_budget(step, time_budget - (probe[1] - began), rate)
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=total))
                t = cfg.train
                emit("schedule", {"total": total, "steps_per_s": rate, "budget_s": time_budget})
        loss_acc += loss.detach()
        acc_n += 1
        images_window += x.shape[0]
        if step % t.log_every == 0 or step == t.steps:
            check_finite()
            last_loss = float(loss_acc) / acc_n  # the one host sync per log interval
            now = time.perf_counter()
            ips = images_window / max(now - t_window, 1e-9)
            t_window, images_window = now, 0
            rows.append(
                {
                    "step": step,
                    "loss": repr(last_loss),  # full precision: resume is checked bit for bit
                    "lr": f"{lr:.6g}",
                    "images_per_s": f"{ips:.1f}",
                    "elapsed_s": f"{now - t0:.1f}",
                }
            )
            with open(run_dir / "loss.csv", "a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOSS_FIELDS).writerow(rows[-1])
            loss_acc.zero_()
            acc_n = 0
        emit("step", {"step": step, "loss": last_loss, "images_per_s": ips, "lr": lr})
        if t.sample_every and step % t.sample_every == 0:
            check_finite()
            with aside():
                write_preview(step)
        if evaluator is not None and t.eval_every and step % t.eval_every == 0:
            check_finite()
            with aside():
                write_eval(step)
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            check_finite()
            with aside():
                last_ckpt = save(step)
        if should_stop is not None and should_stop() and step < t.steps:
            stopped = True
            break
    check_finite()
    with aside():
        if last_ckpt is None or not last_ckpt.name.endswith(f"{step:07d}"):
            last_ckpt = save(step)
        if rows:
            write_loss_plot(rows, run_dir / "loss.png")
        if not stopped:
            if not t.sample_every or step % t.sample_every:
                write_preview(step)
            if final_strip:
                ema.copy_to(ema_net)
                img = guidance_strip(ema_net, cfg, data.class_names, device, precision)
                path = save_png(img, run_dir / "guidance_strip.png")
                emit("strip", {"path": str(path)})
    end = time.perf_counter()
    elapsed = end - t0
    ips = (step - start) * t.batch_size / max(elapsed, 1e-9)
    train_s = end - began - aside_s[0]
    return TrainResult(step, last_ckpt, stopped, ips, elapsed, last_loss, aside_s[0], train_s)
