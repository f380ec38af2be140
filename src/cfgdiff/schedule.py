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


def make_schedule(name: str, T: int) -> Schedule:
    if name == "linear":
        return linear_schedule(T)
    if name == "cosine":
        return cosine_schedule(T)
    raise ConfigError(f"schedule must be 'linear' or 'cosine', got {name!r}")


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The decreasing timesteps a sampler visits, T-1 first.

    "trailing" (Lin et al. 2023, Table 2) always starts at t = T-1, the step the prior N(0, I)
    actually matches; "uniform" (DDIM's "leading") is linspace(0, T-1) rounded.
    """
    if not 1 <= steps <= T:
        raise ConfigError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "trailing":
        ts = [round(T - 1 - i * T / steps) for i in range(steps)]
    elif spacing == "uniform":
        ts = [round(x) for x in torch.linspace(T - 1, 0, steps).tolist()]
    else:
        raise ConfigError(f"spacing must be 'trailing' or 'uniform', got {spacing!r}")
    out = sorted(set(ts), reverse=True)
    assert len(out) == steps, (T, steps, spacing)
    return out
