"""Samplers against the number of network evaluations (NFE).

1. Gaussian-classes oracle (closed-form scores, cfgdiff.oracles): for each sampler and step
   count, the error of the per-class mean and std at s = 1 (N samples per class) and, for the
   deterministic samplers, the max distance to a 1000-step solution of the guided (s = 3) ODE.
2. A trained checkpoint (optional, --checkpoint): class accuracy at s = 1 and s = 3 judged by
   cfgdiff's own classifier, per sampler and step count.
3. The grid (--grid, with --checkpoint): every sampler x steps (--grid-steps, default 10, 20,
   35) x scale (--grid-scales, default 1, 1.5, 3), each cell a `cfgdiff sweep` of n samples
   from the same noise: FID in the judge's features (with the real floor), precision, recall,
   class accuracy; then the best cell by FID and by accuracy at s = 1.

NFE counts network evaluations per sample: a guided step evaluates the network twice (one
batched forward over [cond; null]); an s = 1 step once.

    python bench/samplers.py [--quick] [--checkpoint runs/demo --n 200] [--device cpu]
    python bench/samplers.py --grid --checkpoint runs/demo --n 500 [--grid-out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cfgdiff.oracles import GaussianClassesNet
from cfgdiff.sampling.guidance import Guidance, guided_denoiser
from cfgdiff.sampling.samplers import SAMPLERS
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.schedule import cosine_schedule


def oracle_table(steps_list: list[int], n: int) -> None:
    sch = cosine_schedule(1000)
    oracle = GaussianClassesNet(sch)
    k = oracle.K
    print(
        f"Gaussian-classes oracle (means {tuple(oracle.mus.tolist())}, tau {oracle.tau}), "
        f"cosine schedule, trailing spacing, {n} samples per class"
    )
    print(
        f"{'sampler':9s} {'steps':>5s} {'NFE s=1':>7s} {'moment err s=1':>14s} "
        f"{'NFE s=3':>7s} {'ODE err s=3':>11s}"
    )
    x_line = torch.linspace(-2.5, 2.5, 301, dtype=torch.float64).reshape(-1, 1, 1, 1)
    y_line = torch.arange(301) % k

    def ode(sampler, steps):
        d = guided_denoiser(
            oracle, y_line, sch, null_label=k, guidance=Guidance(scale=3.0, threshold="none")
        )
        return sampler(d, x_line, sch, steps)

    refs = {name: ode(e.fn, 1000) for name, e in SAMPLERS.items() if e.deterministic}
    for name, entry in SAMPLERS.items():
        f = entry.fn
        for steps in steps_list:
            g = torch.Generator().manual_seed(0)
            err = 0.0
            for c in range(k):
                y = torch.full((n,), c)
                d = guided_denoiser(
                    oracle, y, sch, null_label=k, guidance=Guidance(scale=1.0, threshold="none")
                )
                x_T = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
                out = f(d, x_T, sch, steps, generator=g)
                err += abs(out.mean().item() - float(oracle.mus[c]))
                err += abs(out.std().item() - oracle.tau)
            ode_err = (
                f"{(ode(f, steps) - refs[name]).abs().max():.2e}" if entry.deterministic else "-"
            )
            print(
                f"{name:9s} {steps:5d} {steps:7d} {err / (2 * k):14.2e} {2 * steps:7d} "
                f"{ode_err:>11s}",
                flush=True,
            )


def checkpoint_table(path: Path, steps_by_sampler: dict, n: int, device: str) -> None:
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.classifier import class_accuracy, get_classifier, predict
    from cfgdiff.runtime import resolve_precision
    from cfgdiff.sampling.generate import generate

    dev = torch.device(device)
    loaded = load_for_sampling(path, dev)
    m = loaded.cfg.model
    clf, meta = get_classifier(
        loaded.cfg.dataset, device=dev, image_size=m.image_size, channels=m.in_channels
    )
    prec = resolve_precision("auto", dev)
    labels = torch.arange(n) % m.num_classes
    print(
        f"\ncheckpoint {loaded.path} ({loaded.cfg.dataset}), {n} samples per cell, "
        f"classifier test accuracy {meta['test_accuracy']:.4f}, {prec}"
    )
    print(
        f"{'sampler':9s} {'steps':>5s} {'NFE s=1':>7s} {'acc s=1':>7s} {'NFE s=3':>7s} "
        f"{'acc s=3':>7s} {'s=3 img/s':>9s}"
    )
    for name, steps_list in steps_by_sampler.items():
        for steps in steps_list:
            acc = {}
            for s in (1.0, 3.0):
                t0 = time.perf_counter()
                settings = SamplingSettings(
                    sampler=name, steps=steps, seed=0,
                    batch_size=64 if dev.type == "cpu" else 1024, precision=prec, compile="off",
                )  # fmt: skip
                imgs = generate(
                    loaded.net, loaded.cfg, labels, settings=settings, guidance=Guidance(scale=s)
                )
                dt = time.perf_counter() - t0
                acc[s] = class_accuracy(predict(clf, imgs, device=dev), labels)[0]
            print(
                f"{name:9s} {steps:5d} {steps:7d} {acc[1.0]:7.3f} {2 * steps:7d} {acc[3.0]:7.3f} "
                f"{n / dt:9.1f}",
                flush=True,
            )


def network_evaluations(name: str, schedule, steps: int) -> int:
    """Network evaluations per image of sampler `name` in `steps` steps at s = 1 (counted on a
    stand-in denoiser; a guided step evaluates the batch [cond; ref] once, so a guided image
    costs twice as many rows)."""
    from cfgdiff.sampling.samplers import run_sampler

    calls = []

    def count(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    run_sampler(name, count, torch.zeros(1, 1, 1, 1), schedule, steps)
    return len(calls)


def grid_table(path: Path, samplers, steps_list, scales, n: int, device: str, out: Path,
               data_dir: Path | None = None, precision: str = "auto") -> list[dict]:  # fmt: skip
    """Print the grid (module docstring, 3) and return its cells."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.evaluate import ReferenceOptions
    from cfgdiff.metrics.sweep import SweepRequest, sweep
    from cfgdiff.runtime import describe_machine, resolve_device
    from cfgdiff.sampling.request import SampleRequest
    from cfgdiff.schedule import make_schedule

    loaded = load_for_sampling(path, torch.device("cpu"))
    d = loaded.cfg.diffusion
    schedule = make_schedule(d.schedule, d.timesteps)
    print(
        f"\ngrid: {loaded.path} ({loaded.cfg.dataset}, preset {loaded.cfg.preset}), {n} samples "
        f"per cell, the same noise in every cell; {describe_machine(resolve_device(device))}, "
        f"precision {precision}"
    )
    print(
        f"{'sampler':12s} {'steps':>5s} {'NFE':>4s} {'s':>4s} {'FID':>7s} {'prec':>6s} "
        f"{'recall':>6s} {'acc':>6s} {'img/s':>6s} (img/s: over the cell's scales)"
    )
    cells, floor = [], None
    for name in samplers:
        nfe = {steps: network_evaluations(name, schedule, steps) for steps in steps_list}
        for steps in steps_list:
            settings = SamplingSettings(
                sampler=name, steps=steps, seed=0, device=device, precision=precision
            )
            req = SweepRequest(
                sampling=SampleRequest(checkpoint=path, settings=settings), scales=tuple(scales),
                n=n, out=out / f"{name}-{steps}", reference=ReferenceOptions(data_dir=data_dir),
            )  # fmt: skip
            res = sweep(req)
            floor = res.record.get("real_floor", floor)
            speed = res.record.get("sampling_images_per_s")  # over the sweep's scales
            for r in res.record["rows"]:
                s = float(r["scale"])
                cell = {"sampler": name, "steps": steps, "nfe": nfe[steps] * (1 if s == 1 else 2),
                        **{k: r[k] for k in ("scale", "fid", "precision", "recall",
                                             "class_accuracy")}}  # fmt: skip
                cells.append(cell)
                ips = f"{speed:6.1f}" if speed is not None else "     -"
                print(
                    f"{name:12s} {steps:5d} {cell['nfe']:4d} {s:4g} {r['fid']:7.3f} "
                    f"{r['precision']:6.3f} {r['recall']:6.3f} {r['class_accuracy']:6.3f} {ips}",
                    flush=True,
                )
    if floor is not None:
        print(f"real floor: FID {floor['fid']:.3f}, precision {floor['precision']:.3f}, "
              f"recall {floor['recall']:.3f}, accuracy {floor['class_accuracy']:.3f}")  # fmt: skip
    best = min(cells, key=lambda c: c["fid"])
    s1 = [c for c in cells if c["scale"] == 1]
    acc1 = max(s1, key=lambda c: (c["class_accuracy"], -c["fid"])) if s1 else None
    print(f"best FID: {best['sampler']} {best['steps']} steps at s = {best['scale']:g}: "
          f"{best['fid']:.3f}")  # fmt: skip
    if acc1 is not None:
        print(f"best accuracy at s = 1: {acc1['sampler']} {acc1['steps']} steps: "
              f"{acc1['class_accuracy']:.3f} (FID {acc1['fid']:.3f})")  # fmt: skip
    return cells


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="seconds: few steps, few samples")
    p.add_argument("--n", type=int, default=200, help="samples per checkpoint cell")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", type=Path, default=None, help="the judge's data directory")
    p.add_argument("--grid", action="store_true", help="sampler x steps x scale on --checkpoint")
    p.add_argument("--grid-samplers", default=",".join(SAMPLERS))
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--grid-steps", default="10,20,35")
    p.add_argument("--grid-scales", default="1,1.5,3")
    p.add_argument("--grid-out", type=Path, default=None, help="the sweeps' folders (default: a "
                   "temporary folder)")  # fmt: skip
    a = p.parse_args()
    if a.grid:
        import tempfile

        if a.checkpoint is None:
            p.error("--grid needs --checkpoint")
        with tempfile.TemporaryDirectory() as tmp:
            grid_table(
                a.checkpoint, a.grid_samplers.split(","),
                [int(v) for v in a.grid_steps.split(",")],
                [float(v) for v in a.grid_scales.split(",")], a.n, a.device,
                a.grid_out or Path(tmp), a.data_dir, a.precision,
            )  # fmt: skip
        return 0
    if a.quick:
        oracle_table([5, 10], 500)
    else:
        oracle_table([5, 10, 20, 50, 100], 20_000)
    if a.checkpoint is not None:
        steps = (
            {"ddim": [5], "dpmpp-2m": [5]}
            if a.quick
            else {"ddpm": [10, 25, 50, 100], "ddim": [5, 10, 20, 50], "dpmpp-2m": [5, 10, 20, 50]}
        )
        checkpoint_table(a.checkpoint, steps, a.n, a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
