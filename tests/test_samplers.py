"""Samplers against closed forms: a single data point, and Gaussian data with a known score."""

import pytest
import torch

from cfgdiff.diffusion import alpha_sigma
from cfgdiff.samplers import PerSampleNoise, sample_ddim, sample_ddpm, sample_dpmpp_2m
from cfgdiff.schedule import cosine_schedule, linear_schedule


def point_oracle(sch, p):
    """For data = {p}, E[eps | x_t] = (x_t - alpha_t p) / sigma_t exactly."""

    def denoise(x, t):
        a, s = alpha_sigma(sch, t, x)
        return (x - a * p) / s

    return denoise


def gaussian_oracle(sch, mu, tau):
    """For x0 ~ N(mu, tau^2) per dimension, x_t ~ N(a mu, a^2 tau^2 + s^2) and
    E[eps | x_t] = s (x_t - a mu) / (a^2 tau^2 + s^2)."""

    def denoise(x, t):
        a, s = alpha_sigma(sch, t, x)
        return s * (x - a * mu) / (a**2 * tau**2 + s**2)

    return denoise


@pytest.mark.parametrize("sch", [linear_schedule(1000), cosine_schedule(1000)])
@pytest.mark.parametrize("steps", [1, 10, 100])
def test_single_point_ddim_and_dpmpp_return_the_point(sch, steps):
    p = torch.tensor([0.3, -0.8, 0.55]).reshape(1, 3, 1, 1)
    x_T = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    for sampler in (sample_ddim, sample_dpmpp_2m):
        out = sampler(point_oracle(sch, p.double()), x_T, sch, steps)
        assert torch.allclose(out, p.double().expand_as(out), atol=1e-9), sampler.__name__


MU, TAU = 0.7, 0.3
N = 40_000
# Tolerance: the standard error of the mean is TAU/sqrt(N) = 0.0015 and of the std about
# TAU/sqrt(2N) = 0.0011; 0.01 allows ~6 standard errors plus the discretisation error.
TOL = 0.01


# Measured std errors (cosine schedule): DDPM 100 steps -0.014, 250 -0.003; DDIM 50 -0.012,
# 250 -0.001; DPM-Solver++(2M) 25 -0.003, 50 +0.002: first order for DDIM, much faster for DPM++.
@pytest.mark.parametrize(
    "name,steps", [("ddpm", 250), ("ddpm", 1000), ("ddim", 250), ("dpmpp", 25)]
)
def test_gaussian_data_distribution(name, steps):
    sch = cosine_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, 1, 1, 1, generator=g, dtype=torch.float64)
    d = gaussian_oracle(sch, MU, TAU)
    if name == "ddpm":
        out = sample_ddpm(d, x_T, sch, steps, generator=g)
    elif name == "ddim":
        out = sample_ddim(d, x_T, sch, steps)
    else:
        out = sample_dpmpp_2m(d, x_T, sch, steps)
    assert abs(out.mean().item() - MU) < TOL
    assert abs(out.std().item() - TAU) < TOL


def test_deterministic_samplers_error_shrinks_with_steps():
    """On the Gaussian oracle the probability-flow ODE maps x_T to mu + tau * x_T-ish exactly in
    the limit; compare few steps with many: the error must fall as steps grow."""
    sch = cosine_schedule(1000)
    x_T = torch.linspace(-2, 2, 101, dtype=torch.float64).reshape(-1, 1, 1, 1)
    d = gaussian_oracle(sch, MU, TAU)
    for sampler in (sample_ddim, sample_dpmpp_2m):
        ref = sampler(d, x_T, sch, 1000)
        errs = [(sampler(d, x_T, sch, n) - ref).abs().max().item() for n in (5, 10, 20, 40)]
        assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), (sampler.__name__, errs)


def test_ddim_eta1_equals_ddpm_given_same_noise():
    sch = linear_schedule(1000)
    d = gaussian_oracle(sch, MU, TAU)
    x_T = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    a = sample_ddim(d, x_T, sch, 25, eta=1.0, generator=PerSampleNoise(3, range(64)))
    b = sample_ddpm(d, x_T, sch, 25, generator=PerSampleNoise(3, range(64)))
    assert torch.allclose(a, b, atol=1e-9)


def test_per_sample_noise_independent_of_batching():
    whole = PerSampleNoise(7, range(6)).randn((2, 3), "cpu")
    parts = torch.cat(
        [
            PerSampleNoise(7, [0, 1]).randn((2, 3), "cpu"),
            PerSampleNoise(7, [2, 3, 4, 5]).randn((2, 3), "cpu"),
        ]
    )
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(whole, PerSampleNoise(8, range(6)).randn((2, 3), "cpu"))
