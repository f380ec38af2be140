"""Guided sampling throughput (images/s, every image guided: two network evaluations per step
in one batched forward), bf16 autocast against fp32 in the same run.

    python bench/sample_throughput.py --device cpu [--quick] [--preset cpu-demo] [--n 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cfgdiff.config import PRESETS  # noqa: E402
from cfgdiff.sample import generate  # noqa: E402
from cfgdiff.unet import UNet  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--n", type=int, default=None, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = PRESETS[a.preset]
    torch.manual_seed(0)
    net = UNet(cfg.model).to(device).eval()
    n = a.n or (16 if a.quick else (256 if device.type == "cpu" else 10_000))
    bs = a.batch_size or (64 if device.type == "cpu" else 2500)
    runs = [("dpmpp-2m", 20), ("ddim", 50)] if not a.quick else [("dpmpp-2m", 2)]
    labels = torch.arange(n) % cfg.model.num_classes
    print(f"preset {a.preset}, device {device}, {n} images at s=3, batch {bs}")
    print(f"{'sampler':10s} {'steps':>5s} {'fp32 img/s':>10s} {'bf16 img/s':>10s} {'ratio':>6s}")
    for sampler, steps in runs:
        ips = {}
        for precision in ("fp32", "bf16"):
            kw = dict(
                scale=3.0,
                sampler=sampler,
                seed=0,
                batch_size=bs,
                device=device,
                precision=precision,
            )
            generate(net, cfg, labels[: min(n, bs)], steps=2, **kw)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            generate(net, cfg, labels, steps=steps, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ips[precision] = n / (time.perf_counter() - t0)
        print(
            f"{sampler:10s} {steps:5d} {ips['fp32']:10.1f} {ips['bf16']:10.1f} "
            f"{ips['bf16'] / ips['fp32']:6.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
