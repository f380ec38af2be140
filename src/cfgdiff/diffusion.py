"""The forward process and the training objective.

Owns: q(x_t | x_0) (DDPM Eq. 4), the conversions between eps, x_0 and v predictions, the law
of the training timesteps, the label dropout that trains the null label, and the per-sample
loss. Knows nothing about samplers, guidance scales or the network's architecture (it is
called as a function).
"""

from __future__ import annotations

import torch

from cfgdiff.config import DiffusionConfig
from cfgdiff.schedule import Schedule


def _on(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` copied to `device` once and kept on the tensor (no host-to-device copy in the
    hot loop)."""
    if values.device == device:
        return values
    per_device = values.__dict__.setdefault("_cfgdiff_on_device", {})
    if device not in per_device:
        per_device[device] = values.to(device)
    return per_device[device]


def _coef(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather per-sample schedule values at integer t and shape them (B, 1, 1, 1) like `like`."""
    out = _on(values, like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def alpha_sigma(schedule: Schedule, t: torch.Tensor, like: torch.Tensor):
    """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), shaped for broadcasting."""
    ab = _coef(schedule.alpha_bar, t, like)
    return ab.sqrt(), (1 - ab).sqrt()


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: Schedule):
    """x_t = alpha_t x_0 + sigma_t eps (DDPM Eq. 4)."""
    a, s = alpha_sigma(schedule, t, x0)
    return a * x0 + s * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, Sec. 4)."""
    return a * eps - s * x0


def to_eps(pred: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, kind: str):
    """The eps implied by a network output of the given kind ("eps" or "v").
    For v: eps = sigma_t x_t + alpha_t v, since alpha^2 + sigma^2 = 1."""
    if kind == "eps":
        return pred
    if kind == "v":
        return s * x_t + a * pred
    raise ValueError(f"unknown prediction kind {kind!r}")


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    """x0_hat = (x_t - sigma_t eps_hat) / alpha_t (inverse of Eq. 4)."""
    return (x_t - s * eps) / a


def eps_and_x0(
    pred: torch.Tensor, x_t: torch.Tensor, schedule: Schedule, t: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) implied by a network output of the given kind ("eps" or "v"), each in
    its well-conditioned form and computed in float64 (returned in float64):
      v:   eps = sigma_t x_t + alpha_t v,  x0 = alpha_t x_t - sigma_t v  (no division at all);
      eps: eps = pred,  x0 = (x_t - sigma_t eps) / alpha_t, exact for the given eps.
    Going through eps for a v-model and dividing by alpha_t in the caller's precision would
    multiply the rounding of eps by sigma_t / alpha_t, about 2e4 at t = T-1 of the cosine
    schedule (docs/DESIGN.md, "Sampling precision")."""
    x = x_t.to(torch.float64)
    p = pred.to(torch.float64)
    a, s = alpha_sigma(schedule, t, x)
    if kind == "eps":
        return p, (x - s * p) / a
    if kind == "v":
        return s * x + a * p, a * x - s * p
    raise ValueError(f"unknown prediction kind {kind!r}")


def eps_from_x0(
    x0: torch.Tensor, x_t: torch.Tensor, schedule: Schedule, t: torch.Tensor
) -> torch.Tensor:
    """eps_hat = (x_t - alpha_t x0_hat) / sigma_t, in float64: the eps consistent with an x0_hat
    that was changed (clamped, thresholded, guided in x0 space)."""
    x = x_t.to(torch.float64)
    a, s = alpha_sigma(schedule, t, x)
    return (x - a * x0.to(torch.float64)) / s


def drop_labels(
    y: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the null label independently with probability p (Ho & Salimans 2022,
    Algorithm 1, p_uncond). For text conditions y (B, D) float, a dropped row becomes all zeros,
    the null condition of a text network (unet.UNet); the draw is the same (B,) uniforms."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape[:1], generator=generator, device=y.device) < p
    if y.is_floating_point():
        return torch.where(drop[:, None], torch.zeros_like(y), y)
    return torch.where(drop, torch.full_like(y, null_label), y)


def sample_timesteps(
    b: int, T: int, cfg: DiffusionConfig, generator: torch.Generator | None, device
) -> torch.Tensor:
    """(b,) integer training timesteps in [0, T-1]: uniform, or logit-normal (t/T = sigmoid(n),
    n ~ N(t_mean, t_std); Esser et al. 2024, Eq. 19), which spends the steps where the density
    is, with no loss reweighting (the density is the weighting). With t_uniform = p > 0 the
    law is the mixture p U{0..T-1} + (1 - p) logit-normal: each draw is uniform with
    probability p."""
    if cfg.t_sampling == "uniform":
        return torch.randint(0, T, (b,), generator=generator, device=device)
    n = torch.randn(b, generator=generator, device=device) * cfg.t_std + cfg.t_mean
    t = (torch.sigmoid(n) * T).long().clamp_(0, T - 1)
    if cfg.t_uniform > 0:
        u = torch.randint(0, T, (b,), generator=generator, device=device)
        pick = torch.rand(b, generator=generator, device=device) < cfg.t_uniform
        t = torch.where(pick, u, t)
    return t


def training_loss(
    net,
    x0: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    cfg: DiffusionConfig,
    null_label: int,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Mean loss over the batch: t from sample_timesteps, eps ~ N(0, I), labels dropped with
    cfg.label_dropout, target eps or v, optionally min-SNR-gamma weighted (Hang et al. 2023).

    rows: (first, B) when x0 is rows [first, first + b) of a global batch of B split over
    processes: t, eps and the dropout coins are drawn for all B rows, as one process drawing the
    whole batch would, and this part's rows kept, so every process uses its own draws and the
    draws do not depend on the number of processes."""
    b = x0.shape[0]
    dev = x0.device
    first, B = (0, b) if rows is None else rows
    keep = slice(first, first + b)
    t = sample_timesteps(B, schedule.T, cfg, generator, dev)[keep]
    eps = torch.randn((B, *x0.shape[1:]), generator=generator, device=dev, dtype=x0.dtype)[keep]
    y_all = y
    if rows is not None:  # this part's labels (or text conditions) at their global rows
        y_all = torch.zeros((B, *y.shape[1:]), dtype=y.dtype, device=dev)
        y_all[keep] = y
    y_in = drop_labels(y_all, cfg.label_dropout, null_label, generator)[keep]
    a, s = alpha_sigma(schedule, t, x0)
    x_t = a * x0 + s * eps
    pred = net(x_t, t, y_in)
    target = eps if cfg.prediction == "eps" else v_target(x0, eps, a, s)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if cfg.loss_weighting == "min-snr":
        snr = (a / s).pow(2).flatten().float()
        w = snr.clamp(max=cfg.min_snr_gamma)
        # min(SNR, gamma) weights the x0 error; expressed for the eps target it is
        # min(SNR, gamma)/SNR, and for the v target min(SNR, gamma)/(SNR + 1) (Hang et al. Eq. 8).
        w = w / snr if cfg.prediction == "eps" else w / (snr + 1)
        per_sample = per_sample * w
    return per_sample.mean()
