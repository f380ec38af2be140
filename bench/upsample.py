"""The UNet's 2x nearest upsampling: autograd's own backward of expand + reshape (a sum over two
strided axes) against the native upsample_nearest2d_backward kernel that layers.upsample_nearest2x
uses eagerly, in the same run: the op alone (forward + backward, and forward alone as in
sampling, per shape and dtype; F.interpolate beside them, whose backward is the same native
kernel but whose forward is slower in fp32), then whole training steps of a preset with the
first two forms, interleaved.

    python bench/upsample.py --device cpu [--quick] [--preset cpu-demo]
"""

from __future__ import annotations

import argparse

import torch
from timing import median, timed_ms

from cfgdiff import layers
from cfgdiff.presets import PRESETS

FORMS = {"autograd": layers._expand2x, "native": layers.upsample_nearest2x}


def interpolate(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")


def op_ms(form, x: torch.Tensor, grad: torch.Tensor | None, reps: int) -> float:
    """Median milliseconds of forward + backward of one upsampling (forward alone, without
    autograd, when grad is None)."""

    def once() -> None:
        if grad is None:
            with torch.no_grad():
                form(x)
        else:
            torch.autograd.grad(form(x), x, grad)

    once()
    return median([timed_ms(once, x.device) for _ in range(reps)])


def paired_steps(cfg, device, batch: int, steps: int) -> dict[str, list[float]]:
    """Milliseconds of each training step, the two forms' steps interleaved (ABBA...) on two
    identical networks and one batch, so that this machine's drifting speed hits both alike."""
    from cfgdiff.diffusion import training_loss
    from cfgdiff.runtime import autocast
    from cfgdiff.schedule import make_schedule
    from cfgdiff.unet import UNet

    sch = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    c, s = cfg.model.in_channels, cfg.model.image_size
    x = torch.rand(batch, c, s, s, device=device) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    nets = {}
    for name in FORMS:
        torch.manual_seed(0)
        net = UNet(cfg.model).to(device)
        nets[name] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4))

    def step(name: str) -> float:
        net, opt = nets[name]

        def once() -> None:
            with autocast(device, "bf16"):
                loss = training_loss(net, x, y, sch, cfg.diffusion, cfg.model.num_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        layers.upsample_nearest2x = FORMS[name]
        try:
            return timed_ms(once, device)
        finally:
            layers.upsample_nearest2x = FORMS["native"]

    out: dict[str, list[float]] = {name: [] for name in FORMS}
    order = list(FORMS)
    for i in range(steps + 2):  # two warm-up rounds
        for name in order if i % 2 else order[::-1]:
            dt = step(name)
            if i >= 2:
                out[name].append(dt)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="seconds: small shapes, few repetitions")
    p.add_argument("--preset", default="cpu-demo", help="the training step of this preset")
    a = p.parse_args()
    device = torch.device(a.device)
    reps = 3 if a.quick else 21
    shapes = [(4, 8, 4, 4), (4, 8, 8, 8)] if a.quick else [(64, 64, 7, 7), (64, 64, 14, 14)]
    ops = {**FORMS, "interpolate": interpolate}
    print("upsampling, median ms: forward + backward (training), forward alone (sampling)")
    print(
        f"{'shape (in)':15s} {'dtype':9s} "
        + " ".join(f"{k + ' ' + m:>16s}" for m in ("f+b", "fwd") for k in ops)
        + f" {'f+b speed-up':>12s}"
    )
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
            b, c, h, w = shape
            grad = torch.randn(b, c, 2 * h, 2 * w, dtype=dtype, device=device)
            fb = {k: op_ms(f, x, grad, reps) for k, f in ops.items()}
            fw = {k: op_ms(f, x, None, reps) for k, f in ops.items()}
            print(
                f"{'x'.join(map(str, shape)):15s} {str(dtype)[6:]:9s} "
                + " ".join(f"{v:16.2f}" for v in [*fb.values(), *fw.values()])
                + f" {fb['autograd'] / fb['native']:11.2f}x",
                flush=True,
            )

    cfg = PRESETS["tiny" if a.quick else a.preset]
    steps = 3 if a.quick else 40
    batch = cfg.train.batch_size
    print(f"\ntraining step, {cfg.preset} (bf16, batch {batch}): {steps} steps of each form")
    ms = paired_steps(cfg, device, batch, steps)
    print(f"{'form':9s} {'median ms':>9s} {'min ms':>7s} {'img/s (median)':>14s}")
    med = {k: median(v) for k, v in ms.items()}
    for name, v in ms.items():
        print(f"{name:9s} {med[name]:9.1f} {min(v):7.1f} {1e3 * batch / med[name]:14.1f}")
    print(f"speed-up of the step (median): {med['autograd'] / med['native']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
