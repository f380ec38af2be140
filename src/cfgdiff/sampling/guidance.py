"""Classifier-free guidance: the one place that knows conditional vs reference predictions.

Convention (Ho & Salimans 2022, written with the *scale* s used by Imagen, EDM2 and diffusers):

    eps_hat = eps_ref + s * (eps_c - eps_ref)        s = 1: conditional, s = 0: reference

The reference is the null label (plain CFG), another class (negative class) or a weaker network
(autoguidance). The paper writes eps_hat = (1 + w) eps_c - w eps_u (Eq. 6), i.e. w = s - 1. The
library speaks s; the CLI accepts --scale s or --w w and every output names the convention.

`guided_denoiser` turns (network, labels, Guidance) into a samplers.Denoiser: `denoise(x_t, t)
-> eps_hat`, and `denoise.predict(x_t, t) -> (eps_hat, x0_hat)`, the pair the samplers step
with, with one batched forward pass over [x_t; x_t] with labels [y; reference]. It evaluates
only the conditional half where every scale is 1 or t is outside the guidance interval, and
only the reference half where every scale is 0. Because eps, v and x0 are related by affine maps
whose coefficients do not depend on the label (eps = sigma x_t + alpha v, x0 = (x_t - sigma
eps)/alpha), combining raw outputs equals combining eps or x0. The pair is computed from the
network's output in float64, each in its well-conditioned form (diffusion.eps_and_x0: for v,
x0 = alpha x_t - sigma v, never through eps and a division by a tiny alpha), and returned in
x_t's dtype (docs/DESIGN.md, "Sampling precision").

Variants (each an option of `Guidance`, combinable unless stated):
- interval  (Kynkäänniemi et al. 2024, Sec. 3): guide only where sigma_lo < sigma_t <= sigma_hi,
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (the EDM noise level of the VP process);
  elsewhere use the conditional prediction and skip the reference pass.
- rescale   (Lin et al. 2023, Eqs. 15-16), phi in [0, 1], on the network output:
  pred_rescaled = pred_cfg * std(pred_c) / std(pred_cfg) (per sample);
  pred = phi * pred_rescaled + (1 - phi) * pred_cfg.
- negative class k: the reference prediction is the one for class k instead of the null label.
- negative prompt (text models): the reference condition is the negative prompt's embedding
  instead of the null (all-zero) embedding; still one batched forward over [x_t; x_t].
- autoguidance (Karras et al. 2024, Eq. 2): the reference is D_guide(x; sigma, y) of a weaker
  network of the same kind (e.g. an early checkpoint): D = D_guide + s (D_main - D_guide).
  Two networks, one forward pass each per step.
- thresholding of x0_hat: "static" clamps to [-1, 1] (DDPM); "dynamic" (Imagen, Saharia et al.
  2022, Sec. 2.3): s_p = max(1, percentile_p(|x0_hat|)) per sample, x0_hat = clip(x0_hat, -s_p,
  s_p) / s_p, default p = 0.995; "none". The returned eps is the one consistent with x0_hat.
- adaptive projected guidance (Sadat et al. 2024, Alg. 1), in x0 space: dD = D_c - D_ref;
  with momentum beta, dD <- dD + beta * dD_prev (running); norm threshold r:
  dD <- dD * min(1, r / ||dD||); split dD into parts parallel and orthogonal to D_c;
  D = D_c + (s - 1) (dD_orth + eta * dD_par). With eta = 1, r = 0 (off), beta = 0 it is plain CFG.
  Not combinable with rescale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cfgdiff.config import GUIDANCE_CONVENTION, bounded, check_ranges
from cfgdiff.diffusion import eps_and_x0, eps_from_x0
from cfgdiff.errors import ConfigError
from cfgdiff.sampling.samplers import Denoiser
from cfgdiff.schedule import Schedule

# How x0_hat is kept in range (see the module docstring).
THRESHOLDS = ("static", "dynamic", "none")

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance settings (Sadat et al. 2024)."""

    # weight of the component parallel to D_c (0: drop it, 1: keep it)
    eta: float = bounded(0.0, -10.0, 10.0)
    # r: cap on ||dD|| per sample; 0 disables the cap
    norm_threshold: float = bounded(0.0, 0.0, 1e6)
    # beta of the running average of dD (the paper uses negative values)
    momentum: float = bounded(0.0, -1.0, 1.0)


