"""Device helpers: compiled forward with eager fallback, sampling batch from free memory."""

import pytest
import torch
from conftest import tiny_config

from cfgdiff.runtime import (
    CPU_SAMPLING_BATCH,
    CompiledForward,
    batch_for_memory,
    sampling_batch_size,
)
from cfgdiff.sample import generate


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


def test_compiled_forward_falls_back_to_eager(tiny_net, monkeypatch):
    def broken_compile(module, **kw):
        def fail(*args):
            raise RuntimeError("inductor: no C++ compiler found (test)\nmore lines")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = CompiledForward(tiny_net, torch.device("cpu"))
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2])
    kw = dict(scale=3.0, sampler="ddim", steps=3, seed=0)
    assert torch.equal(generate(f, cfg, labels, **kw), generate(tiny_net, cfg, labels, **kw))
    assert f.fallback_reason == "RuntimeError: inductor: no C++ compiler found (test)"
    assert f.compiled is None


def test_compiled_forward_out_of_memory_is_not_hidden(tiny_net, monkeypatch):
    def oom_compile(module, **kw):
        def fail(*args):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")

        return fail

    monkeypatch.setattr(torch, "compile", oom_compile)
    f = CompiledForward(tiny_net, torch.device("cpu"))
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(torch.OutOfMemoryError):
        f(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


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
