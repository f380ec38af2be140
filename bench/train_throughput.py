"""Training throughput of the UNet presets: images/s and achieved TFLOP/s, bf16 autocast against
a plain fp32 eager baseline of the same network in the same run (compare ratios, not absolutes).

Compiled variants are first put through compiled.check_compiled_gradients, as `cfgdiff train`
does: a variant whose gradients differ from eager is printed with "!" and left out of "best"
(its speed is worthless, and train would not use it).

    python bench/train_throughput.py --device cpu [--quick] [--json out.json]
    python bench/train_throughput.py --device cpu --tune-candidates \
        --json bench/results/cpu_throughput.json
    python bench/train_throughput.py --device cuda --presets lesson-35m \
        --variants fp32,bf16-compile-cl-bm --profile bf16-compile-cl-bm
    python bench/train_throughput.py --device cpu --optimizer --presets cpu-demo,mnist,lesson-35m

--profile VARIANT runs that variant's steps once more under torch.profiler, right after timing
them (the same compiled step, so nothing is compiled twice), and prints where a step's time
goes: kernel time per step by kind (convolution, matmul, attention, normalisation, fused
kernels, optimizer, copies, other), the number of kernels a step launches, and the
device's busy share of the step time measured without the profiler (low: the step is bound by
launches or the host, which CUDA graphs address; high: by the kernels themselves). On the CPU
the same table is made from operator self-times.

--optimizer times the AdamW step alone: train.make_optimizer's fused kernel against the
per-tensor loop (the variant suffix -adamloop puts that loop into the whole step instead).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from timing import median, timed_ms

from cfgdiff.compiled import GradientCheck, check_compiled_gradients
from cfgdiff.config import DiffusionConfig, TrainConfig
from cfgdiff.diffusion import training_loss
from cfgdiff.presets import PRESETS
from cfgdiff.runtime import autocast, describe_machine
from cfgdiff.schedule import make_schedule
from cfgdiff.train import make_optimizer
from cfgdiff.unet import UNet, count_parameters


def forward_flops(net: torch.nn.Module, x, t, y) -> float:
    """FLOPs of one forward pass (multiply-add = 2), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, t, y)
    return float(fc.get_total_flops())


# Kernel (CUDA) or operator (CPU) names to the kind of work, first match wins.
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("convolution", r"conv|cudnn|implicit_gemm|xmma|wgrad|dgrad|fprop|winograd"),
    ("matmul", r"gemm|cutlass|matmul|addmm|\bmm\b|aten::mm|bmm|linear"),
    ("normalisation", r"norm"),
    ("optimizer", r"adam|multi_tensor|foreach|lerp"),
    ("fused (compiled)", r"^triton_|compiledfxgraph|torch-compiled"),
    ("copies", r"copy|memcpy|memset|contiguous|clone|cat"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def profile_steps(step, device, steps: int, step_s: float) -> dict:
    """Run `steps` steps under torch.profiler; per-step time by kind of kernel (CUDA) or operator
    self-time (CPU), kernels per step, and the busy share of `step_s` (a step's unprofiled time).
    A profiler failure is returned as {"error": ...}: the timings measured before stand."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            return summarise(kernel_times(prof.events()), steps, step_s, launches=True)
        times = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
        return summarise(times, steps, step_s, launches=False)
    except Exception as e:  # noqa: BLE001 - a benchmark's diagnostics must not lose its figures
        return {"error": f"{type(e).__name__}: {e}"}


def kernel_times(events) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of every device-side event of a profile."""
    from torch.autograd import DeviceType

    out = []
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        out.append((e.name, us if us is not None else e.self_cuda_time_total))
    return out


def summarise(times: list[tuple[str, float]], steps: int, step_s: float, launches: bool) -> dict:
    """Per-step milliseconds by kind and the top names, from (name, microseconds) pairs."""
    by_kind: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for name, us in times:
        by_kind[kind_of(name)] += us
        top[name] += us
    busy_ms = sum(by_kind.values()) / 1e3 / steps
    return {
        "step_ms": step_s * 1e3,
        "busy_ms": busy_ms,
        "busy_share": busy_ms / (step_s * 1e3),
        "kernels_per_step": len(times) / steps if launches else None,
        "ms_per_step_by_kind": {
            k: v / 1e3 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top": [
            (name[:70], us / 1e3 / steps)
            for name, us in sorted(top.items(), key=lambda kv: -kv[1])[:12]
        ],
    }


def print_profile(label: str, prof: dict, device) -> None:
    if "error" in prof:
        print(f"  profile of {label}: the profiler failed ({prof['error']})")
        return
    if device.type == "cuda":
        print(
            f"  profile of {label}: {prof['step_ms']:.1f} ms per step unprofiled, "
            f"{prof['busy_ms']:.1f} ms of kernel time in it ({100 * prof['busy_share']:.0f} % "
            f"busy), {prof['kernels_per_step']:.0f} kernels per step"
        )
    else:  # self-times of operators on several threads: no busy share
        print(
            f"  profile of {label}: {prof['step_ms']:.1f} ms per step unprofiled, "
            f"{prof['busy_ms']:.1f} ms of operator self-time profiled"
        )
    total = sum(prof["ms_per_step_by_kind"].values()) or 1.0
    for kind, ms in prof["ms_per_step_by_kind"].items():
        print(f"    {kind:16s} {ms:9.2f} ms/step  {100 * ms / total:5.1f} %")
    print("    top:")
    for name, ms in prof["top"]:
        print(f"      {ms:9.3f} ms/step  {name}")


def measure(
    model_cfg,
    batch: int,
    device,
    precision: str,
    steps: int,
    warmup: int,
    compile: bool = False,
    channels_last: bool = False,
    cudnn_benchmark: bool = False,
    profile: bool = False,
    cudagraphs: bool = False,
    adam_loop: bool = False,
) -> tuple[float, GradientCheck | None, dict | None]:
    """(images/s, the compiled step's gradient check or None when not compiled, the profile of
    the same step when asked, see profile_steps). cudagraphs: compile with
    mode="reduce-overhead" (forward and backward replayed as CUDA graphs; a plain compile on the
    CPU), each step marked as a new iteration for cudagraph trees. adam_loop: AdamW as a
    loop over tensors, the earlier form, for same-run comparisons (train.make_optimizer)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    net = UNet(model_cfg).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:
        fwd = torch.compile(net, mode="reduce-overhead" if cudagraphs else None)
    else:
        fwd = net

    def begin_step() -> None:
        if cudagraphs:  # the previous step's graph outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()

    opt = loop_adamw(net) if adam_loop else make_optimizer(net, TrainConfig(lr=1e-4), device)
    sch = make_schedule("cosine", 1000)
    dcfg = DiffusionConfig(schedule="cosine", prediction="v")
    c, s = model_cfg.in_channels, model_cfg.image_size
    x = torch.rand(batch, c, s, s, device=device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model_cfg.num_classes, (batch,), device=device)
    check = None
    if compile:

        def loss_of(f):
            begin_step()
            gen = torch.Generator(device=device).manual_seed(0)
            with autocast(device, precision):
                return training_loss(f, x, y, sch, dcfg, model_cfg.num_classes, gen)

        check = check_compiled_gradients(net, fwd, loss_of, precision)

    def step():
        begin_step()
        with autocast(device, precision):
            loss = training_loss(fwd, x, y, sch, dcfg, model_cfg.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    prof = profile_steps(step, device, steps, elapsed / steps) if profile else None
    return batch * steps / elapsed, check, prof


def loop_adamw(net: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as a loop of small ops per tensor: the form before train.make_optimizer."""
    return torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=False, fused=False)


