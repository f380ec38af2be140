import pytest
import torch

from cfgdiff.sampling.guidance import cfg_combine, guided_denoiser, scale_from_w
from cfgdiff.sampling.samplers import sample_ddim, sample_dpmpp_2m
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


# ----------------------------------------------------------------- variants
from cfgdiff.errors import ConfigError  # noqa: E402
from cfgdiff.sampling.guidance import APG, Guidance, dynamic_threshold, edm_sigma, rescale_cfg  # noqa: E402


def _den(net, y, **kw):
    kw.setdefault("threshold", "none")
    return guided_denoiser(net, y, SCH, null_label=NULL, prediction="eps", guidance=Guidance(**kw))


X = torch.randn(4, 1, 3, 3)
T = torch.full((4,), 600)
Y = torch.tensor([0, 1, 2, 0])


def test_rescale_phi0_is_plain_cfg_and_phi1_matches_cond_std():
    plain = _den(CountingNet(), Y, scale=4.0)(X, T)
    assert torch.equal(_den(CountingNet(), Y, scale=4.0, rescale=0.0)(X, T), plain)
    c, _ = _preds(CountingNet(), X, T, Y)
    full = rescale_cfg(plain, c, 1.0)
    assert torch.allclose(full.flatten(1).std(1), c.flatten(1).std(1), atol=1e-5)
    assert torch.allclose(_den(CountingNet(), Y, scale=4.0, rescale=1.0)(X, T), full)


def test_interval_covering_everything_is_plain_cfg_and_outside_skips_reference():
    plain = _den(CountingNet(), Y, scale=3.0)(X, T)
    assert torch.equal(_den(CountingNet(), Y, scale=3.0, interval=(0.0, 1e9))(X, T), plain)
    net = CountingNet()
    sig = edm_sigma(SCH, 600)
    out = _den(net, Y, scale=3.0, interval=(sig * 2, sig * 4))(X, T)  # t=600 is outside
    assert net.batches == [4]  # conditional half only
    c, _ = _preds(CountingNet(), X, T, Y)
    assert torch.equal(out, c)


def test_interval_skips_reference_pass_during_sampling():
    net = CountingNet()
    lo, hi = edm_sigma(SCH, 300), edm_sigma(SCH, 700)
    d = guided_denoiser(
        net, Y, SCH, null_label=NULL, guidance=Guidance(scale=3.0, interval=(lo, hi))
    )
    sample_ddim(d, torch.randn(4, 1, 2, 2), SCH, 10)  # trailing: 999, 899, ..., 99
    inside = [t for t in range(999, 0, -100) if lo < edm_sigma(SCH, t) <= hi]
    assert net.batches.count(8) == len(inside) == 4 and net.batches.count(4) == 6


def test_negative_class_with_null_is_plain_cfg_and_uses_class_k():
    plain = _den(CountingNet(), Y, scale=2.0)(X, T)
    assert torch.equal(_den(CountingNet(), Y, scale=2.0, negative_class=NULL)(X, T), plain)
    c, _ = _preds(CountingNet(), X, T, Y)
    n = CountingNet()(X, T, torch.full_like(Y, 1))
    out = _den(CountingNet(), Y, scale=2.0, negative_class=1)(X, T)
    assert torch.allclose(out, n + 2.0 * (c - n), atol=1e-6)


def test_autoguidance_with_same_model_is_conditional_and_calls_each_net_once():
    main, guide = CountingNet(), CountingNet()
    out = _den(main, Y, scale=5.0, guide_net=guide)(X, T)
    c, _ = _preds(CountingNet(), X, T, Y)
    assert torch.allclose(out, c, atol=1e-6)
    assert main.batches == [4] and guide.batches == [4]

    def weak(x, t, y):
        return 0.5 * CountingNet()(x, t, y)

    out = _den(CountingNet(), Y, scale=5.0, guide_net=weak)(X, T)
    assert torch.allclose(out, 0.5 * c + 5.0 * (c - 0.5 * c), atol=1e-5)