@dataclass(frozen=True)
class Guidance:
    """How to guide. Every field's default is plain CFG at scale 1 with static thresholding."""

    scale: float | torch.Tensor = 1.0  # s, a float or a (B,) tensor of per-sample scales
    interval: tuple[float, float] | None = None  # (sigma_lo, sigma_hi]: guide only there
    rescale: float = bounded(0.0, 0.0, 1.0)  # phi; 0 is plain CFG
    # reference label instead of the null label (at most the null label's index)
    negative_class: int | None = bounded(None, 0)
    # text models: (D,) embedding of a negative prompt, the reference instead of the null
    negative_condition: torch.Tensor | None = None
    guide_net: Net | None = None  # autoguidance: a weaker network as the reference
    threshold: str = "static"  # "static" | "dynamic" | "none"
    threshold_percentile: float = bounded(0.995, 0.0, 1.0, lo_open=True)  # p of dynamic
    apg: APG | None = None

    def validate(self, num_classes: int) -> None:
        check_ranges(self)
        if self.apg is not None:
            check_ranges(self.apg)
        if self.interval is not None:
            lo, hi = self.interval
            if not 0 <= lo < hi:
                raise ConfigError(f"`interval` must satisfy 0 <= lo < hi, got {lo},{hi}")
        if self.negative_class is not None and not 0 <= self.negative_class <= num_classes:
            raise ConfigError(
                f"`negative_class` must be in [0, {num_classes - 1}] (or {num_classes}, the null "
                f"label), got {self.negative_class}"
            )
        if self.threshold not in THRESHOLDS:
            raise ConfigError(
                f"`threshold` must be {', '.join(THRESHOLDS)}, got {self.threshold!r}"
            )
        if self.apg is not None:
            if self.rescale:
                raise ConfigError("`rescale` and `apg` cannot be combined")
        if self.guide_net is not None and self.negative_class is not None:
            raise ConfigError("`guide_checkpoint` and `negative_class` cannot be combined")
        if self.guide_net is not None and self.negative_condition is not None:
            raise ConfigError("`guide_checkpoint` and `negative_prompt` cannot be combined")
        if self.negative_class is not None and self.negative_condition is not None:
            raise ConfigError("`negative_class` and `negative_prompt` cannot be combined")

    def to_record(self) -> dict:
        """These settings as plain data for output files (settings.json, --json results, .npz),
        with the convention named. A per-sample scale tensor is recorded as a list; the guide
        network as whether there is one (the caller records where it came from)."""
        scale = self.scale.tolist() if isinstance(self.scale, torch.Tensor) else self.scale
        return {
            "scale": scale,
            "w": [s - 1 for s in scale] if isinstance(scale, list) else scale - 1,
            "convention": GUIDANCE_CONVENTION,
            "guidance_interval": list(self.interval) if self.interval else None,
            "rescale": self.rescale,
            "negative_class": self.negative_class,
            "autoguidance": self.guide_net is not None,
            "threshold": self.threshold,
            "threshold_percentile": self.threshold_percentile,
            "apg": dataclasses.asdict(self.apg) if self.apg else None,
        } | ({"negative_prompt": True} if self.negative_condition is not None else {})


