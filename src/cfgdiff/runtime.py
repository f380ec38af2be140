"""Where and how tensors run: device choice, CPU threads, mixed precision, compiled forward
passes, the check that a compiled training step computes the eager step's gradients, and
sampling batch sizes.

bf16 autocast is used on CUDA and on CPUs with native bf16 arithmetic, AMX or AVX512-BF16 (oneDNN
runs bf16 convolutions there 1.4-2.5x faster than fp32, measured in bench/train_throughput.py and
bench/sample_throughput.py); elsewhere fp32. Loss, EMA, optimizer state and sampler arithmetic
stay fp32 in every case.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from cfgdiff.config import ModelConfig
from cfgdiff.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


# CPU flags (Linux /proc/cpuinfo names) of the bf16 instructions oneDNN runs bf16 convolutions
# and matrix products with: AMX tiles (Intel Sapphire Rapids and later) and AVX512-BF16 dot
# products (Intel Cooper Lake, AMD Zen 4 and later). Measured with bench/train_throughput.py and
# bench/sample_throughput.py on 2 cores, cpu-demo UNet, bf16 against fp32: Xeon with AMX 2.0x to
# train and 2.5x to sample; AMD EPYC with AVX512-BF16 (no AMX) 1.4-1.8x to train (four runs),
# 1.7-2.1x to sample (bench/results/precision_avx512bf16_cpu.log). Without either, oneDNN has no
# native bf16 kernels, so fp32 is kept there (no such CPU has been measured here).
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
    CPU. Its gain on these networks is not measured yet (bench/train_throughput.py, "-bm")."""
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
    if name not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, got {name!r}")
    return name


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


class CompiledForward:
    """f(x, t, y) through torch.compile, falling back to the eager network for good the first time
    the compiled one raises (a missing C++ compiler, an unsupported op, a failed CUDA graph).

    On CUDA the default mode is "reduce-overhead" (CUDA graphs: one replay per sampler step
    instead of hundreds of kernel launches). Replays reuse their output buffers, so each output is
    cloned before it is returned. Shapes must stay fixed for graphs to be reused: sample.generate
    pads its last batch when given `static_batches=True`. `fallback_reason` says why compilation
    was given up, or is None.

    A compile that succeeds can still be wrong (docs/DESIGN.md, "Compilation policy"), so the
    first compiled output is compared with the eager network's on the same input; if they differ
    by more than OUTPUT_TOLERANCE (relative L2) or the compiled one is not finite, the eager
    network is used from then on.
    """

    # Relative L2 difference allowed between the first compiled and eager outputs. Measured on
    # the CPU (torch 2.13, trained cpu-demo UNet, t = 50, 500, 999): fp32 4e-7, bf16 autocast 4e-3.
    OUTPUT_TOLERANCE = 0.1

    def __init__(self, net, device: torch.device, *, mode: str | None = None, backend=None):
        self.net = net
        self.cudagraphs = device.type == "cuda" and mode in (None, "reduce-overhead")
        if mode is None and device.type == "cuda":
            mode = "reduce-overhead"
        kw = {"mode": mode} if mode is not None else {}
        if backend is not None:
            kw["backend"] = backend
        self.compiled = torch.compile(net, **kw)
        self.fallback_reason: str | None = None
        self.checked = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(x, t, y)
                out = out.clone() if self.cudagraphs else out
            except Exception as e:  # compilation failures come in many types
                if is_out_of_memory(e):  # not a compile failure: eager would run out too
                    raise
                self.fallback_reason = error_line(e)
                self.compiled = None
            else:
                if self.checked:
                    return out
                return self._check(out, x, t, y)
        return self.net(x, t, y)

    def _check(self, out, x, t, y) -> torch.Tensor:
        ref = self.net(x, t, y)
        diff = float((out.detach().float() - ref.detach().float()).norm())
        scale = float(ref.detach().float().norm())
        self.checked = True
        if math.isfinite(diff) and diff <= self.OUTPUT_TOLERANCE * scale:
            return out
        rel = diff / max(scale, 1e-30)
        self.fallback_reason = (
            f"compiled output differs from eager: relative difference {rel:.3g} "
            f"(limit {self.OUTPUT_TOLERANCE:g})"
        )
        self.compiled = None
        return ref


