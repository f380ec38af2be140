"""The folder of `cfgdiff export --format diffusers` against cfgdiff's own samplers.

Exports a checkpoint into a temporary folder, loads it with `CfgdiffPipeline.from_pretrained`,
and samples it with diffusers' DDIMScheduler and DPMSolverMultistepScheduler (made from the
folder's scheduler config), guided in cfgdiff's convention, from the x_T cfgdiff draws for the
same seed; cfgdiff samples the same labels with ddim and dpmpp-2m (fp32, CPU). Prints, per
scheduler, scale and step count, the largest |difference| in [-1, 1] space, the pixels whose
uint8 level differs and by how many levels at most, and the seconds per image each way.

    python bench/diffusers_export.py --checkpoint runs/demo [--steps 20] [--scales 0,1,3]
    python bench/diffusers_export.py --quick --preset tiny      (random weights, seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfgdiff.runtime import configure_cpu_threads, describe_machine
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance, guided_denoiser
from cfgdiff.sampling.samplers import PerSampleNoise, run_sampler
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.schedule import make_schedule

PAIRS = [("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpmpp-2m")]


def _exported(a, tmp: Path):
    """(net, cfg, folder, what): the model cfgdiff samples and the diffusers folder of it."""
    if a.checkpoint is not None:
        from cfgdiff.checkpoint import load_for_sampling
        from cfgdiff.export import export

        export(a.checkpoint, tmp / "exported", "diffusers")
        loaded = load_for_sampling(a.checkpoint)
        return loaded.net, loaded.cfg, tmp / "exported", str(loaded.path)
    # random weights, saved as the exporter saves them (its components; no checkpoint to read)
    from cfgdiff.export.diffusers import make_scheduler
    from cfgdiff.export.diffusers_pipeline import CfgdiffPipeline, CfgdiffUNet
    from cfgdiff.presets import PRESETS

    cfg = PRESETS[a.preset]
    torch.manual_seed(0)
    unet = CfgdiffUNet(run_config=cfg.to_dict())
    with torch.no_grad():  # a fresh UNet's output layers are zero: every image would be grey
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    CfgdiffPipeline(unet=unet, scheduler=make_scheduler(cfg)).save_pretrained(tmp / "exported")
    return unet.net.eval(), cfg, tmp / "exported", f"preset {a.preset} (random weights)"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, help="checkpoint or run folder (a class model)")
    p.add_argument("--preset", default="tiny", help="without --checkpoint: random weights")
    p.add_argument("--steps", default="20", help="comma-separated step counts")
    p.add_argument("--scales", default="0,1,3", help="comma-separated guidance scales s")
    p.add_argument("--per-class", type=int, default=2, help="images per class")
    p.add_argument("--device", default="cpu", help="cpu only (the comparison is in fp32)")
    p.add_argument("--quick", action="store_true", help="5 steps, s = 3, one image per class")
    a = p.parse_args()
    if a.device != "cpu":
        print("diffusers_export.py compares on the CPU only", file=sys.stderr)
        return 2
    configure_cpu_threads()
    import diffusers

    from cfgdiff.export.diffusers_pipeline import CfgdiffPipeline

    steps = [5] if a.quick else [int(s) for s in a.steps.split(",")]
    scales = [3.0] if a.quick else [float(s) for s in a.scales.split(",")]
    per_class = 1 if a.quick else a.per_class
    with tempfile.TemporaryDirectory() as tmp:
        net, cfg, folder, what = _exported(a, Path(tmp))
        pipe = CfgdiffPipeline.from_pretrained(folder)
    m, d = cfg.model, cfg.diffusion
    labels = [c for c in range(m.num_classes) for _ in range(per_class)]
    y = torch.tensor(labels)
    x_T = PerSampleNoise(0, range(len(y))).randn((m.in_channels, m.image_size, m.image_size), "cpu")
    schedule = make_schedule(d.schedule, d.timesteps)
    print(f"machine: {describe_machine(torch.device('cpu'))}, diffusers {diffusers.__version__}")
    print(f"model: {what} ({d.schedule}, {d.prediction}-prediction, T = {d.timesteps}), "
          f"{len(y)} images of {m.in_channels}x{m.image_size}x{m.image_size}")  # fmt: skip
    print(f"{'scheduler':<28} {'cfgdiff':<9} {'steps':>5} {'s':>4} {'max |d|':>9} "
          f"{'uint8 differ':>14} {'by':>5} {'diffusers s/img':>15} "
          f"{'cfgdiff s/img':>13}")  # fmt: skip
    for scheduler, sampler in PAIRS:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
        for n_steps in steps:
            for s in scales:
                t0 = time.perf_counter()
                got = pipe(
                    labels, guidance_scale=s, num_inference_steps=n_steps, latents=x_T,
                    output_type="pt",
                ).images  # fmt: skip
                t_diffusers = (time.perf_counter() - t0) / len(y)
                denoise = guided_denoiser(
                    net, y, schedule, null_label=m.num_classes, prediction=d.prediction,
                    guidance=Guidance(scale=s),
                )  # fmt: skip
                with torch.inference_mode():
                    x0 = run_sampler(sampler, denoise, x_T, schedule, n_steps, spacing="trailing")
                settings = SamplingSettings(
                    sampler=sampler, steps=n_steps, spacing="trailing", eta=0.0, seed=0,
                    device="cpu", precision="fp32", compile="off",
                )  # fmt: skip
                t0 = time.perf_counter()
                u8 = generate(net, cfg, y, settings=settings, guidance=Guidance(scale=s))
                t_cfgdiff = (time.perf_counter() - t0) / len(y)
                diff = float((got * 2 - 1 - x0).abs().max())
                levels = ((got * 255).round().to(torch.uint8).int() - u8.int()).abs()
                differ, worst = int((levels > 0).sum()), int(levels.max())
                print(f"{scheduler:<28} {sampler:<9} {n_steps:>5} {s:>4g} {diff:>9.1e} "
                      f"{differ:>6} of {u8.numel():<6} {worst:>5} {t_diffusers:>15.4f} "
                      f"{t_cfgdiff:>13.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
