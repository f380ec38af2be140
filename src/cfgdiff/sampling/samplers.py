"""Samplers: stateless functions with one signature.

    sample_X(denoise, x_T, schedule, steps, *, generator=None, callback=None, **options) -> x_0

`denoise(x_t, t) -> eps_hat` is any noise predictor; samplers know nothing about labels or
guidance. What a step needs is the pair (eps_hat, x0_hat): a `Denoiser` (what
guidance.guided_denoiser returns) gives both, each computed in its well-conditioned form by the
code that knows what the network predicts; for any other denoiser x0_hat = (x_t - sigma_t
eps_hat) / alpha_t, which multiplies the rounding of eps_hat by sigma_t / alpha_t (2e4 at the
cosine schedule's last step; docs/DESIGN.md, "Sampling precision"). `generator` is a
torch.Generator or a PerSampleNoise (one stream per sample, so a sample's image does not depend
on the batch it was drawn in). `callback(i, t, x_t, x0_hat)` is called after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cfgdiff.errors import ConfigError
from cfgdiff.schedule import Schedule, spaced_timesteps


class PerSampleNoise:
    """Independent Gaussian streams, one per sample, each seeded from (seed, index).

    Draws happen on the CPU in float32 and are then moved, so results do not depend on the device
    RNG either.
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.generators = []
        for i in indices:
            state = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, np.uint32)
            g = torch.Generator()
            g.manual_seed(int(state[0]) << 32 | int(state[1]))
            self.generators.append(g)

    def randn(self, shape: Sequence[int], device, dtype=torch.float32) -> torch.Tensor:
        """A tensor of shape (len(indices), *shape)."""
        out = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, PerSampleNoise):
        return generator.randn(x.shape[1:], x.device, x.dtype)
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x)


class Denoiser:
    """A denoiser that hands the samplers both predictions at (x_t, t): `predict(x_t, t) ->
    (eps_hat, x0_hat)`, consistent (x_t = alpha_t x0_hat + sigma_t eps_hat) and each computed
    without dividing by a small alpha_t or sigma_t where that can be avoided. Called, it gives
    eps_hat alone, like any denoise(x_t, t)."""

    def __init__(self, predict: Callable[[torch.Tensor, torch.Tensor], tuple]):
        self.predict = predict

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x_t, t)[0]


def _predict(denoise: Callable, x: torch.Tensor, t: int, ab: float):
    """(eps_hat, x0_hat) at timestep t: a Denoiser's own pair, or for a plain denoise(x_t, t)
    its eps_hat and the x0_hat it implies."""
    tb = _t_batch(x, t)
    if isinstance(denoise, Denoiser):
        return denoise.predict(x, tb)
    eps = denoise(x, tb)
    return eps, (x - (1 - ab) ** 0.5 * eps) / ab**0.5


def _ab(schedule: Schedule, t: int) -> float:
    """alpha_bar_t as a Python float, with alpha_bar_{-1} = 1 (the clean data)."""
    return 1.0 if t < 0 else float(schedule.alpha_bar[t])


def _t_batch(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def sample_ddim(
    denoise: Callable,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    eta: float = 0.0,
    spacing: str = "trailing",
    generator=None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12):
    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - ab_prev)/(1 - ab)) sqrt(1 - ab/ab_prev)  (Eq. 16).
    eta = 0 is the deterministic probability-flow sampler; eta = 1 equals ancestral DDPM."""
    if eta < 0:
        raise ConfigError(f"`eta` must be >= 0, got {eta}")
    ts = spaced_timesteps(schedule, steps, spacing)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_prev = _ab(schedule, t), _ab(schedule, t_prev)
        eps, x0 = _predict(denoise, x, t, ab)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        dir_coef = max(1 - ab_prev - sigma**2, 0.0) ** 0.5
        x = ab_prev**0.5 * x0 + dir_coef * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddpm(
    denoise: Callable,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    spacing: str = "trailing",
    generator=None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020, Eqs. 6-7), respaced to `steps` timesteps (Nichol &
    Dhariwal 2021, Sec. 4): with beta'_t = 1 - ab_t / ab_prev,
    mean = sqrt(ab_prev) beta'/(1 - ab) x0_hat + sqrt(1 - beta') (1 - ab_prev)/(1 - ab) x_t,
    var = beta' (1 - ab_prev)/(1 - ab)  (beta-tilde; no noise on the last step)."""
    ts = spaced_timesteps(schedule, steps, spacing)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_prev = _ab(schedule, t), _ab(schedule, t_prev)
        beta = 1 - ab / ab_prev
        _, x0 = _predict(denoise, x, t, ab)
        mean = (ab_prev**0.5 * beta / (1 - ab)) * x0 + (
            (1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)
        ) * x
        var = beta * (1 - ab_prev) / (1 - ab)
        x = mean + var**0.5 * randn_like(x, generator) if t_prev >= 0 else mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_dpmpp_2m(
    denoise: Callable,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    spacing: str = "trailing",
    generator=None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022, Algorithm 2).

    With lambda_t = log(alpha_t / sigma_t) and h_i = lambda_{t_i} - lambda_{t_{i-1}}:
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i, where
    D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2}, r_i = h_{i-1} / h_i,
    and D_i = x0_hat_{i-1} on the first step and on the last step (to sigma = 0).
    Deterministic: `generator` is accepted for the common signature and not used.
    """
    del generator
    ts = spaced_timesteps(schedule, steps, spacing)
    x = x_T
    x0_prev: torch.Tensor | None = None
    h_prev: float | None = None
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_next = _ab(schedule, t), _ab(schedule, t_next)
        a, s = ab**0.5, (1 - ab) ** 0.5
        _, x0 = _predict(denoise, x, t, ab)
        if t_next < 0:  # final step to the clean data: alpha = 1, sigma = 0
            x = x0
        else:
            a_n, s_n = ab_next**0.5, (1 - ab_next) ** 0.5
            h = math.log(a_n / s_n) - math.log(a / s)
            if x0_prev is None or h_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_n / s) * x - a_n * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


@dataclass(frozen=True)
class SamplerEntry:
    """A sampler of the table: its function and the keyword options, beyond the common
    signature, that it takes (run_sampler passes those and no others)."""

    fn: Callable[..., torch.Tensor]
    options: tuple[str, ...] = ()
    # solves the probability-flow ODE with no noise of its own (DDIM at eta = 0)
    deterministic: bool = True


# Every sampler by the name the CLI, config.json, benchmarks and the docs use. A new
# sampler is one function with the common signature and one entry here.
SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry(sample_ddpm, deterministic=False),
    "ddim": SamplerEntry(sample_ddim, options=("eta",)),
    "dpmpp-2m": SamplerEntry(sample_dpmpp_2m),
}


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ConfigError(f"`sampler` must be one of {', '.join(SAMPLERS)}, got {name!r}")


def run_sampler(
    name: str,
    denoise: Callable,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    spacing: str = "trailing",
    generator=None,
    callback: Callable | None = None,
    **options,
) -> torch.Tensor:
    """The sampler `name` of SAMPLERS; `options` (eta) go to the samplers that take them and are
    ignored by the others."""
    check_sampler(name)
    entry = SAMPLERS[name]
    kw = {k: v for k, v in options.items() if k in entry.options}
    return entry.fn(
        denoise, x_T, schedule, steps, spacing=spacing, generator=generator, callback=callback, **kw
    )
