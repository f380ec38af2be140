"""Device helpers: compiled forward with eager fallback, the compiled-gradient check, sampling batch
from free memory."""

import dataclasses

import pytest
import torch
from conftest import OUT_OF_MEMORY, tiny_config

from cfgdiff.diffusion import training_loss
from cfgdiff.runtime import (
    CPU_SAMPLING_BATCH,
    CompiledForward,
    batch_for_memory,
    check_compiled_gradients,
    is_out_of_memory,
    sampling_batch_size,
)
from cfgdiff.sample import generate
from cfgdiff.schedule import make_schedule
from cfgdiff.unet import UNet


def test_batch_for_memory_arithmetic():
    gib = 2**30
    # 60% of 10 GiB at 1 MiB per image = 6144 images, already a multiple of 64
    assert batch_for_memory(10 * gib, 2**20) == 6144
    assert batch_for_memory(10 * gib, 3 * 2**20) == 2048  # 2048.0 -> 2048
    assert batch_for_memory(10 * gib, 5 * 2**20) == 1216  # 1228.8 -> rounded down to 64s
    assert batch_for_memory(100 * gib, 2**20) == 8192  # capped
    assert batch_for_memory(2**20, 2**20) == 64  # floor
    assert batch_for_memory(gib, 0) == 8192


class FakeMemory:
    """Allocator counters: `per_row` bytes of peak per row of the forward pass."""

    def __init__(self, per_row: int, free: int):
        self.per_row, self.free_bytes, self.rows = per_row, free, 0
        self.resets = 0

    def reset_peak(self):
        self.resets += 1

    def allocated(self):
        return 1000

    def peak(self):
        return 1000 + self.per_row * self.rows

    def free(self):
        return self.free_bytes


def test_sampling_batch_from_measured_peak(tiny_net):
    cfg = tiny_config()
    mem = FakeMemory(per_row=2**20, free=10 * 2**30)

    def net(x, t, y):
        mem.rows = x.shape[0]
        assert (y == cfg.model.num_classes).all() and x.shape[1:] == (1, 8, 8)
        return tiny_net(x, t, y)

    n = sampling_batch_size(net, cfg.model, torch.device("cpu"), "fp32", memory=mem)
    # a guided image costs two rows (2 MiB) + 8 fp32 copies of the 1x8x8 sampler state
    assert mem.resets == 1 and mem.rows == 128
    assert n == batch_for_memory(10 * 2**30, 2 * 2**20 + 8 * 4 * 64) == 3008
    assert sampling_batch_size(net, cfg.model, torch.device("cpu"), "fp32") == (CPU_SAMPLING_BATCH)


def _assert_samples_like_eager(f, net):
    """Images sampled through the wrapper f are those of the eager network, bit for bit."""
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2])
    kw = dict(scale=3.0, sampler="ddim", steps=3, seed=0)
    assert torch.equal(generate(f, cfg, labels, **kw), generate(net, cfg, labels, **kw))


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


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=type)
def test_is_out_of_memory(error):
    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("inductor: no C++ compiler found"))
    assert not is_out_of_memory(ValueError("bad shape"))


def test_compiled_forward_traces_the_real_network(tiny_net):
    """Dynamo really traces the UNet (the graph is run by the eager backend, which needs no C++
    compiler and keeps the test fast); images match the uncompiled network's."""
    f = CompiledForward(tiny_net, torch.device("cpu"), backend="eager")
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(scale=2.0, sampler="dpmpp-2m", steps=4, seed=1, batch_size=2)
    torch._dynamo.reset()
    out = generate(f, cfg, labels, static_batches=True, **kw)
    assert f.fallback_reason is None and f.compiled is not None
    assert torch.equal(out, generate(tiny_net, cfg, labels, **kw))


def test_cuda_mode_uses_graphs_and_clones():
    f = CompiledForward(torch.nn.Identity(), torch.device("cuda"), backend="eager")
    assert f.cudagraphs
    g = CompiledForward(torch.nn.Identity(), torch.device("cpu"), backend="eager")
    assert not g.cudagraphs


