"""Samplers against closed forms: a single data point, and Gaussian data with a known score."""

import pytest
import torch

from cfgdiff.diffusion import alpha_sigma
from cfgdiff.sampling.samplers import (
    SAMPLERS,
    PerSampleNoise,
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_edm,
)
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
    for sampler in (sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_edm):
        g = torch.Generator().manual_seed(0)  # the stochastic ones' noise changes nothing here
        out = sampler(point_oracle(sch, p.double()), x_T, sch, steps, generator=g)
        assert torch.allclose(out, p.double().expand_as(out), atol=1e-9), sampler.__name__


MU, TAU = 0.7, 0.3
N = 40_000
# Tolerance: the standard error of the mean is TAU/sqrt(N) = 0.0015 and of the std about
# TAU/sqrt(2N) = 0.0011; 0.01 allows ~6 standard errors plus the discretisation error.
TOL = 0.01


# Measured std errors (cosine schedule): DDPM 100 steps -0.014, 250 -0.003; DDIM 50 -0.012,
# 250 -0.001; DPM-Solver++(2M) 25 -0.003, 50 +0.002: first order for DDIM, much faster for DPM++.
# DPM-Solver++(2M) SDE 20 +0.0005, 35 +0.006; EDM (churn 40) 20 -0.008, 35 -0.001.
@pytest.mark.parametrize(
    "name,steps",
    [("ddpm", 250), ("ddpm", 1000), ("ddim", 250), ("dpmpp", 25), ("dpmpp-2m-sde", 35),
     ("edm", 35)],
)  # fmt: skip
def test_gaussian_data_distribution(name, steps):
    sch = cosine_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, 1, 1, 1, generator=g, dtype=torch.float64)
    d = gaussian_oracle(sch, MU, TAU)
    if name == "ddpm":
        out = sample_ddpm(d, x_T, sch, steps, generator=g)
    elif name == "ddim":
        out = sample_ddim(d, x_T, sch, steps)
    elif name == "dpmpp":
        out = sample_dpmpp_2m(d, x_T, sch, steps)
    else:
        out = run_sampler(name, d, x_T, sch, steps, generator=g)
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


def test_dpmpp_sde_at_eta_0_draws_no_noise_and_at_eta_1_does():
    """eta = 0 is the ODE solver (sample_dpmpp_2m is that case): the same images whatever the
    generator; eta = 1 draws noise, a different image per stream."""
    sch = cosine_schedule(1000)
    d = gaussian_oracle(sch, MU, TAU)
    x_T = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    a = sample_dpmpp_2m_sde(d, x_T, sch, 20, eta=0.0, generator=PerSampleNoise(3, range(64)))
    assert torch.equal(a, sample_dpmpp_2m_sde(d, x_T, sch, 20, eta=0.0, generator=None))
    b = sample_dpmpp_2m_sde(d, x_T, sch, 20, generator=PerSampleNoise(3, range(64)))
    c = sample_dpmpp_2m_sde(d, x_T, sch, 20, generator=PerSampleNoise(4, range(64)))
    assert (a - b).abs().max() > 0.01 and (b - c).abs().max() > 0.01


def test_edm_without_churn_is_heun_and_beats_euler():
    """churn 0 is Algorithm 1 (deterministic Heun): no noise is drawn, and on Gaussian data its
    error is below DDIM's (Euler in EDM's form) at every step count."""
    sch = cosine_schedule(1000)
    d = gaussian_oracle(sch, MU, TAU)
    x_T = torch.linspace(-2, 2, 101, dtype=torch.float64).reshape(-1, 1, 1, 1)
    ref = sample_ddim(d, x_T, sch, 1000)
    for n in (10, 20, 40):
        heun = sample_edm(d, x_T, sch, n, churn=0.0, s_noise=1.0, generator=None)
        assert torch.equal(heun, sample_edm(d, x_T, sch, n, churn=0.0, s_noise=1.0))
        err_heun = (heun - ref).abs().max().item()
        err_euler = (sample_ddim(d, x_T, sch, n) - ref).abs().max().item()
        assert err_heun < err_euler / 2, (n, err_heun, err_euler)


@pytest.mark.parametrize("name", [n for n, e in SAMPLERS.items() if not e.deterministic])
def test_stochastic_samplers_draw_each_samples_noise_from_its_own_stream(name):
    """A sample's image does not depend on the batch it was drawn in."""
    sch = cosine_schedule(1000)
    d = gaussian_oracle(sch, MU, TAU)
    x_T = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    whole = run_sampler(name, d, x_T, sch, 10, generator=PerSampleNoise(5, range(6)))
    parts = torch.cat([
        run_sampler(name, d, x_T[:2], sch, 10, generator=PerSampleNoise(5, [0, 1])),
        run_sampler(name, d, x_T[2:], sch, 10, generator=PerSampleNoise(5, range(2, 6))),
    ])  # fmt: skip
    assert torch.allclose(whole, parts, atol=1e-12)
    again = run_sampler(name, d, x_T, sch, 10, generator=PerSampleNoise(6, range(6)))
    assert (whole - again).abs().max() > 1e-3  # and it does draw noise


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


