import pytest
import torch

from cfgdiff.guidance import cfg_combine, guided_denoiser, scale_from_w
from cfgdiff.samplers import sample_ddim, sample_dpmpp_2m
from cfgdiff.schedule import cosine_schedule

SCH = cosine_schedule(1000)
NULL = 3


class CountingNet:
    """Fake network: output depends on the label (null gives 0), counts calls and batch sizes."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return 0.1 * x + (y != NULL).float().reshape(-1, 1, 1, 1) * (y.float() + 1).reshape(
            -1, 1, 1, 1
        )


def test_combine_endpoints_and_w():
    c, u = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.allclose(cfg_combine(c, u, 1.0), c, atol=1e-6)
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    w = 2.5  # paper: (1 + w) c - w u
    assert torch.allclose(cfg_combine(c, u, scale_from_w(w)), (1 + w) * c - w * u, atol=1e-6)


def _preds(net, x, t, y):
    return net(x, t, y), net(x, t, torch.full_like(y, NULL))


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_denoiser_equals_cond_uncond_and_combination(scale):
    net = CountingNet()
    x = torch.randn(4, 1, 2, 2)
    t = torch.full((4,), 500)
    y = torch.tensor([0, 1, 2, 0])
    d = guided_denoiser(net, y, SCH, scale=scale, null_label=NULL, prediction="eps", clip_x0=False)
    c, u = _preds(CountingNet(), x, t, y)
    assert torch.allclose(d(x, t), u + scale * (c - u), atol=1e-6)


@pytest.mark.parametrize("scale,batch", [(3.0, 8), (1.0, 4), (0.0, 4)])
def test_one_forward_per_step(scale, batch):
    net = CountingNet()
    y = torch.tensor([0, 1, 2, 1])
    d = guided_denoiser(net, y, SCH, scale=scale, null_label=NULL, clip_x0=True)
    sample_ddim(d, torch.randn(4, 1, 2, 2), SCH, 7)
    assert net.batches == [batch] * 7
    net.batches.clear()
    sample_dpmpp_2m(d, torch.randn(4, 1, 2, 2), SCH, 5)
    assert net.batches == [batch] * 5


def test_per_sample_scales_equal_separate_runs():
    x = torch.randn(3, 1, 2, 2)
    t = torch.full((3,), 700)
    y = torch.tensor([2, 2, 2])
    scales = torch.tensor([0.0, 1.5, 4.0])
    together = guided_denoiser(
        CountingNet(), y, SCH, scale=scales, null_label=NULL, prediction="v"
    )(x, t)
    for i, s in enumerate(scales.tolist()):
        alone = guided_denoiser(
            CountingNet(), y[i : i + 1], SCH, scale=s, null_label=NULL, prediction="v"
        )(x[i : i + 1], t[i : i + 1])
        assert torch.allclose(together[i : i + 1], alone, atol=1e-6)


def test_v_prediction_guidance_equals_eps_guidance():
    """Guiding v outputs equals guiding the eps they imply (the map is affine, label-free)."""
    net = CountingNet()
    x = torch.randn(2, 1, 2, 2)
    t = torch.full((2,), 300)
    y = torch.tensor([0, 1])
    from cfgdiff.diffusion import alpha_sigma, to_eps

    a, s = alpha_sigma(SCH, t, x)
    c, u = _preds(net, x, t, y)
    expected = to_eps(u, x, a, s, "v") + 2.0 * (to_eps(c, x, a, s, "v") - to_eps(u, x, a, s, "v"))
    got = guided_denoiser(net, y, SCH, scale=2.0, null_label=NULL, prediction="v", clip_x0=False)(
        x, t
    )
    assert torch.allclose(got, expected, atol=1e-5)
