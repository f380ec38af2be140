"""Timing helpers shared by the benchmarks: one call timed with the device's queue drained
before and after, and the median of such times."""

from __future__ import annotations

import time

import torch


def timed_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of fn, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]