# ----------------------------------------------------------------- Gaussian-classes oracle
from cfgdiff.oracles import GaussianClassesNet  # noqa: E402
from cfgdiff.sampling.guidance import Guidance, guided_denoiser  # noqa: E402

# Per-class and mixture moments must match within 0.01 (tau = 0.15, N = 6000 per class: the
# standard error of a mean is 0.002, of a std 0.0014; the rest is discretisation).
MIX_TOL = 0.01


def _run(name, denoise, x_T, sch, steps, g):
    if name == "ddpm":
        return sample_ddpm(denoise, x_T, sch, steps, generator=g)
    if name == "ddim":
        return sample_ddim(denoise, x_T, sch, steps)
    if name == "dpmpp":
        return sample_dpmpp_2m(denoise, x_T, sch, steps)
    return run_sampler(name, denoise, x_T, sch, steps, generator=g)


@pytest.mark.parametrize(
    "name,steps",
    [("ddpm", 500), ("ddim", 250), ("dpmpp", 50), ("dpmpp-2m-sde", 50), ("edm", 50)],
)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_gaussian_classes_conditional_and_unconditional(name, steps, prediction):
    sch = cosine_schedule(1000)
    oracle = GaussianClassesNet(sch)
    net = oracle
    if prediction == "v":  # the same oracle seen through a v-prediction network

        def net(x, t, y):
            a, s = alpha_sigma(sch, t, x)
            eps = oracle(x, t, y)
            x0 = (x - s * eps) / a
            return a * eps - s * x0

    n = 6000
    g = torch.Generator().manual_seed(1)
    for c in range(oracle.K + 1):  # c == K: unconditional (s = 0)
        y = torch.full((n,), min(c, oracle.K - 1))
        scale = 1.0 if c < oracle.K else 0.0
        d = guided_denoiser(
            net,
            y,
            sch,
            null_label=oracle.K,
            prediction=prediction,
            guidance=Guidance(scale=scale, threshold="none"),
        )
        x_T = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
        out = _run(name, d, x_T, sch, steps, g)
        if c < oracle.K:
            mean, std = float(oracle.mus[c]), oracle.tau
        else:
            mean, std = oracle.mixture_moments()
        assert abs(out.mean().item() - mean) < MIX_TOL, (c, out.mean().item(), mean)
        assert abs(out.std().item() - std) < MIX_TOL, (c, out.std().item(), std)


def _order(sampler, scale):
    """Observed convergence order of a deterministic sampler between 25 and 50 steps,
    against a 1000-step solution, on the guided Gaussian-classes ODE. (Step counts that divide
    T: at 80 steps the trailing grid's rounded halves make its gaps uneven, 12 and 13, which
    moves the ratio of errors without saying anything about the order.)"""
    import math

    sch = cosine_schedule(1000)
    x_T = torch.linspace(-2.5, 2.5, 301, dtype=torch.float64).reshape(-1, 1, 1, 1)
    y = torch.arange(301) % 3

    def run(n):
        d = guided_denoiser(
            GaussianClassesNet(sch),
            y,
            sch,
            null_label=3,
            guidance=Guidance(scale=scale, threshold="none"),
        )
        return sampler(d, x_T, sch, n)

    ref = run(1000)
    e25, e50 = ((run(n) - ref).abs().max().item() for n in (25, 50))
    return math.log(e25 / e50) / math.log(2)


def test_observed_order_ddim_first_dpmpp_second():
    """Measured: DDIM 0.97, DPM-Solver++(2M) 2.06 (s = 3, cosine, trailing)."""
    assert 0.8 < _order(sample_ddim, 3.0) < 1.3
    assert 1.7 < _order(sample_dpmpp_2m, 3.0) < 2.4


def test_observed_order_of_edms_heun_steps_is_second():
    """EDM's sampler without churn takes Heun's second-order steps between a first and a last
    Euler step (from above sigma_max, and to sigma = 0): measured 1.51 between 25 and 50 steps,
    against DDIM's 0.97 (s = 3, cosine, trailing)."""

    def heun(d, x_T, sch, n):
        return sample_edm(d, x_T, sch, n, churn=0.0, s_noise=1.0)

    assert 1.35 < _order(heun, 3.0) < 2.4
