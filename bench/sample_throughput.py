"""Guided sampling throughput (images/s, every image guided: two network evaluations per step
in one batched forward): bf16 autocast, and bf16 + torch.compile (CUDA graphs on CUDA), against
a plain fp32 eager baseline of the same network in the same run.

    python bench/sample_throughput.py --device cpu [--quick] [--preset cpu-demo] [--n 256]
        [--compile | --no-compile]    (compiled column: default on for CUDA, off on the CPU)
        [--runs dpmpp-2m:20,ddim:50]  (sampler:steps pairs to time)

The batch is the one `cfgdiff sample` would choose (64 on the CPU; on CUDA from free memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from cfgdiff.compiled import CompiledForward
from cfgdiff.presets import PRESETS
from cfgdiff.runtime import describe_machine, sampling_batch_size
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.samplers import SAMPLERS
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.unet import UNet


def _runs(s: str) -> list[tuple[str, int]]:
    try:
        pairs = [(name, int(steps)) for name, steps in (r.split(":") for r in s.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sampler:steps[,...], got {s!r}") from None
    bad = [name for name, steps in pairs if name not in SAMPLERS or steps < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"samplers must be {', '.join(SAMPLERS)}, got {s!r}")
    return pairs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--n", type=int, default=None, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--runs",
        type=_runs,
        default=None,
        help="sampler:steps pairs (default dpmpp-2m:20,ddim:50; --quick dpmpp-2m:2)",
    )
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"# {describe_machine(device)}, torch {torch.__version__}", flush=True)
    cfg = PRESETS[a.preset]
    m = cfg.model
    torch.manual_seed(0)
    net = UNet(m).to(device).eval()
    bs = a.batch_size or sampling_batch_size(net, m, device, "bf16")
    n = a.n or (16 if a.quick else (256 if device.type == "cpu" else max(10_000, 4 * bs)))
    compile_ = device.type == "cuda" if a.compile is None else a.compile
    runs = a.runs or ([("dpmpp-2m", 2)] if a.quick else [("dpmpp-2m", 20), ("ddim", 50)])
    labels = torch.arange(n) % m.num_classes
    variants = {"fp32": ("fp32", net), "bf16": ("bf16", net)}
    if compile_:
        variants["bf16+compile"] = ("bf16", CompiledForward(net, device))
    print(f"preset {a.preset}, device {device}, {n} images at s=3, batch {bs}")
    head = "".join(f"{v + ' img/s':>19s}" for v in variants)
    ratios = "".join(f"{v + '/fp32':>19s}" for v in list(variants)[1:])
    print(f"{'sampler':10s} {'steps':>5s}{head}{ratios}")
    for sampler, steps in runs:
        ips = {}
        for name, (precision, f) in variants.items():
            # every variant but the plain fp32 baseline runs as `cfgdiff sample` does on CUDA
            torch.backends.cudnn.benchmark = name != "fp32"
            s = SamplingSettings(
                sampler=sampler, steps=steps, seed=0, batch_size=bs, device=device.type,
                precision=precision, compile="off", static_batches=f is not net,
            )  # fmt: skip
            kw = dict(guidance=Guidance(scale=3.0))
            t0 = time.perf_counter()
            warm = dataclasses.replace(s, steps=2)
            generate(f, cfg, labels[: min(n, bs)], settings=warm, **kw)  # warm-up, compilation
            if device.type == "cuda":
                torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            generate(f, cfg, labels, settings=s, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ips[name] = n / (time.perf_counter() - t0)
            if f is not net:
                note = f.fallback_reason or f"compiled in {warm:.0f} s"
                print(f"  ({name}: {note})", file=sys.stderr)
        row = "".join(f"{ips[v]:19.1f}" for v in variants)
        row += "".join(f"{ips[v] / ips['fp32']:19.2f}" for v in list(variants)[1:])
        print(f"{sampler:10s} {steps:5d}{row}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
