"""Noise schedules of discrete-time DDPM as immutable data, and timestep spacing for samplers.

Owns: beta_t, alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, and the choice of the
subset of timesteps a sampler visits. Knows nothing about networks, labels or guidance.
Notation follows Ho et al. 2020 (DDPM) with 0-based t: x_t = sqrt(alpha_bar_t) x_0 +
sqrt(1 - alpha_bar_t) eps  (DDPM Eq. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cfgdiff.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # (T,) float64 on the CPU
    alpha_bar: torch.Tensor  # (T,) float64, decreasing from ~1 to ~0

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    def log_snr(self) -> torch.Tensor:
        """lambda_t = log(alpha_bar_t / (1 - alpha_bar_t))."""
        return torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear betas (Ho et al. 2020, Sec. 4), rescaled so that other T keep the same
    endpoints of alpha_bar."""
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    return _from_betas(betas)


def cosine_schedule(T: int = 1000, s: float = 0.008) -> Schedule:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1+s) pi/2),
    betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return _from_betas(betas)


def _from_betas(betas: torch.Tensor) -> Schedule:
    return Schedule(betas=betas, alpha_bar=torch.cumprod(1 - betas, dim=0))


# Noise schedules by name: what config.json records and make_schedule builds.
SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, T: int) -> Schedule:
    if name not in SCHEDULES:
        raise ConfigError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](T)


# The timestep spacings a sampler may visit (spaced_timesteps).
SPACINGS = ("trailing", "uniform", "quadratic", "logsnr")


def _round_half_even(num: int, den: int) -> int:
    """num / den rounded to the nearest integer, halves to the even one, in exact arithmetic."""
    q, r = divmod(num, den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def spaced_timesteps(schedule: Schedule, steps: int, spacing: str = "trailing") -> list[int]:
    """The strictly decreasing timesteps a sampler visits, T-1 first.

    - "trailing" (Lin et al. 2023, Table 2): t_i = round(T - i T / steps) - 1, rounding halves
      to even as the table's np.round does (computed exactly, in integers); always starts at
      t = T-1, the step the prior N(0, I) actually matches.
    - "uniform": linspace(T-1, 0, steps) rounded (ends exactly at t = 0).
    - "quadratic" (Song et al. 2021, DDIM App. D.2): t_i = (T-1) (1 - i/steps)^2, dense near
      the data, where small models make the most error.
    - "logsnr": uniform in lambda_t = log(alpha_bar / (1 - alpha_bar)) between lambda_{T-1}
      and lambda_0 (the spacing DPM-Solver assumes), each mapped to the nearest timestep.
    Collisions after rounding are pushed apart, keeping the order and the range [0, T-1].
    """
    T = schedule.T
    if not 1 <= steps <= T:
        raise ConfigError(f"`steps` must be in [1, {T}], got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        ts = torch.tensor([_round_half_even(T * (steps - k), steps) - 1 for k in range(steps)])
    elif spacing == "uniform":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
    elif spacing == "quadratic":
        ts = (T - 1) * (1 - i / steps) ** 2
    elif spacing == "logsnr":
        lam = schedule.log_snr()
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
        # lam is decreasing in t: nearest index by searching the reversed (increasing) sequence
        rev = lam.flip(0)
        idx = torch.searchsorted(rev, targets).clamp(1, T - 1)
        nearer_left = (targets - rev[idx - 1]).abs() < (rev[idx] - targets).abs()
        ts = (T - 1 - (idx - nearer_left.long())).to(torch.float64)
    else:
        raise ConfigError(f"`spacing` must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    out = [int(round(float(t))) for t in ts]
    out[0] = T - 1
    for k in range(len(out) - 2, -1, -1):  # bottom-up: strictly decreasing
        out[k] = max(out[k], out[k + 1] + 1)
    for k in range(len(out)):  # top-down: stay within [0, T-1]
        out[k] = min(out[k], T - 1 - k)
    assert all(a > b for a, b in zip(out, out[1:], strict=False)) and out[-1] >= 0, out
    return out
