"""Where and how tensors run: device choice, CPU facts and threads, mixed precision, when to
compile (training and sampling), out-of-memory errors, and sampling batch sizes.

bf16 autocast is used on CUDA and on CPUs with native bf16 arithmetic, AMX or AVX512-BF16
(docs/DESIGN.md, "Precision policy"); elsewhere fp32. Loss, EMA, optimizer state and sampler
arithmetic stay fp32 in every case. Compiled networks themselves are compiled.py's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
from collections.abc import Collection

import torch

from cfgdiff.config import ModelConfig
from cfgdiff.errors import ConfigError

# The choices of the device, precision and compile settings, said once.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_CHOICES = ("auto", "on", "off")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device=cuda`: no CUDA device is available (use cpu or auto)")
    if name not in DEVICES:
        raise ConfigError(f"`device` must be one of {', '.join(DEVICES)}, got {name!r}")
    return torch.device(name)


# CPU flags (Linux /proc/cpuinfo names) of the bf16 instructions oneDNN runs bf16 convolutions
# and matrix products with: AMX tiles (Intel Sapphire Rapids and later) and AVX512-BF16 dot
# products (Intel Cooper Lake, AMD Zen 4 and later); bf16 is faster than fp32 there
# (docs/DESIGN.md, "Precision policy"). Without either, oneDNN has no native bf16 kernels, so
# fp32 is kept there.
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def fast_bf16_in_flags(flags: Collection[str]) -> bool:
    """True where a set of CPU flags names an instruction set with native bf16 arithmetic."""
    return any(f in flags for f in FAST_BF16_FLAGS)


@functools.cache
def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo ("model name", "flags", ...); empty
    where it cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """This CPU's flags as Linux names them; empty where there are none (other architectures
    name theirs "Features") or cpuinfo cannot be read."""
    return frozenset(cpuinfo(path).get("flags", "").split())


_read_cpu_flags = cpu_flags  # for functions whose parameter of that name shadows it


def cpu_has_fast_bf16() -> bool:
    """True where this CPU has native bf16 arithmetic (FAST_BF16_FLAGS)."""
    return fast_bf16_in_flags(cpu_flags())


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs allowed by a cgroup v2 quota ("200000 100000" -> 2), or None if unlimited/unknown.
    Containers often see every host core but may only use their quota's worth."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def configure_cuda() -> None:
    """Process-wide CUDA setting for cfgdiff's fixed-shape work: cuDNN autotunes each convolution
    shape on first use and keeps the fastest algorithm (cudnn.benchmark, the EDM training loop's
    default). Training batches and compiled sampling batches never change shape, so the one-off
    search is repaid; eager sampling adds one search for a short last batch. No effect on the
    CPU."""
    torch.backends.cudnn.benchmark = True


def configure_cpu_threads(quota_path: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cap torch's intra-op threads at the CPUs this process may really use (affinity and cgroup
    quota): torch sizes its pool from the cores it sees, and oversubscribing a 2-CPU quota with a
    host's 64 threads makes every op slower. Never raises the count, and leaves it alone when
    OMP_NUM_THREADS is set. Returns the thread count in force."""
    n = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return n
    limit = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
    quota = cgroup_cpu_quota(quota_path)
    if quota is not None:
        limit = min(limit, quota)
    if limit < n:
        torch.set_num_threads(limit)
        n = limit
    return n


def describe_machine(device: torch.device, path: str = "/proc/cpuinfo") -> str:
    """What a run or benchmark ran on, for its logs and records (speed depends on it): "NVIDIA
    H200", or "AMD EPYC (2 threads; avx512_bf16)" (the CPU's native bf16 instruction sets)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpuinfo(path)
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    native = [f for f in FAST_BF16_FLAGS if f in cpu_flags(path)]
    bf16 = ", ".join(native) if native else "no native bf16"
    return f"{name} ({torch.get_num_threads()} threads; {bf16})"


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs with AMX or AVX512-BF16, else 'fp32'."""
    if name == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_fast_bf16() else "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


# ----------------------------------------------------------------- when to compile
# torch.compile costs seconds to minutes up front and pays back per step; each "auto" below is
# on where it was measured to pay back (docs/DESIGN.md, "Compilation policy").