def test_apg_reduces_to_cfg_and_projects():
    plain = _den(CountingNet(), Y, scale=3.0)(X, T)
    same = _den(CountingNet(), Y, scale=3.0, apg=APG(eta=1.0, norm_threshold=0.0, momentum=0.0))
    assert torch.allclose(same(X, T), plain, atol=1e-5)
    # eta = 0 removes the component of the update parallel to x0_c
    from cfgdiff.diffusion import alpha_sigma, eps_to_x0

    a, s = alpha_sigma(SCH, T, X)
    c, u = _preds(CountingNet(), X, T, Y)
    x0c, x0u = eps_to_x0(c, X, a, s), eps_to_x0(u, X, a, s)
    out = _den(CountingNet(), Y, scale=3.0, apg=APG(eta=0.0))(X, T)
    upd = eps_to_x0(out, X, a, s) - x0c
    assert torch.allclose((upd * x0c).flatten(1).sum(1), torch.zeros(4, dtype=X.dtype), atol=1e-4)
    # norm threshold caps the update: ||x0 - x0_c|| <= (s - 1) r
    out = _den(CountingNet(), Y, scale=3.0, apg=APG(eta=1.0, norm_threshold=0.1))(X, T)
    assert ((eps_to_x0(out, X, a, s) - x0c).flatten(1).norm(dim=1) <= 2 * 0.1 + 1e-5).all()
    del x0u


def test_apg_momentum_uses_previous_step():
    d = _den(CountingNet(), Y, scale=3.0, apg=APG(eta=1.0, momentum=-0.5))
    first = d(X, T)
    second = d(X, T)  # same input: the running difference is now dD - 0.5 dD = 0.5 dD
    fresh = _den(CountingNet(), Y, scale=3.0, apg=APG(eta=1.0, momentum=-0.5))(X, T)
    assert torch.allclose(first, fresh)
    assert not torch.allclose(first, second)


def test_dynamic_threshold():
    x0 = torch.tensor([[0.5, -0.2, 0.9, 0.1], [3.0, -2.0, 0.5, 1.0]]).reshape(2, 1, 2, 2)
    out = dynamic_threshold(x0, 0.995)
    assert torch.equal(out[0], x0[0])  # inside [-1, 1]: untouched (s = 1)
    s = torch.quantile(x0[1].abs().flatten(), 0.995)
    assert torch.allclose(out[1], x0[1].clamp(-s, s) / s)
    assert out.abs().max() <= 1
    # the default is not a no-op at high guidance: it differs from no thresholding
    big = _den(CountingNet(), Y, scale=8.0, threshold="dynamic")(X, T)
    assert not torch.allclose(big, _den(CountingNet(), Y, scale=8.0, threshold="none")(X, T))


@pytest.mark.parametrize(
    "kw",
    [
        {"rescale": 0.7},
        {"interval": (0.0, 1e9)},
        {"negative_class": 1},
        {"threshold": "dynamic"},
        {"apg": APG(eta=0.0, norm_threshold=1.0, momentum=-0.5)},
        {"scale": torch.tensor([0.0, 2.0, 3.0, 5.0])},
    ],
)
def test_every_variant_one_forward_per_step(kw):
    net = CountingNet()
    kw = {"scale": 3.0, **kw}
    d = guided_denoiser(net, Y, SCH, null_label=NULL, guidance=Guidance(**kw))
    sample_dpmpp_2m(d, torch.randn(4, 1, 2, 2), SCH, 6)
    assert net.batches == [8] * 6


def test_bad_guidance_settings():
    for kw, msg in [
        ({"rescale": 1.5}, "`rescale` must be in"),
        ({"interval": (2.0, 1.0)}, "`interval` must satisfy 0 <= lo < hi"),
        ({"negative_class": 9}, "`negative_class` must be in"),
        ({"threshold": "soft"}, "`threshold` must be"),
        ({"apg": APG(), "rescale": 0.5}, "cannot be combined"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            Guidance(**kw).validate(NULL)
