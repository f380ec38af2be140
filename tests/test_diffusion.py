import math

import pytest
import torch

from cfgdiff.config import DiffusionConfig
from cfgdiff.diffusion import (
    alpha_sigma,
    drop_labels,
    eps_to_x0,
    q_sample,
    sample_timesteps,
    to_eps,
    training_loss,
    v_target,
)
from cfgdiff.errors import ConfigError
from cfgdiff.schedule import cosine_schedule


def test_label_dropout_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(200_000, dtype=torch.long)
    out = drop_labels(y, 0.1, null_label=10, generator=g)
    rate = (out == 10).float().mean().item()
    # binomial std at n=2e5 is 6.7e-4; 5 sigma
    assert abs(rate - 0.1) < 0.0034
    assert set(out.unique().tolist()) == {0, 10}
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_eps_v_x0_conversions_roundtrip():
    sch = cosine_schedule(1000)
    x0 = torch.randn(16, 1, 4, 4)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (16,))
    a, s = alpha_sigma(sch, t, x0)
    x_t = q_sample(x0, t, eps, sch)
    v = v_target(x0, eps, a, s)
    assert torch.allclose(to_eps(v, x_t, a, s, "v"), eps, atol=1e-4)
    assert torch.allclose(to_eps(eps, x_t, a, s, "eps"), eps)
    t_small = torch.randint(
        0, 500, (16,)
    )  # x0 recovery is well conditioned where alpha is not tiny
    a, s = alpha_sigma(sch, t_small, x0)
    x_t = q_sample(x0, t_small, eps, sch)
    assert torch.allclose(eps_to_x0(eps, x_t, a, s), x0, atol=1e-4)


def test_training_loss_of_perfect_eps_predictor_is_zero():
    """A network that returns the true eps has zero loss: checks that loss, q_sample and the
    target line up. The oracle recovers eps from x_t because x0 is known (a constant)."""
    sch = cosine_schedule(100)
    x0 = torch.full((8, 1, 4, 4), 0.5)
    cfg = DiffusionConfig(timesteps=100, prediction="eps", label_dropout=0.0)

    def oracle(x_t, t, y):
        a, s = alpha_sigma(sch, t, x_t)
        return (x_t - a * x0) / s

    loss = training_loss(oracle, x0, torch.zeros(8, dtype=torch.long), sch, cfg, 10)
    assert loss.item() < 1e-8

    cfg_v = DiffusionConfig(
        timesteps=100, prediction="v", label_dropout=0.0, loss_weighting="min-snr"
    )

    def oracle_v(x_t, t, y):
        a, s = alpha_sigma(sch, t, x_t)
        return v_target(x0, (x_t - a * x0) / s, a, s)

    assert (
        training_loss(oracle_v, x0, torch.zeros(8, dtype=torch.long), sch, cfg_v, 10).item() < 1e-8
    )


def test_schedule_values_are_copied_to_a_device_once():
    from cfgdiff.diffusion import _on

    values = cosine_schedule(10).alpha_bar
    meta = torch.device("meta")
    first = _on(values, meta)
    assert first.device == meta and _on(values, meta) is first
    assert _on(values, values.device) is values


def test_uniform_timesteps_are_the_plain_draw():
    """The default draws exactly what t ~ U{0..T-1} drew before the option existed, so earlier
    runs (and their resumes) repeat bit for bit."""
    cfg = DiffusionConfig()
    got = sample_timesteps(64, 1000, cfg, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(
        got, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    )


@pytest.mark.parametrize("mean", [0.0, 0.5, -1.0])
def test_logit_normal_timesteps_follow_their_law(mean):
    """t/T = sigmoid(n), n ~ N(mean, 1): P(t >= T/2) = P(n >= 0) = Phi(mean), and the median
    of t is T sigmoid(mean); always integers in [0, T-1]."""
    cfg = DiffusionConfig(t_sampling="logit-normal", t_mean=mean, t_std=1.0)
    T, n = 1000, 200_000
    t = sample_timesteps(n, T, cfg, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    phi = 0.5 * (1 + math.erf(mean / math.sqrt(2)))
    assert abs(float((t >= T // 2).float().mean()) - phi) < 0.005
    assert abs(float(t.float().median()) - T / (1 + math.exp(-mean))) <= 3
    # the middle is denser than the ends (uniform would put 10 % in each)
    mid = float(((t - T * torch.sigmoid(torch.tensor(mean))).abs() < 50).float().mean())
    assert mid > 0.15


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_mixture_timesteps_follow_their_law(p):
    """t_uniform = p: each draw is uniform with probability p, else logit-normal (0.5, 1). The
    least noisy tenth, t < T/10, gets p * 0.1 + (1 - p) * Phi(logit(0.1) - 0.5) of the draws
    (0.35 % of the logit-normal ones); at p = 0 the draws are the plain logit-normal's, bit for
    bit."""
    T, n = 1000, 200_000
    cfg = DiffusionConfig(t_sampling="logit-normal", t_mean=0.5, t_std=1.0, t_uniform=p)
    t = sample_timesteps(n, T, cfg, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    z = math.log(0.1 / 0.9) - 0.5
    low_ln = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    assert abs(low_ln - 0.0035) < 0.0005
    assert abs(float((t < T // 10).float().mean()) - (p * 0.1 + (1 - p) * low_ln)) < 0.003
    # P(t >= T/2) = p / 2 + (1 - p) Phi(0.5)
    high = p / 2 + (1 - p) * 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
    assert abs(float((t >= T // 2).float().mean()) - high) < 0.005
    plain = DiffusionConfig(t_sampling="logit-normal", t_mean=0.5, t_std=1.0)
    n01 = torch.randn(64, generator=torch.Generator().manual_seed(1)) + 0.5
    assert torch.equal(
        sample_timesteps(64, T, plain, torch.Generator().manual_seed(1), "cpu"),
        (torch.sigmoid(n01) * T).long().clamp(0, T - 1),
    )


def test_timestep_sampling_is_validated():
    """Each bad setting is refused naming its own field (the ranges: config.bounded)."""
    for bad, field in (
        ({"t_sampling": "lognormal"}, "t_sampling"),
        ({"t_sampling": "logit-normal", "t_std": 0.0}, "t_std"),
        ({"t_mean": float("nan")}, "t_mean"),
        ({"t_sampling": "logit-normal", "t_uniform": 1.0}, "t_uniform"),
        ({"t_sampling": "logit-normal", "t_uniform": -0.1}, "t_uniform"),
    ):
        with pytest.raises(ConfigError, match=f"^`{field}` must be"):
            DiffusionConfig(**bad).validate()
