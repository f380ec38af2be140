import math

import pytest
import torch

from cfgdiff.errors import ConfigError
from cfgdiff.schedule import cosine_schedule, linear_schedule, make_schedule, spaced_timesteps


def test_linear_matches_ddpm_endpoints():
    s = linear_schedule(1000)
    assert s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_T of DDPM's schedule is about 4e-5
    assert 1e-5 < s.alpha_bar[-1].item() < 1e-4
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])


def test_cosine_closed_form():
    T, s0 = 1000, 0.008
    s = cosine_schedule(T)
    f = lambda t: math.cos((t / T + s0) / (1 + s0) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert torch.all(s.betas <= 0.999)


def test_log_snr_decreasing():
    ls = make_schedule("cosine", 100).log_snr()
    assert torch.all(ls[1:] < ls[:-1])


@pytest.mark.parametrize("spacing", ["trailing", "uniform", "quadratic", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 300, 1000])
@pytest.mark.parametrize("sch", [linear_schedule(1000), cosine_schedule(1000)])
def test_spacing(spacing, steps, sch):
    ts = spaced_timesteps(sch, steps, spacing)
    assert len(ts) == steps
    assert ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert min(ts) >= 0


def test_spacing_shapes():
    sch = cosine_schedule(1000)
    assert spaced_timesteps(sch, 4, "trailing") == [999, 749, 499, 249]
    assert spaced_timesteps(sch, 4, "uniform") == [999, 666, 333, 0]
    assert spaced_timesteps(sch, 4, "quadratic") == [999, 562, 250, 62]
    lin = linear_schedule(1000)
    lam = lin.log_snr()
    ts = spaced_timesteps(lin, 10, "logsnr")
    gaps = [float(lam[b] - lam[a]) for a, b in zip(ts, ts[1:], strict=False)]
    # equal log-SNR steps up to the rounding of t to integers
    assert max(gaps) / min(gaps) < 1.3, gaps


def test_bad_steps():
    with pytest.raises(ConfigError, match="`steps` must be in"):
        spaced_timesteps(linear_schedule(1000), 0)
    with pytest.raises(ConfigError, match="`spacing` must be one of"):
        spaced_timesteps(linear_schedule(1000), 3, "cubic")
    with pytest.raises(ConfigError, match="schedule"):
        make_schedule("quadratic", 10)
