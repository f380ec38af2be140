"""Device helpers (runtime.py): sampling batch from free memory, out-of-memory errors, CPU threads
and flags, precision, and when to compile."""

import pytest
import torch
from conftest import OUT_OF_MEMORY, tiny_config

from cfgdiff.runtime import (
    CPU_SAMPLING_BATCH,
    batch_for_memory,
    compile_sampling,
    compile_training,
    is_out_of_memory,
    sampling_batch_size,
)


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


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=type)
def test_is_out_of_memory(error):
    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("inductor: no C++ compiler found"))
    assert not is_out_of_memory(ValueError("bad shape"))


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


def test_compile_auto_rules():
    """--compile auto: where compiling was measured to pay off (train: CUDA, or runs of 200,000+
    images on AMX CPUs, not on AVX512-BF16 ones; sampling: CPU jobs of 100,000+ image-steps);
    on/off are obeyed."""
    from functools import partial

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    amx = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    avx512_bf16 = {"avx512f", "avx512_bf16"}
    train = partial(compile_training, cpu_flags=amx)
    assert train("auto", cuda, 10, 8)
    assert not train("auto", cpu, 1000, 64)  # the demo: 64,000 images
    assert not train("auto", cpu, 1400, 64)  # the demo before: 89,600 images
    assert train("auto", cpu, 3125, 64)  # 200,000 images
    assert not train("off", cuda, 10**6, 128)
    assert train("on", cpu, 1, 1)
    assert not train("auto", cpu, 10**6, 64, seconds=300)  # --time 5m: too short
    assert train("auto", cpu, 1, 1, seconds=3600) and train("auto", cuda, 1, 1, seconds=10)
    # without AMX: never on the CPU by itself (measured 0.89-1.05x); CUDA and "on" unchanged
    train = partial(compile_training, cpu_flags=avx512_bf16)
    assert not train("auto", cpu, 10**6, 64) and not train("auto", cpu, 1, 1, seconds=3600)
    assert train("auto", cuda, 10, 8) and train("on", cpu, 1, 1)
    assert not compile_training("auto", cpu, 10**6, 64, cpu_flags=set())
    assert not compile_sampling("auto", cuda, 10**6, 20)
    assert not compile_sampling("auto", cpu, 500, 20)  # an eval: 10,000 image-steps
    assert compile_sampling("auto", cpu, 5000, 20)
    assert compile_sampling("on", cuda, 1, 1) and not compile_sampling("off", cpu, 10**6, 20)
