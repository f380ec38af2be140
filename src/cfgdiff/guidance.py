"""Classifier-free guidance: the one place that knows conditional vs unconditional predictions.

Convention (Ho & Salimans 2022, written with the *scale* s used by Imagen, EDM2 and diffusers):

    eps_hat = eps_u + s * (eps_c - eps_u)            s = 1: conditional, s = 0: unconditional

The paper writes eps_hat = (1 + w) eps_c - w eps_u (Eq. 6), i.e. w = s - 1. The library speaks s;
the CLI accepts either --scale s or --w w and every output names the convention.

`guided_denoiser` turns (network, labels, scale) into `denoise(x_t, t) -> eps_hat` with one batched
forward pass over [x_t; x_t] with labels [y; null]. Where every scale is 1 it evaluates only the
conditional half, where every scale is 0 only the unconditional half. Because eps and v are
related by an affine map whose coefficients do not depend on the label (eps = sigma x_t + alpha v),
combining raw v outputs is identical to combining eps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cfgdiff.diffusion import alpha_sigma, eps_to_x0, to_eps
from cfgdiff.schedule import Schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(
    pred_c: torch.Tensor, pred_u: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """pred_u + s (pred_c - pred_u); s a float or a (B,) tensor of per-sample scales."""
    if isinstance(scale, torch.Tensor):
        scale = scale.to(pred_c.device, pred_c.dtype).reshape(-1, *([1] * (pred_c.ndim - 1)))
    return pred_u + scale * (pred_c - pred_u)


def scale_from_w(w: float) -> float:
    """Ho & Salimans' w to the library's scale s = w + 1."""
    return w + 1.0


def guided_denoiser(
    net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    schedule: Schedule,
    *,
    scale: float | torch.Tensor,
    null_label: int,
    prediction: str = "eps",
    clip_x0: bool = True,
) -> Denoiser:
    """Return denoise(x_t, t) -> eps_hat for labels y (B,) at guidance scale s.

    clip_x0 clamps x0_hat to [-1, 1] (static thresholding, DDPM's sampler) and returns the eps
    consistent with the clamped x0_hat, so every sampler sees a coherent pair.
    """
    scales = scale if isinstance(scale, torch.Tensor) else torch.tensor([float(scale)])
    need_c = bool((scales != 0).any())
    need_u = bool((scales != 1).any())
    y_null = torch.full_like(y, null_label)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        if need_c and need_u:
            out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null]))
            pred_c, pred_u = out[:b], out[b:]
            pred = cfg_combine(pred_c, pred_u, scale)
        elif need_c:  # every s == 1: plain conditional
            pred = net(x_t, t, y)
        else:  # every s == 0: plain unconditional
            pred = net(x_t, t, y_null)
        a, s = alpha_sigma(schedule, t, x_t)
        eps = to_eps(pred.to(x_t.dtype), x_t, a, s, prediction)
        if clip_x0:
            x0 = eps_to_x0(eps, x_t, a, s).clamp(-1, 1)
            eps = (x_t - a * x0) / s
        return eps

    return denoise
