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
    return sample_dpmpp_2m_sde(
        denoise, x_T, schedule, steps, eta=0.0, spacing=spacing, callback=callback
    )


def sample_dpmpp_2m_sde(
    denoise: Callable,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    eta: float = 1.0,
    spacing: str = "trailing",
    generator=None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, section 5 and Appendix: SDE-DPM-Solver++ with the
    2M multistep correction; k-diffusion's `sample_dpmpp_2m_sde`, midpoint form), data
    prediction. With lambda_t = log(alpha_t / sigma_t), h = lambda_t - lambda_s (s the
    previous, noisier timestep) and D the multistep estimate of x_0 as in sample_dpmpp_2m:
    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t (1 - e^{-(1 + eta) h}) D
          + sigma_t sqrt(1 - e^{-2 eta h}) z.
    eta = 1 is the SDE (fresh noise replaces part of x_s at every step); eta = 0 is
    sample_dpmpp_2m exactly. The last step, to sigma = 0, returns x0_hat."""
    if eta < 0:
        raise ConfigError(f"`eta` must be >= 0, got {eta}")
    ts = spaced_timesteps(schedule, steps, spacing)
    x = x_T
    x0_prev: torch.Tensor | None = None
    h_prev: float | None = None
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_next = _ab(schedule, t), _ab(schedule, t_next)
        a, s = ab**0.5, (1 - ab) ** 0.5
        _, x0 = _predict(denoise, x, t, ab)
        if t_next < 0:
            x = x0
        else:
            a_n, s_n = ab_next**0.5, (1 - ab_next) ** 0.5
            h = math.log(a_n / s_n) - math.log(a / s)
            if x0_prev is None or h_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_n / s) * math.exp(-eta * h) * x - a_n * math.expm1(-(1 + eta) * h) * d
            if eta > 0:
                x = x + s_n * (-math.expm1(-2 * eta * h)) ** 0.5 * randn_like(x, generator)
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _sigma_ve(schedule: Schedule, t: int) -> float:
    """sigma_t / alpha_t: the noise level of timestep t in EDM's variance-exploding form
    x = x_0 + sigma n (Karras et al. 2022, Table 1, VP); 0 for the clean data (t = -1)."""
    ab = _ab(schedule, t)
    return ((1 - ab) / ab) ** 0.5


# EDM's largest noise level (Karras et al. 2022, section 5: sigma_max = 80). A discrete
# schedule's top level lies far above it (2e4 for the cosine schedule at T = 1000), where a Heun
# step's trapezoid spans a ratio of thousands and multiplies the Euler step's error by it; steps
# from above it are Euler steps.
EDM_SIGMA_MAX = 80.0


def sample_edm(
    denoise: Callable,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int,
    *,
    churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
    spacing: str = "trailing",
    generator=None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): at each noise level sigma_i
    with S_tmin <= sigma_i <= S_tmax, raise it to sigma_hat = (1 + gamma) sigma_i,
    gamma = min(S_churn / N, sqrt 2 - 1), by adding noise of variance
    S_noise^2 (sigma_hat^2 - sigma_i^2); then a Heun step (Euler and its trapezoidal correction)
    to sigma_{i+1}. sigma is sigma_t / alpha_t (x in EDM's form x / alpha_t); the network is
    discrete in time, so sigma_hat is the noise level of the nearest timestep at or above
    (1 + gamma) sigma_i. The last step (to sigma = 0, as in Algorithm 2) and steps from above
    EDM_SIGMA_MAX are Euler steps: N steps evaluate the network 2N - 1 times on a grid whose top
    is below sigma_max, 2N - 2 on the trailing grid of a cosine or linear schedule, whose first
    level is above it. `churn` = S_churn; 0 gives the deterministic Heun sampler (Algorithm 1,
    with `s_noise` unused)."""
    if churn < 0:
        raise ConfigError(f"`churn` must be >= 0, got {churn}")
    ts = spaced_timesteps(schedule, steps, spacing)
    sigmas = ((1 - schedule.alpha_bar.double()) / schedule.alpha_bar.double()).sqrt()
    gamma = min(churn / len(ts), 2**0.5 - 1)
    x = x_T / _ab(schedule, ts[0]) ** 0.5  # EDM's form: x / alpha_t
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        sigma = _sigma_ve(schedule, t)
        t_hat = t
        if gamma > 0 and s_tmin <= sigma <= s_tmax:
            above = int(torch.searchsorted(sigmas, sigma * (1 + gamma)))
            t_hat = min(max(above, t), len(sigmas) - 1)
        sigma_hat = _sigma_ve(schedule, t_hat)
        if sigma_hat > sigma:
            x = x + s_noise * (sigma_hat**2 - sigma**2) ** 0.5 * randn_like(x, generator)
        sigma_next = _sigma_ve(schedule, t_next)
        x0 = _edm_denoise(denoise, x, schedule, t_hat)
        # Euler (Algorithm 2, lines 7-8): x + (sigma_next - sigma_hat) (x - x0) / sigma_hat, as
        # the blend r x + (1 - r) x0, which does not cancel x ~ 2e4 against itself at the top
        r = sigma_next / sigma_hat
        x_euler = r * x + (1 - r) * x0
        if t_next < 0 or sigma_hat > EDM_SIGMA_MAX:
            x = x_euler  # an Euler step (= DDIM's): the last one, and any from above sigma_max
        else:  # line 10: x + (sigma_next - sigma_hat) (d + d') / 2, as the mean of two steps
            x0_next = _edm_denoise(denoise, x_euler, schedule, t_next)
            d_next = (x_euler - x0_next) / sigma_next
            x = 0.5 * x_euler + 0.5 * (x + (sigma_next - sigma_hat) * d_next)
        if callback is not None:
            callback(i, t, x * _ab(schedule, t_next) ** 0.5, x0)
    return x


def _edm_denoise(denoise: Callable, x: torch.Tensor, schedule: Schedule, t: int) -> torch.Tensor:
    """D(x; sigma_t) of EDM's form: x0_hat of the network at timestep t, given x / alpha_t."""
    ab = _ab(schedule, t)
    return _predict(denoise, x * ab**0.5, t, ab)[1]


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
    "dpmpp-2m-sde": SamplerEntry(sample_dpmpp_2m_sde, deterministic=False),
    "edm": SamplerEntry(sample_edm, deterministic=False),
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