# Sampling on the CPU: compiled from this many image-steps (images x sampler steps) on.
COMPILE_MIN_IMAGE_STEPS = 100_000
# Training on the CPU: compiled only where AMX is, for runs of this many images (or, given a
# time budget, this many seconds) on; it did not pay back on the AVX512-BF16 CPU measured.
COMPILE_MIN_TRAIN_IMAGES = 200_000
COMPILE_MIN_TRAIN_SECONDS = 800
COMPILE_TRAIN_CPU_FLAG = "amx_tile"


def compile_sampling(choice: str, device: torch.device, n_images: int, steps: int) -> bool:
    """compile="auto"|"on"|"off" for sampling `n_images` with `steps` sampler steps: auto is on
    for CPU jobs of at least COMPILE_MIN_IMAGE_STEPS image-steps, off on CUDA (not measured)."""
    _check_compile(choice)
    if choice != "auto":
        return choice == "on"
    return device.type == "cpu" and n_images * steps >= COMPILE_MIN_IMAGE_STEPS


def compile_training(
    choice: str,
    device: torch.device,
    steps: int,
    batch_size: int,
    seconds: float | None = None,
    cpu_flags: Collection[str] | None = None,
) -> bool:
    """compile="auto"|"on"|"off" for a training run: auto is on for CUDA, and on AMX CPUs for
    runs long enough to repay the compilation (not the 1000-step demo); `seconds` is a time
    budget, `cpu_flags` this CPU's (read from Linux when None)."""
    _check_compile(choice)
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return True
    flags = _read_cpu_flags() if cpu_flags is None else cpu_flags
    if COMPILE_TRAIN_CPU_FLAG not in flags:
        return False
    if seconds is not None:
        return seconds >= COMPILE_MIN_TRAIN_SECONDS
    return steps * batch_size >= COMPILE_MIN_TRAIN_IMAGES


def _check_compile(choice: str) -> None:
    if choice not in COMPILE_CHOICES:
        raise ConfigError(f"`compile` must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")


def autocast(device: torch.device, precision: str):
    """Context manager for the network's forward pass."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: torch.OutOfMemoryError (CUDA), MemoryError, and the plain
    RuntimeErrors torch raises for others ("DefaultCPUAllocator: can't allocate memory"), also
    when wrapped by torch.compile's own exception types."""
    msg = str(e)
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def error_line(e: BaseException) -> str:
    """An exception as one short line ("Type: first line of the message"), for fallback notes."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def batch_for_memory(
    free_bytes: int,
    bytes_per_image: float,
    *,
    fraction: float = 0.6,
    lo: int = 64,
    hi: int = 8192,
    multiple: int = 64,
) -> int:
    """The largest sampling batch whose working set fits `fraction` of the free memory, rounded
    down to a multiple of `multiple` and kept in [lo, hi]."""
    if bytes_per_image <= 0:
        return hi
    n = int(free_bytes * fraction / bytes_per_image) // multiple * multiple
    return max(lo, min(hi, n))


class _CudaMemory:
    """The CUDA allocator's counters, behind the small interface sampling_batch_size needs."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]


CPU_SAMPLING_BATCH = 64  # CPU sampling is fastest in small, cache-sized batches


def sampling_batch_size(
    net,
    model: ModelConfig,
    device: torch.device,
    precision: str,
    *,
    memory=None,
    probe: int = 64,
) -> int:
    """Images per sampler batch: 64 on the CPU; on CUDA as many as fit in the free memory, from
    the peak memory of one guided forward pass (2 x `probe` images) measured here. `memory` (for
    tests) stands in for the CUDA allocator counters."""
    if device.type != "cuda" and memory is None:
        return CPU_SAMPLING_BATCH
    memory = memory or _CudaMemory(device)
    x = torch.zeros(
        (2 * probe, model.in_channels, model.image_size, model.image_size), device=device
    )
    t = torch.zeros((2 * probe,), dtype=torch.long, device=device)
    y = torch.full((2 * probe,), model.num_classes, dtype=torch.long, device=device)
    memory.reset_peak()
    before = memory.allocated()
    with torch.inference_mode(), autocast(device, precision):
        net(x, t, y)
    activations = (memory.peak() - before) / probe  # per guided image (2 rows of the forward)
    sampler_state = 8 * 4 * x[0].numel()  # x_t, x0 history, noise, ... in fp32
    del x, t, y
    return batch_for_memory(memory.free(), activations + sampler_state)
