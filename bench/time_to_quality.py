"""Time to quality: wall-clock seconds and steps of training until class accuracy at s = 3
reaches 95 % and 98 %, and the FID (classifier features) reached at a fixed time budget.

Evaluation time is excluded from the training clock. Every --every steps the EMA network draws
--n samples at s = 3 (DPM-Solver++ 20 steps) and the dataset's classifier judges them.

    python bench/time_to_quality.py --device cpu --preset cpu-demo --budget 420
    python bench/time_to_quality.py --device cuda --preset mnist --budget 60 --every 100
    python bench/time_to_quality.py --quick        # seconds, synthetic data (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cfgdiff.config import get_preset  # noqa: E402
from cfgdiff.data import load_dataset  # noqa: E402
from cfgdiff.metrics.evaluate import build_reference, measure  # noqa: E402
from cfgdiff.runtime import resolve_device, resolve_precision  # noqa: E402
from cfgdiff.sample import generate  # noqa: E402
from cfgdiff.train import config_for_dataset, train  # noqa: E402


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
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device)
    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        a.dataset, a.preset = synthetic_folder(Path(tmp.name) / "data"), "tiny"
        a.budget, a.every, a.n = 3.0, 5, 12
        a.data_dir = Path(tmp.name) / "dd"
    preset = a.preset or ("mnist" if device.type == "cuda" else "cpu-demo")
    data = load_dataset(a.dataset, a.data_dir)
    base = config_for_dataset(get_preset(preset), data, a.dataset)
    cfg = dataclasses.replace(
        base,
        train=dataclasses.replace(
            base.train, eval_every=a.every, sample_every=0, checkpoint_every=0
        ),
    )
    ref = build_reference(cfg, a.n, data_dir=a.data_dir, device=device)
    labels = torch.arange(a.n) % cfg.model.num_classes
    clock = {"eval": 0.0, "start": time.perf_counter()}
    rows: list[dict] = []

    def train_seconds() -> float:
        return time.perf_counter() - clock["start"] - clock["eval"]

    def evaluator(net) -> dict[str, float]:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = train_seconds()
        imgs = generate(
            net,
            cfg,
            labels,
            scale=3.0,
            sampler="dpmpp-2m",
            steps=20,
            seed=0,
            batch_size=64 if device.type == "cpu" else 2048,
            device=device,
            precision=precision,
        )
        m = measure(ref, imgs, labels)
        rows.append(
            {
                "step": len(rows) * a.every + a.every,
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

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=10_000_000))
    print(
        f"preset {preset} on {device} ({precision}{', compiled' if a.compile else ''}), "
        f"budget {a.budget:.0f} s of training, {a.n} samples per evaluation"
    )
    train(
        cfg,
        Path(tmp.name) / "run",
        data,
        device=device,
        precision=precision,
        should_stop=lambda: train_seconds() >= a.budget,
        evaluator=evaluator,
        final_strip=False,
        compile=a.compile,
    )
    print(f"{'target':>8s} {'steps':>7s} {'seconds':>8s}")
    for target in (0.95, 0.98):
        hit = next((r for r in rows if r["acc"] >= target), None)
        print(
            f"{target:8.2f} {hit['step'] if hit else '-':>7} "
            f"{hit['seconds'] if hit else float('nan'):8.1f}"
        )
    if rows:
        print(
            f"at the budget ({rows[-1]['seconds']:.0f} s, step {rows[-1]['step']}): "
            f"FID {rows[-1]['fid']:.3f}, accuracy {rows[-1]['acc']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
