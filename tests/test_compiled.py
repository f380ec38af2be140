"""Compiled networks (compiled.py): the forward pass with its eager fallback and first-output
check, and the check of a compiled training step's gradients against eager."""

import dataclasses

import pytest
import torch
from conftest import OUT_OF_MEMORY, sample_with, tiny_config

from cfgdiff.compiled import CompiledForward, check_compiled_gradients
from cfgdiff.diffusion import training_loss
from cfgdiff.schedule import make_schedule
from cfgdiff.unet import UNet


def _assert_samples_like_eager(f, net):
    """Images sampled through the wrapper f are those of the eager network, bit for bit."""
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2])
    kw = dict(scale=3.0, sampler="ddim", steps=3, seed=0)
    assert torch.equal(sample_with(f, cfg, labels, **kw), sample_with(net, cfg, labels, **kw))


def test_compiled_forward_falls_back_to_eager(tiny_net, monkeypatch):
    def broken_compile(module, **kw):
        def fail(*args):
            raise RuntimeError("inductor: no C++ compiler found (test)\nmore lines")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = CompiledForward(tiny_net, torch.device("cpu"))
    _assert_samples_like_eager(f, tiny_net)
    assert f.fallback_reason == "RuntimeError: inductor: no C++ compiler found (test)"
    assert f.compiled is None


@pytest.mark.parametrize("wrong", ["doubled", "nan"])
def test_compiled_forward_with_wrong_outputs_is_dropped(tiny_net, monkeypatch, wrong):
    """A compile that runs but computes something else: caught on the first call, whose eager
    output is returned, and the eager network is used from then on."""
    calls = []

    def bad_compile(module, **kw):
        def f(x, t, y):
            calls.append(1)
            out = module(x, t, y)
            return 2 * out if wrong == "doubled" else out * float("nan")

        return f

    monkeypatch.setattr(torch, "compile", bad_compile)
    f = CompiledForward(tiny_net, torch.device("cpu"))
    _assert_samples_like_eager(f, tiny_net)
    assert len(calls) == 1 and f.compiled is None
    assert f.fallback_reason.startswith("compiled output differs from eager: relative difference")
    assert ("1 (limit 0.1)" if wrong == "doubled" else "nan (limit 0.1)") in f.fallback_reason


def test_compiled_forward_within_tolerance_is_kept(tiny_net, monkeypatch):
    def close_compile(module, **kw):
        return lambda x, t, y: module(x, t, y) * 1.01  # 1 %: bf16-sized differences pass

    monkeypatch.setattr(torch, "compile", close_compile)
    f = CompiledForward(tiny_net, torch.device("cpu"))
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([0, 1])
    for _ in range(2):
        assert torch.allclose(f(x, t, y), tiny_net(x, t, y) * 1.01)
    assert f.checked and f.fallback_reason is None and f.compiled is not None


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=type)
def test_compiled_forward_out_of_memory_is_not_hidden(tiny_net, monkeypatch, error):
    """Out of memory is not a compile failure: the eager network would run out too, so it is
    raised, not swallowed into an eager fallback."""

    def oom_compile(module, **kw):
        def fail(*args):
            raise error

        return fail

    monkeypatch.setattr(torch, "compile", oom_compile)
    f = CompiledForward(tiny_net, torch.device("cpu"))
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(type(error)):
        f(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert f.fallback_reason is None


def test_compiled_forward_traces_the_real_network(tiny_net):
    """Dynamo really traces the UNet (the graph is run by the eager backend, which needs no C++
    compiler and keeps the test fast); images match the uncompiled network's."""
    f = CompiledForward(tiny_net, torch.device("cpu"), backend="eager")
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(scale=2.0, sampler="dpmpp-2m", steps=4, seed=1, batch_size=2)
    torch._dynamo.reset()
    out = sample_with(f, cfg, labels, static_batches=True, **kw)
    assert f.fallback_reason is None and f.compiled is not None
    assert torch.equal(out, sample_with(tiny_net, cfg, labels, **kw))


def test_cuda_mode_uses_graphs_and_clones():
    f = CompiledForward(torch.nn.Identity(), torch.device("cuda"), backend="eager")
    assert f.cudagraphs
    g = CompiledForward(torch.nn.Identity(), torch.device("cpu"), backend="eager")
    assert not g.cudagraphs


def _check_setup(dropout: float = 0.0):
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=dropout))
    torch.manual_seed(0)
    net = UNet(cfg.model).train()  # fresh: zero output layers, as at the start of training
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def loss_of(f):
        gen = torch.Generator().manual_seed(5)
        return training_loss(f, x, y, schedule, cfg.diffusion, cfg.model.num_classes, gen)

    return net, loss_of


def test_gradient_check_passes_a_faithful_compile_and_restores_everything():
    net, loss_of = _check_setup()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    check = check_compiled_gradients(net, lambda x, t, y: net(x, t, y), loss_of, "fp32")
    assert check.ok and check.lost == 0 and check.diff_max == 0 and check.noise_max == 0
    # The perturbation makes every parameter's gradient nonzero, though a fresh UNet's zero output
    # layer gives zero gradient to all the others: without it the comparison would be blind.
    assert check.params == sum(1 for _ in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def _with_params_detached(net, names):
    def f(x, t, y):
        params = {k: (v.detach() if k in names else v) for k, v in net.named_parameters()}
        return torch.func.functional_call(net, params, (x, t, y))

    return f


def test_gradient_check_catches_lost_gradients():
    """The torch 2.13 CPU inductor + bf16 fault: most parameters get zero gradient."""
    net, loss_of = _check_setup()
    lose = {k for k, _ in net.named_parameters() if k.startswith("down")}
    check = check_compiled_gradients(net, _with_params_detached(net, lose), loss_of, "bf16")
    assert not check.ok
    assert check.lost == len(lose) > 0
    assert f"{len(lose)} of {check.params} parameters lost" in check.describe()


def test_gradient_check_catches_wrong_gradients_with_the_right_loss():
    net, loss_of = _check_setup()

    def doubled_gradient(x, t, y):
        out = net(x, t, y)
        return 2 * out - out.detach()  # same values, twice the gradient

    check = check_compiled_gradients(net, doubled_gradient, loss_of, "bf16")
    assert not check.ok and check.lost == 0
    assert check.diff_median == pytest.approx(1.0, rel=1e-4)


def test_gradient_check_allows_bf16_rounding_but_not_fp32():
    net, loss_of = _check_setup()

    def rounded(x, t, y):  # same values; output gradients perturbed by 4 % (rms)
        out = net(x, t, y)
        return out + 0.04 * (out - out.detach()) * torch.randn_like(out)

    assert check_compiled_gradients(net, rounded, loss_of, "bf16").ok
    assert not check_compiled_gradients(net, rounded, loss_of, "fp32").ok


def test_gradient_check_allows_other_dropout_masks():
    """Inductor draws dropout masks from its own generator: the compiled step never sees the
    eager step's mask, and the check must widen its limits by the eager-vs-eager difference."""
    net, loss_of = _check_setup(dropout=0.3)

    def other_masks(x, t, y):
        torch.manual_seed(1234)
        return net(x, t, y)

    check = check_compiled_gradients(net, other_masks, loss_of, "fp32")
    assert check.noise_median > 0.01 and check.diff_median > 0.01
    assert check.ok, check.describe()
    lose = {k for k, _ in net.named_parameters() if k.startswith("up")}
    assert not check_compiled_gradients(net, _with_params_detached(net, lose), loss_of, "fp32").ok