# Largest allowed (median, max) over parameters of |g_compiled - g_eager| / |g_eager|, before the
# allowance for stochastic layers. Healthy compiled steps measured on the CPU (torch 2.13, the
# tiny, cpu-demo and mnist UNets): fp32 median 9e-7, max 7e-6; bf16 median up to 9e-3, max up to
# 3e-2. A miscompile that loses a parameter's gradient gives 1, a flipped sign 2. The margins
# leave room for TF32 and other kernels on CUDA.
GRADIENT_TOLERANCE = {"fp32": (0.01, 0.1), "bf16": (0.05, 0.3)}


@dataclass(frozen=True)
class GradientCheck:
    """A compiled training step's gradients against the eager step's, on one batch with the same
    noise. `diff_*` are the median and max over parameters of |g_c - g_e| / |g_e|; `noise_*` the
    same between two eager steps whose global random draws differ (dropout; 0 without it), which
    widens the tolerance by twice itself. `lost` counts parameters with a finite, nonzero eager
    gradient whose compiled gradient is missing, zero or non-finite."""

    params: int
    lost: int
    diff_median: float
    diff_max: float
    noise_median: float
    noise_max: float
    precision: str

    @property
    def limits(self) -> tuple[float, float]:
        tol_median, tol_max = GRADIENT_TOLERANCE.get(self.precision, GRADIENT_TOLERANCE["bf16"])
        return tol_median + 2 * self.noise_median, tol_max + 2 * self.noise_max

    @property
    def ok(self) -> bool:
        lim_median, lim_max = self.limits
        return (
            self.params > 0
            and self.lost == 0
            and self.diff_median <= lim_median
            and self.diff_max <= lim_max
        )

    def describe(self) -> str:
        lim_median, lim_max = self.limits
        return (
            f"{self.lost} of {self.params} parameters lost their gradient; relative gradient "
            f"difference median {self.diff_median:.2g} (limit {lim_median:.2g}), max "
            f"{self.diff_max:.2g} (limit {lim_max:.2g})"
        )


def check_compiled_gradients(
    net: torch.nn.Module,
    compiled: Callable,
    loss_of: Callable[[Callable], torch.Tensor],
    precision: str,
    *,
    seed: int = 0,
) -> GradientCheck:
    """Run one training step's forward and backward pass through `compiled` and through `net`, and
    compare the gradients (a successful compile can still be wrong: see docs/DESIGN.md).

    `loss_of(f)` must compute the loss of one fixed batch through f with the same noise each call
    (a fresh, seeded generator). The check runs on the parameters plus a small seeded perturbation:
    a fresh UNet's output layers are zero, which makes every other gradient zero and the
    comparison blind. Parameters, buffers, gradients and the global RNG states are restored
    afterwards, so training goes on exactly as if the check had not run. Compilation errors
    propagate to the caller."""
    params = [p for p in net.parameters() if p.requires_grad]
    device = params[0].device
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
    devices = [device] if device.type == "cuda" else []

    def grads(f, rng_seed: int) -> list[torch.Tensor | None]:
        torch.manual_seed(rng_seed)
        for p in params:
            p.grad = None
        loss_of(f).backward()
        return [None if p.grad is None else p.grad.detach().float().clone() for p in params]

    try:
        with torch.random.fork_rng(devices=devices):
            g = torch.Generator(device=device).manual_seed(seed)
            with torch.no_grad():
                for p in params:
                    scale = 0.1 * max(float(p.detach().float().pow(2).mean().sqrt()), 0.1)
                    noise = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype)
                    p.add_(noise, alpha=scale)
            g_compiled = grads(compiled, seed)
            g_eager = grads(net, seed)
            g_resampled = grads(net, seed + 1)
    finally:
        net.load_state_dict(saved)
        for p in params:
            p.grad = None

    diffs, noise, lost = [], [], 0
    for gc, ge, gr in zip(g_compiled, g_eager, g_resampled, strict=True):
        if ge is None or not bool(torch.isfinite(ge).all()):
            continue
        norm = ge.norm()
        if float(norm) == 0:
            continue
        if gc is None or not bool(torch.isfinite(gc).all()) or float(gc.abs().max()) == 0:
            lost += 1
            gc = torch.zeros_like(ge)
        diffs.append(float((gc - ge).norm() / norm))
        noise.append(0.0 if gr is None else float((gr - ge).norm() / norm))

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2] if v else 0.0

    return GradientCheck(
        params=len(diffs),
        lost=lost,
        diff_median=median(diffs),
        diff_max=max(diffs, default=0.0),
        noise_median=median(noise),
        noise_max=max(noise, default=0.0),
        precision=precision,
    )


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
