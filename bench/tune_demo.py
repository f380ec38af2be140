"""Tune the CPU demo preset: train candidate configurations for the number of steps each can do
in a fixed CPU time budget, then measure class accuracy at s = 1 and s = 3.

Step counts come from CPU training throughput measured on the target machine
(bench/train_throughput.py --json), so candidates are compared at equal *CPU minutes* even when
this script runs on a faster device (quality per step transfers; wall time does not).

    python bench/tune_demo.py --throughput bench/results/cpu_throughput.json --budget 420 \
        --device cuda --data-dir DATA
    python bench/tune_demo.py --throughput bench/results/cpu_throughput.json --quick \
        --device cpu --only base,pad32      # seconds, synthetic data (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from cfgdiff.config import RunConfig
from cfgdiff.data import load_dataset
from cfgdiff.metrics.classifier import class_accuracy, get_classifier, predict
from cfgdiff.presets import PRESETS, config_for_dataset
from cfgdiff.runtime import sampling_batch_size
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.train import TrainOptions, train


def _timesteps(law: str, mean: float = 0.0, std: float = 1.0, uniform: float = 0.0) -> dict:
    return {"t_sampling": law, "t_mean": mean, "t_std": std, "t_uniform": uniform}


def candidates() -> dict[str, dict]:
    """name -> {"model": {...}, "diffusion": {...}, "train": {...}} overrides of cpu-demo, and
    optionally "pad": P, which trains on MNIST padded with P background pixels on each side (as
    the lesson pads 28x28 to 32x32) and crops the samples back before they are judged."""
    return {
        "base": {},
        "b128": {"train": {"batch_size": 128}},
        "b32": {"train": {"batch_size": 32}},
        "c48": {"model": {"base_channels": 48}},
        "c64": {"model": {"base_channels": 64}},
        "r2": {"model": {"num_res_blocks": 2}},
        "eps-linear": {"diffusion": {"prediction": "eps", "schedule": "linear"}},
        "eps-cosine": {"diffusion": {"prediction": "eps"}},
        "minsnr": {"diffusion": {"loss_weighting": "min-snr"}},
        "lr1e-3": {"train": {"lr": 1e-3}},
        "lr4e-3": {"train": {"lr": 4e-3}},
        "ema0.999": {"train": {"ema_decay": 0.999}},
        "ema0.99": {"train": {"ema_decay": 0.99}},
        "drop0.2": {"diffusion": {"label_dropout": 0.2}},
        "mult124": {"model": {"channel_mult": [1, 2, 4]}},
        "noattn": {"model": {"attn_levels": []}},
        "pad32": {"pad": 2},  # MNIST 28x28 -> 32x32
        # training timesteps, each law spelled out in full (cpu-demo's own changed from uniform
        # to tmix-hi after these were measured): uniform; logit-normal (Esser et al. 2024) alone,
        # centred or shifted towards the noisy end, where a sample's class is decided; and half
        # uniform, half shifted logit-normal, which keeps the least noisy tenth trained (5.2 % of
        # the draws against 0.35 % for tln-hi alone)
        "uniform": {"diffusion": _timesteps("uniform")},
        "tln": {"diffusion": _timesteps("logit-normal", 0.0)},
        "tln-hi": {"diffusion": _timesteps("logit-normal", 0.5)},
        "tln-hi2": {"diffusion": _timesteps("logit-normal", 1.0)},
        "tln-hi-wide": {"diffusion": _timesteps("logit-normal", 0.5, std=1.5)},
        "tmix-hi": {"diffusion": _timesteps("logit-normal", 0.5, uniform=0.5)},
        # fewer FLOPs per image: most of cpu-demo's are at 28x28 (docs/results.md, "The demo on
        # a CPU without native bf16"); a 2x2 patch stem runs the first level at 14x14, or fewer
        # channels at full resolution and more below
        "p2-c32": _patch2(32, [1, 2]),
        "p2-c48": _patch2(48, [1, 2]),
        "p2-c64": _patch2(64, [1, 2]),
        "p2-c64-m11": _patch2(64, [1, 1]),
        "p2-c48-r2": _patch2(48, [1, 2], num_res_blocks=2),
        "p2-c32-r2": _patch2(32, [1, 2], num_res_blocks=2),
        "c16-m144": {"model": {"base_channels": 16, "channel_mult": [1, 4, 4]}},
        # the fp32 demo's network (p2-c32) with another batch size, learning rate or label
        # dropout, compared at equal CPU time
        "p2-c32-b32": _patch2(32, [1, 2], train={"batch_size": 32}),
        "p2-c32-b128": _patch2(32, [1, 2], train={"batch_size": 128}),
        "p2-c32-lr3e-3": _patch2(32, [1, 2], train={"lr": 3e-3}),
        "p2-c32-drop0.05": _patch2(32, [1, 2], diffusion={"label_dropout": 0.05}),
    }


def _patch2(channels: int, mult: list[int], train=None, diffusion=None, **model) -> dict:
    """A patch-size-2 network: two levels (14x14 and 7x7 for MNIST), attention at the second;
    `train` and `diffusion`: overrides of those sections."""
    fields = {"patch_size": 2, "base_channels": channels, "channel_mult": mult, "attn_levels": [1]}
    return {"model": {**fields, **model}, "train": train or {}, "diffusion": diffusion or {}}


def same_speed_as(name: str, measured: dict) -> str | None:
    """The first measured candidate with `name`'s network, padding and batch size (so its
    speed), or None where that is `name` itself: "base" for a change of cpu-demo's recipe
    alone, "p2-c32" for one of p2-c32's."""
    every = candidates()

    def shape(o: dict) -> tuple:
        return repr(o.get("model", {})), o.get("pad", 0), o.get("train", {}).get("batch_size")

    mine = shape(every[name])
    for other, ov in every.items():  # the first of the list with this shape speaks for all
        if other in measured and shape(ov) == mine:
            return None if other == name else other
    return None


