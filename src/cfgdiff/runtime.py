"""Where and how tensors run: device choice and mixed precision.

bf16 autocast is used on CUDA and on CPUs with AMX tiles (oneDNN runs bf16 convolutions there
2-3x faster than fp32, measured in bench/train_throughput.py); elsewhere fp32. Loss, EMA,
optimizer state and sampler arithmetic stay fp32 in every case.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from cfgdiff.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has AMX bf16 tiles (Intel Sapphire Rapids and later), read from the
    Linux CPU flags; oneDNN uses them for bf16 convolutions and matrix products."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and AMX CPUs, else 'fp32'."""
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
