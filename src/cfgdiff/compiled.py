"""Compiled networks that cannot silently be wrong.

Owns: `CompiledForward`, a network's forward pass through torch.compile (CUDA graphs on CUDA)
that falls back to eager for good on any failure and checks its first output against eager;
and `check_compiled_gradients`, which compares a compiled training step's gradients with the
eager step's before a run trusts it (docs/DESIGN.md, "Compilation policy"). Whether to compile
at all is runtime.py's policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cfgdiff.runtime import error_line, is_out_of_memory


class CompiledForward:
    """f(x, t, y) through torch.compile, falling back to the eager network for good the first time
    the compiled one raises (a missing C++ compiler, an unsupported op, a failed CUDA graph).

    On CUDA the default mode is "reduce-overhead" (CUDA graphs: one replay per sampler step
    instead of hundreds of kernel launches). Replays reuse their output buffers, so each output is
    cloned before it is returned. Shapes must stay fixed for graphs to be reused: sample.generate
    pads its last batch when given `static_batches=True`. `fallback_reason` says why compilation
    was given up, or is None.

    A compile that succeeds can still be wrong (docs/DESIGN.md, "Compilation policy"), so the
    first compiled output is compared with the eager network's on the same input; if they differ
    by more than OUTPUT_TOLERANCE (relative L2) or the compiled one is not finite, the eager
    network is used from then on.
    """

    # Relative L2 difference allowed between the first compiled and eager outputs: far above
    # what healthy compiles give in fp32 and bf16 (docs/DESIGN.md, "Compilation policy").
    OUTPUT_TOLERANCE = 0.1

    def __init__(self, net, device: torch.device, *, mode: str | None = None, backend=None):
        self.net = net
        self.cudagraphs = device.type == "cuda" and mode in (None, "reduce-overhead")
        if mode is None and device.type == "cuda":
            mode = "reduce-overhead"
        kw = {"mode": mode} if mode is not None else {}
        if backend is not None:
            kw["backend"] = backend
        self.compiled = torch.compile(net, **kw)
        self.fallback_reason: str | None = None
        self.checked = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(x, t, y)
                out = out.clone() if self.cudagraphs else out
            except Exception as e:  # compilation failures come in many types
                if is_out_of_memory(e):  # not a compile failure: eager would run out too
                    raise
                self.fallback_reason = error_line(e)
                self.compiled = None
            else:
                if self.checked:
                    return out
                return self._check(out, x, t, y)
        return self.net(x, t, y)

    def _check(self, out, x, t, y) -> torch.Tensor:
        ref = self.net(x, t, y)
        diff = float((out.detach().float() - ref.detach().float()).norm())
        scale = float(ref.detach().float().norm())
        self.checked = True
        if math.isfinite(diff) and diff <= self.OUTPUT_TOLERANCE * scale:
            return out
        rel = diff / max(scale, 1e-30)
        self.fallback_reason = (
            f"compiled output differs from eager: relative difference {rel:.3g} "
            f"(limit {self.OUTPUT_TOLERANCE:g})"
        )
        self.compiled = None
        return ref


# Largest allowed (median, max) over parameters of |g_compiled - g_eager| / |g_eager|, before the
# allowance for stochastic layers: well above healthy compiled steps in fp32 and bf16
# (docs/DESIGN.md, "Compilation policy"), far below a miscompile (a lost gradient gives 1, a
# flipped sign 2). The margins leave room for TF32 and other kernels on CUDA.
GRADIENT_TOLERANCE = {"fp32": (0.01, 0.1), "bf16": (0.05, 0.3)}


@dataclass(frozen=True)
class GradientCheck:
    """A compiled training step's gradients against the eager step's, on one batch with the same
    noise. `diff_*` are the median and max over parameters of |g_c - g_e| / |g_e|; `noise_*` the
    same between two eager steps whose global random draws differ (dropout; 0 without it), which
    widens the tolerance by twice itself. `lost` counts parameters with a finite, nonzero eager
    gradient whose compiled gradient is missing, zero or non-finite."""

    params: int
    lost: int
    diff_median: float
    diff_max: float
    noise_median: float
    noise_max: float
    precision: str

    @property
    def limits(self) -> tuple[float, float]:
        tol_median, tol_max = GRADIENT_TOLERANCE.get(self.precision, GRADIENT_TOLERANCE["bf16"])
        return tol_median + 2 * self.noise_median, tol_max + 2 * self.noise_max

    @property
    def ok(self) -> bool:
        lim_median, lim_max = self.limits
        return (
            self.params > 0
            and self.lost == 0
            and self.diff_median <= lim_median
            and self.diff_max <= lim_max
        )

    def describe(self) -> str:
        lim_median, lim_max = self.limits
        return (
            f"{self.lost} of {self.params} parameters lost their gradient; relative gradient "
            f"difference median {self.diff_median:.2g} (limit {lim_median:.2g}), max "
            f"{self.diff_max:.2g} (limit {lim_max:.2g})"
        )


def check_compiled_gradients(
    net: torch.nn.Module,
    compiled: Callable,
    loss_of: Callable[[Callable], torch.Tensor],
    precision: str,
    *,
    seed: int = 0,
) -> GradientCheck:
    """Run one training step's forward and backward pass through `compiled` and through `net`, and
    compare the gradients (a successful compile can still be wrong: see docs/DESIGN.md).

    `loss_of(f)` must compute the loss of one fixed batch through f with the same noise each call
    (a fresh, seeded generator). The check runs on the parameters plus a small seeded perturbation:
    a fresh UNet's output layers are zero, which makes every other gradient zero and the
    comparison blind. Parameters, buffers, gradients and the global RNG states are restored
    afterwards, so training goes on exactly as if the check had not run. Compilation errors
    propagate to the caller."""
    params = [p for p in net.parameters() if p.requires_grad]
    device = params[0].device
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    devices = [device] if device.type == "cuda" else []

    def grads(f, rng_seed: int) -> list[torch.Tensor | None]:
        torch.manual_seed(rng_seed)
        for p in params:
            p.grad = None
        loss_of(f).backward()
        return [None if p.grad is None else p.grad.detach().float().clone() for p in params]

    try:
        with torch.random.fork_rng(devices=devices):
            g = torch.Generator(device=device).manual_seed(seed)
            with torch.no_grad():
                for p in params:
                    scale = 0.1 * max(float(p.detach().float().pow(2).mean().sqrt()), 0.1)
                    noise = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype)
                    p.add_(noise, alpha=scale)
            g_compiled = grads(compiled, seed)
            g_eager = grads(net, seed)
            g_resampled = grads(net, seed + 1)
    finally:
        net.load_state_dict(saved)
        for p in params:
            p.grad = None

    diffs, noise, lost = [], [], 0
    for gc, ge, gr in zip(g_compiled, g_eager, g_resampled, strict=True):
        if ge is None or not bool(torch.isfinite(ge).all()):
            continue
        norm = ge.norm()
        if float(norm) == 0:
            continue
        if gc is None or not bool(torch.isfinite(gc).all()) or float(gc.abs().max()) == 0:
            lost += 1
            gc = torch.zeros_like(ge)
        diffs.append(float((gc - ge).norm() / norm))
        noise.append(0.0 if gr is None else float((gr - ge).norm() / norm))

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2] if v else 0.0

    return GradientCheck(
        params=len(diffs),
        lost=lost,
        diff_median=median(diffs),
        diff_max=max(diffs, default=0.0),
        noise_median=median(noise),
        noise_max=max(noise, default=0.0),
        precision=precision,
    )
