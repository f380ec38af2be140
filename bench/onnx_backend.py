"""The sampling backends side by side in one run: PyTorch eager (fp32, bf16), torch.compile and
ONNX Runtime (fp32), in guided images/s through `generate` (the path every sampling command
takes), at a batch of 64 and of 1 image, and how far ONNX Runtime's images are from each
PyTorch variant's (the fraction of pixels within one uint8 level, same seed, sampler and scale).

    python bench/onnx_backend.py --checkpoint runs/demo [--runs dpmpp-2m:20] [--repeats 2]
    python bench/onnx_backend.py --quick --preset tiny        (random weights, seconds)

Every image is guided (s = 3: the conditional and the null row in one forward pass). A
variant's figure is the best of `--repeats` timed runs, the variants taking turns, after one
untimed warm-up run each (which compiles, for torch.compile), so a burst of load on a shared
machine counts less. The first
line names the machine; the conversion to ONNX (export and verification) is timed too, since
`--backend auto` pays it once per loaded model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from cfgdiff.compiled import CompiledForward
from cfgdiff.data import default_data_dir
from cfgdiff.onnx_net import graph_key
from cfgdiff.runtime import configure_cpu_threads, describe_machine
from cfgdiff.sampling.backends import GRAPH_CACHE, runtime_network
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.settings import SamplingSettings


def _runs(s: str) -> list[tuple[str, int]]:
    pairs = [(name, int(steps)) for name, steps in (r.split(":") for r in s.split(","))]
    return pairs


def _model(a):
    """(net, cfg, what): a checkpoint's EMA network, or a preset's with random weights."""
    if a.checkpoint is not None:
        from cfgdiff.checkpoint import load_for_sampling

        loaded = load_for_sampling(a.checkpoint, "cpu")
        return loaded.net, loaded.cfg, str(loaded.path)
    from cfgdiff.presets import PRESETS
    from cfgdiff.unet import UNet

    cfg = PRESETS[a.preset]
    torch.manual_seed(0)
    net = UNet(cfg.model).eval()
    with torch.no_grad():  # a fresh UNet's output layers are zero: every image would be grey
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net, cfg, f"preset {a.preset} (random weights)"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None, help="a checkpoint, run folder or model file")
    p.add_argument("--preset", default="cpu-demo", help="without --checkpoint: random weights")
    p.add_argument("--device", default="cpu", choices=["cpu"], help="ONNX Runtime runs here")
    p.add_argument("--runs", type=_runs, default=None, help="sampler:steps (dpmpp-2m:20)")
    p.add_argument("--batches", default=None, help="images per batch, comma-separated (64,1)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best counts)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    configure_cpu_threads()
    import onnxruntime

    cpu = torch.device("cpu")
    print(
        f"# {describe_machine(cpu)}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}",
        flush=True,
    )
    print(f"# load average at the start {os.getloadavg()[0]:.1f} (other processes share the CPU)")
    net, cfg, what = _model(a)
    cached = (default_data_dir() / GRAPH_CACHE / f"{graph_key(net, cfg)}.onnx").is_file()
    t0 = time.perf_counter()
    runtime_network(net, cfg)  # converted and verified once; generate finds it kept
    how = "read back from the disk cache" if cached else "converted to ONNX"
    print(f"{what}: {how} and verified in {time.perf_counter() - t0:.1f} s")
    runs = a.runs or [("dpmpp-2m", 2 if a.quick else 20)]
    batches = [int(b) for b in (a.batches or ("4,1" if a.quick else "64,1")).split(",")]
    repeats = 1 if a.quick else a.repeats
    variants = {  # name: (backend, precision, compiled)
        "eager fp32": ("torch", "fp32", False),
        "eager bf16": ("torch", "bf16", False),
        "compile bf16": ("torch", "bf16", True),
        "onnxruntime fp32": ("onnxruntime", "fp32", False),
    }
    if not a.compile:
        del variants["compile bf16"]
    for sampler, steps in runs:
        for bs in batches:
            n = 2 * bs if bs > 1 else (2 if a.quick else 8)  # two batches; eight of one image
            labels = torch.arange(n) % cfg.model.num_classes
            print(f"\n{sampler} {steps} steps, s = 3, batch {bs}, {n} images, best of {repeats}")
            print(f"{'variant':18s} {'img/s':>8s} {'vs eager fp32':>14s} {'vs eager bf16':>14s}")
            ips, images, kw = {}, {}, dict(guidance=Guidance(scale=3.0))
            jobs = {}
            for name, (backend, precision, compiled) in variants.items():
                f = CompiledForward(net, cpu) if compiled else net
                s = SamplingSettings(
                    sampler=sampler, steps=steps, seed=0, batch_size=bs, device="cpu",
                    precision=precision, compile="off", static_batches=compiled, backend=backend,
                )  # fmt: skip
                t0 = time.perf_counter()
                generate(f, cfg, labels[:bs], settings=dataclasses.replace(s, steps=2), **kw)
                if compiled:
                    note = f.fallback_reason or f"compiled in {time.perf_counter() - t0:.0f} s"
                    print(f"  ({name}: {note})", file=sys.stderr)
                jobs[name] = (f, s)
            best = dict.fromkeys(variants, float("inf"))
            for _ in range(repeats):  # the variants in turn, so that a burst of load hits all
                for name, (f, s) in jobs.items():
                    t0 = time.perf_counter()
                    images[name] = generate(f, cfg, labels, settings=s, **kw)
                    best[name] = min(best[name], time.perf_counter() - t0)
            for name in variants:
                ips[name] = n / best[name]
                print(
                    f"{name:18s} {ips[name]:8.2f} {ips[name] / ips['eager fp32']:14.2f} "
                    f"{ips[name] / ips.get('eager bf16', float('nan')):14.2f}",
                    flush=True,
                )
            ort = images["onnxruntime fp32"].int()
            agree = ", ".join(
                f"{name} {float(((ort - images[name].int()).abs() <= 1).float().mean()):.5f}"
                for name in variants
                if name != "onnxruntime fp32"
            )
            print(f"onnxruntime's pixels within one uint8 level of: {agree}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
