"""Closed-form denoisers: exact answers to check samplers and guidance against (the tests and
bench/samplers.py use them; so can anyone prototyping a sampler).

Gaussian classes: x0 | y=c ~ N(mu_c, tau^2) per dimension, classes equally likely. Then
x_t | c ~ N(a mu_c, v) with v = a^2 tau^2 + s^2, E[eps | x_t, c] = s (x_t - a mu_c) / v, and the
unconditional E[eps | x_t] = sum_c p(c | x_t) E[eps | x_t, c] with p(c | x_t) ~ N(x_t; a mu_c, v).
"""

from __future__ import annotations

import torch

from cfgdiff.diffusion import alpha_sigma

MUS = (-0.6, 0.1, 0.7)
TAU = 0.15


class GaussianClassesNet:
    """A 'network' f(x_t, t, y) returning the exact eps for Gaussian classes; y = K is null."""

    def __init__(self, schedule, mus=MUS, tau=TAU):
        self.schedule = schedule
        self.mus = torch.tensor(mus, dtype=torch.float64)
        self.tau = tau
        self.K = len(mus)
        self.batches: list[int] = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        a, s = alpha_sigma(self.schedule, t, x)
        v = a**2 * self.tau**2 + s**2
        mus = self.mus.to(x.dtype)
        e_c = s * (x - a * mus[y.clamp(max=self.K - 1)].reshape(-1, *([1] * (x.ndim - 1)))) / v
        d = x.unsqueeze(0) - a.unsqueeze(0) * mus.reshape(-1, *([1] * x.ndim))  # (K, B, ...)
        w = torch.softmax(-(d**2) / (2 * v), dim=0)
        e_u = (w * s * d / v).sum(0)
        return torch.where((y == self.K).reshape(-1, *([1] * (x.ndim - 1))), e_u, e_c)

    def mixture_moments(self) -> tuple[float, float]:
        mean = float(self.mus.mean())
        var = self.tau**2 + float(((self.mus - mean) ** 2).mean())
        return mean, var**0.5