def test_cgroup_quota_parsing(tmp_path):
    from cfgdiff.runtime import cgroup_cpu_quota

    f = tmp_path / "cpu.max"
    for text, want in [
        ("200000 100000\n", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("max 100000", None),
        ("garbage", None),
    ]:
        f.write_text(text)
        assert cgroup_cpu_quota(str(f)) == want, text
    assert cgroup_cpu_quota(str(tmp_path / "missing")) is None


def test_threads_capped_at_quota_never_raised(tmp_path, monkeypatch):
    from cfgdiff.runtime import configure_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    f = tmp_path / "cpu.max"
    try:
        torch.set_num_threads(4)
        f.write_text("100000 100000")
        assert configure_cpu_threads(str(f)) == 1 == torch.get_num_threads()
        f.write_text("max 100000")
        assert configure_cpu_threads(str(f)) == 1  # never raised
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        f.write_text("100000 100000")
        assert configure_cpu_threads(str(f)) == 4  # the user's setting wins
    finally:
        torch.set_num_threads(before)


# --- check_compiled_gradients: a compiled training step against the eager one ----------------


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


def test_fast_bf16_flags_amx_and_avx512_bf16():
    """bf16 autocast is chosen where oneDNN has native bf16 arithmetic: AMX tiles (Intel Sapphire
    Rapids) or AVX512-BF16 (AMD Zen 4, Intel Cooper Lake); not on AVX-512 or AVX2 alone."""
    from cfgdiff.runtime import fast_bf16_in_flags, resolve_precision

    sapphire = set("fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split())
    zen4 = set("fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni".split())
    skylake = set("fpu sse avx2 avx512f avx512bw avx512_vnni".split())
    zen3 = set("fpu sse avx2 fma".split())
    assert fast_bf16_in_flags(sapphire) and fast_bf16_in_flags(zen4)
    assert not fast_bf16_in_flags(skylake) and not fast_bf16_in_flags(zen3)
    assert not fast_bf16_in_flags({"avx512_bf16x", "amx"})  # whole names only
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    import cfgdiff.runtime as rt

    for fast, want in [(True, "bf16"), (False, "fp32")]:
        monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert rt.resolve_precision("auto", torch.device("cpu")) == want


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    """The flags are the first "flags" line's names, whole; empty for a file without one (an ARM
    cpuinfo says "Features") or no file."""
    from cfgdiff.runtime import cpu_flags, fast_bf16_in_flags

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
        "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert fast_bf16_in_flags(cpu_flags(str(x86)))
    assert cpu_flags(str(arm)) == frozenset() == cpu_flags(str(tmp_path / "missing"))


def test_describe_machine_names_the_cpu_and_its_bf16(tmp_path):
    import platform

    from cfgdiff.runtime import cpuinfo, describe_machine

    amd = tmp_path / "amd"
    amd.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: something else\n"
    )
    intel = tmp_path / "intel"
    intel.write_text(
        "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t: avx512_bf16 amx_bf16\n"
    )
    old = tmp_path / "old"
    old.write_text("model name\t: Intel(R) Xeon(R) E5-2686\nflags\t: fpu avx2\n")
    threads = torch.get_num_threads()
    assert cpuinfo(str(amd))["model name"] == "AMD EPYC 9R14"  # the first processor's
    assert describe_machine(torch.device("cpu"), str(amd)) == (
        f"AMD EPYC 9R14 ({threads} threads; avx512_bf16)"
    )
    assert describe_machine(torch.device("cpu"), str(intel)).endswith("; amx_bf16, avx512_bf16)")
    assert describe_machine(torch.device("cpu"), str(old)).endswith("; no native bf16)")
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    assert describe_machine(torch.device("cpu"), str(tmp_path / "none")).startswith(fallback)
