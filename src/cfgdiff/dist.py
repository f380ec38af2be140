"""Several processes as one run (torch.distributed), and nothing at all for one process.

Owns: whether this process is one of several (torchrun's WORLD_SIZE, RANK and LOCAL_RANK), the
process group's start and end (NCCL on CUDA, gloo on the CPU, chosen from the device; a timeout
on every collective, `CFGDIFF_DIST_TIMEOUT` seconds), and the few collectives the rest of the
library asks for: a flag that is true on any rank, the first bad step over ranks, a mean, one
rank's integer, a barrier, rank 0 first, the equality of a set of tensors across ranks (the
EMA's, when a checkpoint is written), contiguous shards of N items and their gathering.

It does not know what a run, a batch or an image is. Without torchrun's environment (or with
WORLD_SIZE=1) `world()` is one process of rank 0, every helper answers locally and
torch.distributed is never initialised, so a single process runs exactly the code it always
ran. Failures of the other processes (one died, or stopped answering for the timeout) come out
of every collective, DistributedDataParallel's included, as one-line RuntimeFaults
(`peer_faults`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist

from cfgdiff.errors import ConfigError, RuntimeFault

TIMEOUT_ENV = "CFGDIFF_DIST_TIMEOUT"
# seconds a collective may wait for the other processes: longer than any rank-0-only work
# between two collectives of a run (a preview, an in-training evaluation, a checkpoint)
DEFAULT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank on this machine: which GPU it drives

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> World:
    """The world torchrun's environment describes (one process without it)."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if env["WORLD_SIZE"] is None:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env["RANK"] or 0)
        local = int(env["LOCAL_RANK"] or 0)
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE, RANK and LOCAL_RANK must be integers, got {env} (run under torchrun)"
        ) from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"RANK {rank} outside WORLD_SIZE {size} (run under torchrun)")
    return World(rank, size, local)