def cfg_combine(
    pred_c: torch.Tensor, pred_ref: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """pred_ref + s (pred_c - pred_ref); s a float or a (B,) tensor of per-sample scales."""
    return pred_ref + _bcast(scale, pred_c) * (pred_c - pred_ref)


def scale_from_w(w: float) -> float:
    """Ho & Salimans' w to the library's scale s = w + 1."""
    return w + 1.0


def edm_sigma(schedule: Schedule, t: int) -> float:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the noise level of x_t / alpha_t."""
    ab = float(schedule.alpha_bar[t])
    return ((1 - ab) / ab) ** 0.5


def rescale_cfg(pred_cfg: torch.Tensor, pred_c: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, Eqs. 15-16 (per-sample std over all non-batch dimensions)."""
    dims = tuple(range(1, pred_c.ndim))
    std_c = pred_c.std(dim=dims, keepdim=True)
    std_cfg = pred_cfg.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * (pred_cfg * std_c / std_cfg) + (1 - phi) * pred_cfg


def dynamic_threshold(x0: torch.Tensor, p: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = max(1, quantile_p |x0|) per sample, clip to [-s, s],
    divide by s."""
    q = x0.abs().flatten(1)
    q = q if q.dtype == torch.float64 else q.float()  # (quantile has no half-precision kernels)
    s = torch.quantile(q, p, dim=1).clamp_min(1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _bcast(scale: float | torch.Tensor, like: torch.Tensor):
    if isinstance(scale, torch.Tensor):
        return scale.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return scale


def guided_denoiser(
    net: Net,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    null_label: int,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    scale: float | torch.Tensor | None = None,
    clip_x0: bool | None = None,
) -> Denoiser:
    """Return denoise(x_t, t) -> eps_hat for labels y (B,), a samplers.Denoiser whose
    predict(x_t, t) gives (eps_hat, x0_hat).

    Pass either `guidance` or the shorthand `scale` (plain CFG); `clip_x0=False` is shorthand
    for threshold="none". The returned denoiser keeps the APG momentum state of one sampling
    run: make a new one per run.
    """
    g = guidance if guidance is not None else Guidance(scale=1.0 if scale is None else scale)
    if guidance is not None and scale is not None:
        raise ConfigError("pass `guidance` or `scale`, not both")
    if clip_x0 is not None:
        g = dataclasses.replace(g, threshold="static" if clip_x0 else "none")
    g.validate(null_label)
    scales = g.scale if isinstance(g.scale, torch.Tensor) else torch.tensor([float(g.scale)])
    all_one = bool((scales == 1).all())
    all_zero = bool((scales == 0).all())
    if y.is_floating_point():  # text: (B, D) embeddings; the null is the all-zero row
        if g.negative_class is not None:
            raise ConfigError("`negative_class` is for class models; pass `negative_prompt`")
        neg = g.negative_condition
        y_ref = torch.zeros_like(y) if neg is None else neg.to(y).expand_as(y).contiguous()
    else:
        if g.negative_condition is not None:
            raise ConfigError("`negative_prompt` is for text models; pass `negative_class`")
        ref_label = null_label if g.negative_class is None else g.negative_class
        y_ref = torch.full_like(y, ref_label)
    state: dict[str, torch.Tensor] = {}

    def in_interval(t: torch.Tensor) -> bool:
        if g.interval is None:
            return True
        sigma = edm_sigma(schedule, int(t[0]))  # samplers pass one timestep per call
        return g.interval[0] < sigma <= g.interval[1]

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x_t.shape[0]
        guiding = not all_one and in_interval(t)
        if not guiding:  # conditional only (s = 1, or outside the interval)
            pred = net(x_t, t, y).to(x_t.dtype)
        elif all_zero and g.guide_net is None and g.apg is None:  # reference only
            pred = net(x_t, t, y_ref).to(x_t.dtype)
        else:
            if g.guide_net is not None:
                pred_c = net(x_t, t, y).to(x_t.dtype)
                pred_r = g.guide_net(x_t, t, y).to(x_t.dtype)
            else:
                out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_ref]))
                pred_c, pred_r = out[:b].to(x_t.dtype), out[b:].to(x_t.dtype)
            if g.apg is not None:
                _, x0_c = eps_and_x0(pred_c, x_t, schedule, t, prediction)
                _, x0_r = eps_and_x0(pred_r, x_t, schedule, t, prediction)
                x0 = _apg(x0_c, x0_r, g.scale, g.apg, state)
                return finish(eps_from_x0(x0, x_t, schedule, t), x0, x_t, t)
            pred = cfg_combine(pred_c, pred_r, g.scale)
            if g.rescale:
                pred = rescale_cfg(pred, pred_c, g.rescale)
        eps, x0 = eps_and_x0(pred, x_t, schedule, t, prediction)
        return finish(eps, x0, x_t, t)

    def finish(eps, x0, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Thresholding of x0_hat (with the eps consistent with it), in x_t's dtype."""
        if g.threshold != "none":
            x0 = (
                x0.clamp(-1, 1)
                if g.threshold == "static"
                else dynamic_threshold(x0, g.threshold_percentile)
            )
            eps = eps_from_x0(x0, x_t, schedule, t)
        return eps.to(x_t.dtype), x0.to(x_t.dtype)

    return Denoiser(predict)


def _apg(x0_c, x0_r, scale, apg: APG, state: dict) -> torch.Tensor:
    """Sadat et al. 2024, Algorithm 1 (x0 space)."""
    dims = tuple(range(1, x0_c.ndim))
    diff = x0_c - x0_r
    if apg.momentum:
        diff = diff + apg.momentum * state["running"] if "running" in state else diff
        state["running"] = diff
    if apg.norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1).reshape(-1, *([1] * (diff.ndim - 1)))
        diff = diff * torch.clamp(apg.norm_threshold / norm.clamp_min(1e-12), max=1.0)
    unit = x0_c / x0_c.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * len(dims)))
    par = (diff * unit).sum(dim=dims, keepdim=True) * unit
    orth = diff - par
    return x0_c + (_bcast(scale, x0_c) - 1) * (orth + apg.eta * par)