def select(only: str | None, error) -> list[str]:
    """The candidates named by --only (all if None); `error` (argparse's) for unknown names."""
    names = only.split(",") if only else list(candidates())
    unknown = sorted(set(names) - set(candidates()))
    if unknown:
        error(f"--only: unknown candidates {', '.join(unknown)}")
    return names


def apply(base: RunConfig, ov: dict) -> RunConfig:
    parts = {}
    for section in ("model", "diffusion", "train"):
        sub = {k: tuple(v) if isinstance(v, list) else v for k, v in ov.get(section, {}).items()}
        parts[section] = dataclasses.replace(getattr(base, section), **sub)
    pad = ov.get("pad", 0)
    parts["model"] = dataclasses.replace(
        parts["model"], image_size=parts["model"].image_size + 2 * pad
    )
    return dataclasses.replace(base, **parts)


def pad_images(images: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, H + 2 pad, W + 2 pad), the border filled with 0 (MNIST's
    background, -1 after scaling)."""
    return torch.nn.functional.pad(images, (pad, pad, pad, pad), value=0)


def crop_images(images: torch.Tensor, pad: int) -> torch.Tensor:
    """The inverse of pad_images: the centre of each image."""
    return (
        images[..., pad : images.shape[-2] - pad, pad : images.shape[-1] - pad] if pad else images
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--throughput", type=Path, required=True, help="JSON: name -> CPU images/s")
    p.add_argument("--budget", type=float, default=420.0, help="CPU training seconds")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--only", default=None, help="comma-separated candidate names")
    p.add_argument("--n", type=int, default=1000, help="samples per scale for class accuracy")
    p.add_argument("--steps-cap", type=int, default=None, help="cap steps (smoke tests)")
    p.add_argument(
        "--precision",
        default="bf16",
        help="of training and sampling (fp32 for candidates of a CPU without native bf16)",
    )
    p.add_argument("--steps", type=int, default=None, help="train this many steps (no budget)")
    p.add_argument("--sampler", default="dpmpp-2m", help="of the judged samples")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--quick", action="store_true", help="seconds: synthetic 8x8 data, 3 steps, 12 samples"
    )
    a = p.parse_args()
    ips = json.loads(a.throughput.read_text())
    device = torch.device(a.device)
    dataset = "mnist"
    if a.quick:
        from time_to_quality import synthetic_folder

        quick_dir = tempfile.TemporaryDirectory()  # kept until the end of main
        dataset = synthetic_folder(Path(quick_dir.name) / "data")
        a.data_dir, a.steps_cap, a.n = Path(quick_dir.name) / "dd", 3, 12
    data = load_dataset(dataset, a.data_dir)
    clf, meta = get_classifier(dataset, a.data_dir, device=device)
    base = config_for_dataset(PRESETS["cpu-demo"], data, dataset)
    names = select(a.only, p.error)
    results = []
    print(
        f"classifier test accuracy {meta['test_accuracy']:.4f}; budget {a.budget:.0f} CPU-s; "
        f"judged: {a.n} samples per scale, {a.sampler} {a.sample_steps} steps"
    )
    print(
        f"{'name':12s} {'cpu img/s':>9s} {'steps':>6s} {'loss':>7s} {'acc s=1':>8s} "
        f"{'acc s=3':>8s} {'wall s':>6s}"
    )
    for name in names:
        ov = candidates()[name]
        cfg = apply(base, ov)
        pad = ov.get("pad", 0)
        train_data = dataclasses.replace(data, images=pad_images(data.images, pad)) if pad else data
        twin = same_speed_as(name, ips)
        if twin is not None:
            ips[name] = ips[twin]  # same network and batch: same speed (removes timing noise)
        if name not in ips:
            print(f"{name:12s} no CPU throughput measured; skipped")
            continue
        steps = a.steps or int(a.budget * ips[name] / cfg.train.batch_size)
        if a.steps_cap:
            steps = min(steps, a.steps_cap)
        cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(
                cfg.train, steps=steps, sample_every=0, checkpoint_every=0, log_every=50
            ),
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = train(
                cfg,
                Path(tmp) / "run",
                train_data,
                options=TrainOptions(device=device, precision=a.precision, final_strip=False),
            )
            from cfgdiff.checkpoint import load_for_sampling

            net = load_for_sampling(Path(tmp) / "run", device).net
        dt = time.perf_counter() - t0
        row = {
            "name": name,
            "cpu_ips": ips[name],
            "steps": steps,
            "loss": res.last_loss,
            "train_s": dt,
        }
        labels = torch.arange(a.n) % data.num_classes
        for s in (1.0, 3.0):
            settings = SamplingSettings(
                sampler=a.sampler, steps=a.sample_steps, seed=0,
                batch_size=sampling_batch_size(net, cfg.model, device, a.precision),
                precision=a.precision, compile="off",
            )  # fmt: skip
            imgs = generate(net, cfg, labels, settings=settings, guidance=Guidance(scale=s))
            logits = predict(clf, crop_images(imgs, pad), device=device)
            row[f"acc_s{s:g}"] = class_accuracy(logits, labels)[0]
        results.append(row)
        print(
            f"{name:12s} {ips[name]:9.0f} {steps:6d} {res.last_loss:7.4f} {row['acc_s1']:8.4f} "
            f"{row['acc_s3']:8.4f} {dt:6.0f}",
            flush=True,
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