def world() -> World:
    """The world of the process group this process belongs to; one process when none is up."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return World()
    return World(tdist.get_rank(), tdist.get_world_size(), detect().local_rank)


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: torch.device | str):
    """Join the other processes for the duration of the block, when torchrun started several;
    else do nothing at all. On CUDA each process drives GPU LOCAL_RANK (set as the current
    device, so that "cuda" means it)."""
    w = detect()
    if not w.enabled or tdist.is_initialized():
        yield w
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(w.local_rank)
    try:
        tdist.init_process_group(
            backend_for(device), timeout=datetime.timedelta(seconds=timeout_s())
        )
    except (RuntimeError, ValueError) as e:
        raise RuntimeFault(
            f"rank {w.rank} of {w.size} could not join the other processes: {_first_line(e)}"
        ) from None
    try:
        with peer_faults(w):
            yield w
    finally:
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def peer_faults(w: World):
    """A collective that failed because another process died or stopped answering becomes a
    one-line RuntimeFault (torch raises DistError subclasses, or RuntimeErrors from gloo)."""
    try:
        yield
    except RuntimeFault:
        raise
    except RuntimeError as e:
        text = str(e)
        known = isinstance(e, getattr(tdist, "DistError", ())) or any(
            s in text for s in ("gloo", "Gloo", "NCCL", "Connection", "connection", "timed out",
                                "Timed out", "peer", "ProcessGroup", "Socket", "socket")
        )  # fmt: skip
        if not w.enabled or not known:
            raise
        raise RuntimeFault(
            f"rank {w.rank} of {w.size}: another process of this run died or stopped answering "
            f"(collective timeout {timeout_s():g} s, {TIMEOUT_ENV}): {_first_line(e)}"
        ) from None


def _device() -> torch.device:
    """Where this backend's collectives take their tensors."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, w: World) -> bool:
    """True on every rank when `flag` is true on any (the stop request); `flag` alone for one."""
    if not w.enabled:
        return flag
    t = torch.tensor([int(flag)], device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def every_rank(flag: bool, w: World) -> bool:
    """True on every rank when `flag` is true on all of them."""
    return not any_rank(not flag, w)


def first_step(step: int, w: World) -> int:
    """The least of the ranks' steps that are >= 0 (the first bad step), -1 when none is."""
    if not w.enabled:
        return step
    none = torch.iinfo(torch.long).max
    t = torch.tensor([step if step >= 0 else none], device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    v = int(t.item())
    return -1 if v == none else v


def mean_(t: torch.Tensor, w: World) -> torch.Tensor:
    """t <- its mean over ranks, in place (a no-op for one process)."""
    if w.enabled:
        buf = t.detach().to(_device(), torch.float64)
        tdist.all_reduce(buf)
        t.copy_((buf / w.size).to(t.device, t.dtype))
    return t


def broadcast_int(value: int, w: World, src: int = 0) -> int:
    """Rank `src`'s value on every rank."""
    if not w.enabled:
        return value
    t = torch.tensor([int(value)], device=_device())
    tdist.broadcast(t, src)
    return int(t.item())


def barrier(w: World) -> None:
    """Every rank waits for every other (called by all ranks, never under a rank condition)."""
    if w.enabled:
        tdist.barrier()


@contextlib.contextmanager
def main_first(w: World):
    """Rank 0 runs the block first (it may write a cache), then the others (they read it)."""
    if not w.is_main:
        barrier(w)
    yield
    if w.is_main:
        barrier(w)


def check_equal(tensors: dict[str, torch.Tensor], what: str, w: World) -> None:
    """Every rank holds the same values as rank 0 in `tensors`, bit for bit; else a RuntimeFault
    on every rank naming the first tensor that differs (one broadcast of the flattened tensors,
    one reduction of a flag per tensor)."""
    if not w.enabled:
        return
    names = list(tensors)
    dev = _device()
    local = [tensors[k].detach().to(dev).reshape(-1) for k in names]
    floats = torch.cat([v.to(torch.float64) for v in local]) if local else torch.zeros(0)
    ref = floats.clone()
    tdist.broadcast(ref, 0)
    bad = torch.zeros(len(names), dtype=torch.int64, device=dev)
    lo = 0
    for i, v in enumerate(local):
        hi = lo + v.numel()
        a, b = floats[lo:hi], ref[lo:hi]
        same = torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
        bad[i] = 0 if same else w.rank + 1  # 1 + the highest rank that differs
        lo = hi
    tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
    wrong = [(names[i], int(r) - 1) for i, r in enumerate(bad.tolist()) if r]
    if wrong:
        name, rank = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise RuntimeFault(
            f"{what} differs across processes: `{name}` on rank {rank} is not rank 0's{more}; "
            "nothing was written"
        )


def shard(n: int, w: World) -> range:
    """This rank's contiguous part of items 0..n-1; the parts of ranks 0..size-1 in order are
    disjoint and cover them (sizes differ by at most one)."""
    return range(n * w.rank // w.size, n * (w.rank + 1) // w.size)


def gather(part: torch.Tensor, n: int, w: World) -> torch.Tensor:
    """The shards (each rank's `part`, rows shard(n, w) of n) put together in order, on every
    rank, on the CPU; `part` itself for one process."""
    if not w.enabled:
        return part
    dev = _device()
    sizes = [len(shard(n, World(r, w.size))) for r in range(w.size)]
    rows = max(sizes)
    pad = torch.zeros((rows, *part.shape[1:]), dtype=part.dtype, device=dev)
    pad[: part.shape[0]] = part.to(dev)
    got = [torch.empty_like(pad) for _ in range(w.size)]
    tdist.all_gather(got, pad)
    return torch.cat([g[:k] for g, k in zip(got, sizes, strict=True)]).cpu()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank `rank` of a run seeded `seed` from step `step` on (its own stream)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """net in DistributedDataParallel (its construction broadcasts rank 0's weights)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(net, device_ids=[torch.cuda.current_device()])
    return DistributedDataParallel(net)


def per_rank_batch(batch_size: int, w: World) -> int:
    """The batch each process trains on: the global `batch_size` split evenly over the
    processes; refused when it does not split."""
    if batch_size < w.size:
        raise ConfigError(
            f"`batch_size` {batch_size} is the global batch, smaller than the {w.size} "
            "processes: give each at least one image (a larger `batch_size`, or fewer processes)"
        )
    if batch_size % w.size:
        raise ConfigError(
            f"`batch_size` {batch_size} is the global batch and must be a multiple of the "
            f"{w.size} processes (each trains on batch_size / world size images)"
        )
    return batch_size // w.size