def optimizer_step_ms(model_cfg, device, reps: int) -> tuple[int, dict[str, float]]:
    """(number of parameter tensors, median milliseconds of one AdamW step alone with random
    gradients in place, for train.make_optimizer's form and the per-tensor loop, interleaved)."""
    net = UNet(model_cfg).to(device)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {"loop": loop_adamw(net), "cfgdiff": make_optimizer(net, TrainConfig(lr=1e-4), device)}
    for opt in opts.values():  # the first steps allocate the moments
        for _ in range(3):
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(reps):
        for k, opt in opts.items():
            times[k].append(timed_ms(opt.step, device))
    return len(params), {k: median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="seconds: tiny step counts")
    p.add_argument("--presets", default="cpu-demo", help="comma-separated preset names")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument(
        "--tune-candidates",
        action="store_true",
        help="measure bf16 throughput of bench/tune_demo.py's candidates instead",
    )
    p.add_argument(
        "--only", default=None, help="with --tune-candidates: comma-separated candidate names"
    )
    p.add_argument(
        "--precision", default="bf16", help="with --tune-candidates: fp32 or bf16 (default)"
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--steps", type=int, default=8, help="timed steps per variant (after 3 warm-up steps)"
    )
    p.add_argument(
        "--optimizer",
        action="store_true",
        help="time the AdamW step alone instead: cfgdiff's (fused) against a per-tensor loop",
    )
    p.add_argument(
        "--variants",
        default="fp32,bf16",
        help="comma-separated PRECISION[-compile[-cg]][-cl][-bm][-adamloop]: fp32 or bf16, "
        "torch.compile (-cg: in mode reduce-overhead, CUDA graphs), channels_last, "
        "cudnn.benchmark (as cfgdiff runs on CUDA), AdamW as a per-tensor loop (the form before "
        "the fused CPU kernel, to compare with); e.g. fp32, bf16-compile-cl-bm, bf16-adamloop. "
        "The first is the baseline of the ratio column",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="VARIANT",
        help="one of --variants: profile its steps after timing them (where a step's time goes)",
    )
    a = p.parse_args()
    if a.profile is not None and a.profile not in a.variants.split(","):
        p.error(f"--profile: {a.profile!r} is not one of --variants {a.variants}")
    for v in a.variants.split(","):
        prec, *opts = v.split("-")
        if (
            prec not in ("fp32", "bf16")
            or not set(opts) <= {"compile", "cg", "cl", "bm", "adamloop"}
            or ("cg" in opts and "compile" not in opts)
        ):
            p.error(f"--variants: {v!r} is not PRECISION[-compile[-cg]][-cl][-bm][-adamloop]")
    device = torch.device(a.device)
    print(f"# {describe_machine(device)}, torch {torch.__version__}", flush=True)
    steps, warmup = (2, 1) if a.quick else (a.steps, 3)
    results: dict = {}
    if a.optimizer:
        reps = 5 if a.quick else 50
        head = ("preset", "tensors", "loop ms", "cfgdiff ms", "speed-up")
        print("{:10s} {:>7s} {:>8s} {:>10s} {:>8s}".format(*head))
        for name in a.presets.split(","):
            cfg = PRESETS[name]
            n, ms = optimizer_step_ms(cfg.model, device, reps)
            results[name] = {"tensors": n, "optimizer_step_ms": ms}
            print(
                f"{name:10s} {n:7d} {ms['loop']:8.2f} {ms['cfgdiff']:10.2f} "
                f"{ms['loop'] / ms['cfgdiff']:8.2f}",
                flush=True,
            )
    elif a.tune_candidates:
        from tune_demo import apply, candidates, select

        for name in select(a.only, p.error):
            ov = candidates()[name]
            cfg = apply(PRESETS["cpu-demo"], ov)
            ips, _, _ = measure(cfg.model, cfg.train.batch_size, device, a.precision, steps, warmup)
            m = cfg.model
            fl = forward_flops(
                UNet(m),
                torch.zeros(1, m.in_channels, m.image_size, m.image_size),
                torch.zeros(1),
                torch.zeros(1, dtype=torch.long),
            )
            results[name] = round(ips, 1)
            print(
                f"{name:12s} batch {cfg.train.batch_size:4d}  {ips:8.1f} img/s  "
                f"{fl / 1e6:6.1f} MFLOP/img fwd  {3 * fl * ips / 1e9:6.1f} GFLOP/s",
                flush=True,
            )
    else:
        variants = a.variants.split(",")
        print(
            f"{'preset':10s} {'params':>7s} {'batch':>5s} {'GFLOP/img':>9s} "
            + " ".join(f"{v + ' img/s':>18s}" for v in variants)
            + f" {'best/base':>9s} {'best TFLOP/s':>12s}"
        )
        for name in a.presets.split(","):
            cfg = PRESETS[name]
            batch = a.batch or cfg.train.batch_size
            net = UNet(cfg.model)
            c, s = cfg.model.in_channels, cfg.model.image_size
            fl = forward_flops(
                net, torch.zeros(1, c, s, s), torch.zeros(1), torch.zeros(1, dtype=torch.long)
            )
            ips, bad, profiles = {}, {}, {}
            for v in variants:
                opts = v.split("-")
                try:
                    ips[v], check, profiles[v] = measure(
                        cfg.model,
                        batch,
                        device,
                        opts[0],
                        steps,
                        warmup,
                        compile="compile" in opts,
                        cudagraphs="cg" in opts,
                        channels_last="cl" in opts,
                        cudnn_benchmark="bm" in opts,
                        profile=v == a.profile,
                        adam_loop="adamloop" in opts,
                    )
                except Exception as e:  # noqa: BLE001 - one variant failing (a compile mode on
                    # an untried stack) must not lose the others' figures
                    ips[v], check, profiles[v] = float("nan"), None, None
                    bad[v] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"  {name} {v}: {bad[v]}", file=sys.stderr, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if check is not None and not check.ok:
                    bad[v] = check.describe()
                # as it is measured, so that a run cut off by a time limit keeps its figures
                note = "" if check is None else f" ({'!' if v in bad else ''}{check.describe()})"
                print(f"  {name} {v}: {ips[v]:.1f} img/s{note}", file=sys.stderr, flush=True)
                if v == a.profile:
                    print_profile(f"{name} {a.profile}", profiles[a.profile], device)
            best = max((ips[v] for v in variants if v not in bad), default=float("nan"))
            tflops = 3 * fl * best / 1e12  # forward + backward ~ 3x forward
            results[name] = {
                "params": count_parameters(net),
                "batch": batch,
                "fwd_gflop_per_image": fl / 1e9,
                "images_per_s": ips,
                "best_tflops": tflops,
                "wrong_gradients": bad,
                "profile": profiles.get(a.profile),
            }
            print(
                f"{name:10s} {count_parameters(net) / 1e6:6.2f}M {batch:5d} {fl / 1e9:9.3f} "
                + " ".join(f"{ips[v]:17.1f}{'!' if v in bad else ' '}" for v in variants)
                + f" {best / ips[variants[0]]:9.2f} {tflops:12.3f}",
                flush=True,
            )
            for v, why in bad.items():
                what = (
                    "" if why.startswith("failed: ") else "compiled gradients differ from eager: "
                )
                print(f"  ! {name} {v}: {what}{why}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
