"""Time to quality: wall-clock seconds and steps of training until class accuracy at s = 3
reaches 95 % and 98 %, and the FID (classifier features) reached at a fixed time budget.

Evaluation time is excluded from the training clock. The LR schedule is sized to the budget as
`cfgdiff train --time` sizes it (--schedule budget), or held at its peak after warm-up
(--schedule held); --schedule budget,held compares the two in one run. Every --every steps
the EMA network draws --n samples at s = 3 (DPM-Solver++ 20 steps) and the dataset's
classifier judges them. Unless --no-baseline, the same network is then trained again in plain
fp32 eager with the same budget, and the table gives both and the ratio of their times to each
target.

    python bench/time_to_quality.py --device cpu --preset cpu-demo --budget 420
    python bench/time_to_quality.py --device cuda --preset mnist --budget 60 --every 100
    python bench/time_to_quality.py --quick        # seconds, synthetic data (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cfgdiff.checkpoint import load_for_sampling
from cfgdiff.config import MAX_STEPS
from cfgdiff.data import load_dataset
from cfgdiff.metrics.evaluate import ReferenceOptions, build_reference, measure
from cfgdiff.presets import config_for_dataset, get_preset
from cfgdiff.runtime import (
    describe_machine,
    resolve_device,
    resolve_precision,
    sampling_batch_size,
)
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.train import BUDGET_PROBE, TrainOptions, train


def synthetic_folder(root: Path) -> str:
    """Three classes of 8x8 images with a class-specific bright bar (for --quick)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(60):
            a = (rng.random((8, 8)) * 60).astype(np.uint8)
            a[:, 2 * c + 1 : 2 * c + 3] = 255
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return f"folder:{root}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default=None, help="default: cpu-demo on CPU, mnist on CUDA")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--budget", type=float, default=420.0, help="training seconds")
    p.add_argument("--every", type=int, default=200, help="steps between evaluations")
    p.add_argument("--n", type=int, default=500, help="samples per evaluation")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run fp32 eager with the same budget and print the ratio (default on)",
    )
    p.add_argument(
        "--schedule",
        default="budget",
        help="LR schedule: budget (sized to --budget as `cfgdiff train --time` does: the step "
        "count from the speed of steps 5-25), held (the LR held after warm-up: a schedule far "
        "longer than the budget), or both, comma-separated, to compare them in one run",
    )
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device)
    print(f"# {describe_machine(device)}, torch {torch.__version__}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        a.dataset, a.preset = synthetic_folder(Path(tmp.name) / "data"), "tiny"
        a.budget, a.every, a.n = 3.0, 5, 12
        a.data_dir = Path(tmp.name) / "dd"
    preset = a.preset or ("mnist" if device.type == "cuda" else "cpu-demo")
    data = load_dataset(a.dataset, a.data_dir)
    base = config_for_dataset(get_preset(preset, a.dataset), data, a.dataset)  # as train does
    cfg = dataclasses.replace(
        base,
        train=dataclasses.replace(
            base.train, eval_every=a.every, sample_every=0, checkpoint_every=0
        ),
    )
    ref = build_reference(cfg, a.n, ReferenceOptions(data_dir=a.data_dir, device=device))
    schedules = a.schedule.split(",")
    if not schedules or any(s not in ("budget", "held") for s in schedules):
        p.error(f"--schedule: expected budget, held or both comma-separated, got {a.schedule!r}")
    variants = [(precision, a.compile, s) for s in schedules]
    if a.baseline and (precision, a.compile) != ("fp32", False):
        # the plain baseline: same network, same budget, the first schedule
        variants.append(("fp32", False, schedules[0]))
    results = {}
    for prec, compiled, sched in variants:
        # ours runs as `cfgdiff train` does (cudnn.benchmark on CUDA); the baseline plainly
        torch.backends.cudnn.benchmark = (prec, compiled) == (precision, a.compile)
        name = f"{prec}{' + compile' if compiled else ''}{', held LR' if sched == 'held' else ''}"
        print(
            f"preset {preset} on {device} ({name}), budget {a.budget:.0f} s of training, "
            f"{a.n} samples per evaluation",
            flush=True,
        )
        results[name] = time_to_quality(cfg, data, ref, device, prec, compiled, sched, a, tmp.name)
    names = list(results)
    ratio = a.baseline and (precision, a.compile) != ("fp32", False)
    # columns as wide as their names ("bf16 + compile, held LR steps"), one space apart at least
    wide = {n: (max(28, len(n) + 8), max(24, len(n) + 4)) for n in names}
    print(
        f"\n{'target':>8s}"
        + "".join(f"{n + ' steps':>{wide[n][0]}s}{n + ' s':>{wide[n][1]}s}" for n in names),
        end="",
    )
    print(f"{'baseline s / ours':>19s}" if ratio else "")
    for target in (0.95, 0.98):
        hits = [next((r for r in results[n] if r["acc"] >= target), None) for n in names]
        line = f"{target:8.2f}"
        for n, h in zip(names, hits, strict=True):
            w_steps, w_s = wide[n]
            line += f"{h['step'] if h else '-':>{w_steps}}"
            line += f"{h['seconds'] if h else float('nan'):{w_s}.1f}"
        if ratio:
            r = hits[-1]["seconds"] / hits[0]["seconds"] if hits[0] and hits[-1] else float("nan")
            line += f"{r:19.2f}"
        print(line)
    for n in names:
        if results[n]:
            r = results[n][-1]
            print(
                f"{n} at the end ({r['seconds']:.0f} s, step {r['step']}): "
                f"FID {r['fid']:.3f}, accuracy {r['acc']:.4f}"
            )
    return 0


def time_to_quality(cfg, data, ref, device, precision, compiled, sched, a, tmp) -> list[dict]:
    """Train for a.budget seconds (evaluation excluded), evaluating every a.every steps; with
    sched "budget" the step count is sized to the budget (train's time_budget), with "held" it
    is far longer, so the LR stays at its peak."""
    labels = torch.arange(a.n) % cfg.model.num_classes
    clock = {"eval": 0.0, "start": time.perf_counter()}
    rows: list[dict] = []
    batch: list[int] = []

    def train_seconds() -> float:
        return time.perf_counter() - clock["start"] - clock["eval"]

    def evaluator(net, step: int | None = None, seconds: float | None = None) -> dict[str, float]:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = train_seconds() if seconds is None else seconds
        step = len(rows) * a.every + a.every if step is None else step
        if not batch:
            batch.append(sampling_batch_size(net, cfg.model, device, precision))
        settings = SamplingSettings(
            sampler="dpmpp-2m", steps=20, seed=0, batch_size=batch[0], precision=precision,
            compile="off",
        )  # fmt: skip
        imgs = generate(net, cfg, labels, settings=settings, guidance=Guidance(scale=3.0))
        m = measure(ref, imgs, labels)
        rows.append(
            {
                "step": step,
                "seconds": seconds,
                "acc": m["class_accuracy"],
                "fid": m["fid"],
            }
        )
        print(
            f"step {rows[-1]['step']:6d}  train {seconds:7.1f} s  accuracy(s=3) "
            f"{m['class_accuracy']:.4f}  FID {m['fid']:.3f}",
            flush=True,
        )
        clock["eval"] += time.perf_counter() - t0
        return {"fid": m["fid"], "class_accuracy": m["class_accuracy"]}

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=MAX_STEPS))
    run = Path(tmp) / f"run-{precision}-{int(compiled)}-{sched}"
    res = train(
        cfg,
        run,
        data,
        options=TrainOptions(
            device=device,
            precision=precision,
            evaluator=evaluator,
            final_strip=False,
            compile=compiled,
            time_budget=a.budget if sched == "budget" else None,
        ),
        should_stop=lambda: train_seconds() >= a.budget,
        on_event=_print_event,
    )
    # train fixes a budget's step count at the probe's last step: a run stopped before it has none
    if sched == "budget" and res.step < BUDGET_PROBE[1]:
        print(
            f"schedule: not fixed: the budget ended at step {res.step}, before the rate probe's "
            f"step {BUDGET_PROBE[1]} (this machine is too slow for the budget: give a longer one)",
            flush=True,
        )
    if not rows or rows[-1]["step"] != res.step:  # the last step, at the budget
        seconds = train_seconds()
        evaluator(load_for_sampling(res.checkpoint, device).net, res.step, seconds)
    return rows


def _print_event(name: str, info: dict) -> None:
    """Whether the compiled step passed the gradient check (train falls back to eager if not),
    and the step count a budget schedule was given."""
    if name == "schedule":
        print(f"schedule: {info['total']} steps ({info['steps_per_s']:.2f} steps/s)", flush=True)
    if name == "compile":
        print(
            f"compile: {'used, ' + info['check'] if info['ok'] else 'not used, ' + info['error']}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
