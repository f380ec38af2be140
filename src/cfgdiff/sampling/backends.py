"""Which implementation evaluates the network while sampling: PyTorch, or ONNX Runtime.

Owns: the choices of `SamplingSettings.backend` (BACKENDS), the ONNX Runtime network of a loaded
network (onnx_net's verified graph in an InferenceSession on the CPU, converted once and kept
with the network for as long as its weights are unchanged, and on disk, named by a hash of the
weights, for the next process), and what `auto` takes for a job
(`choose`): PyTorch on CUDA, without onnxruntime, for a job too short to repay the conversion or
one that torch.compile will run; otherwise whichever of the two is measured faster on a couple
of forward passes of the job's batch shape. Everything else about sampling (the samplers, the
guidance engine, the per-sample noise) is the same for both: only the network's forward pass
changes hands. ONNX Runtime runs fp32 whatever the precision asked for (docs/DESIGN.md,
"Sampling backends").
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass

import torch

from cfgdiff import dist
from cfgdiff.config import RunConfig
from cfgdiff.errors import CfgDiffError, ConfigError
from cfgdiff.runtime import CPU_SAMPLING_BATCH, autocast, compile_sampling, error_line

BACKENDS = ("auto", "torch", "onnxruntime")
ORT = "onnxruntime"
# `auto` measures the backends for jobs of at least this many image-steps (images x sampler
# steps); a shorter job takes torch, since converting the network and measuring it cost seconds
# that the job could not win back (docs/DESIGN.md, "Sampling backends").
AUTO_MIN_IMAGE_STEPS = 10_000
MEASURE_PASSES = 2  # timed forward passes per backend, after one untimed each (the best counts)


@dataclass(frozen=True)
class Choice:
    """The backend a job samples with, and why, in words ("as asked", "auto: ...")."""

    backend: str
    reason: str


def check(backend: str, device: torch.device | str) -> None:
    """Refuse what cannot run: an unknown backend, ONNX Runtime off the CPU or not installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"`backend` must be one of {', '.join(BACKENDS)}, got {backend!r:.40}")
    if backend == ORT:
        if torch.device(device).type != "cpu":
            raise ConfigError(f"`backend={ORT}` runs on the CPU: pass `device=cpu`")
        from cfgdiff.onnx_net import require

        require("onnx", "onnxruntime")


_lock = threading.Lock()
# network -> (the state of its weights when converted, the thread count, its OnnxNetwork)
_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_state(net: torch.nn.Module) -> tuple:
    """What changes when a weight does: each tensor's storage and in-place version counter (an
    EMA update, load_state_dict)."""
    return tuple((v.data_ptr(), v._version) for v in (*net.parameters(), *net.buffers()))


def runtime_network(net: torch.nn.Module, cfg: RunConfig):
    """The ONNX Runtime network of `net` (onnx_net.OnnxNetwork of its verified graph): made on
    first use, then kept with the network while its weights and torch's thread count stay as
    they were (a network whose weights change, as training's EMA does, is made again). The
    graph itself is kept on disk too (_graph_from_cache), so another process sampling the same
    weights does not convert them again. A network ONNX cannot express is a ConfigError
    (onnx_net.convert)."""
    threads = torch.get_num_threads()
    state = _weights_state(net)
    with _lock:
        kept = _sessions.get(net)
        if kept is not None and kept[0] == state and kept[1] == threads:
            return kept[2]
        graph = _graph_from_cache(net, cfg, threads)
        _sessions[net] = (state, threads, graph)
        return graph


GRAPH_CACHE = "onnx"  # under the data directory: graphs named by onnx_net.graph_key
GRAPHS_KEPT = 8  # the newest used are kept; older ones are removed when one is added


def _graph_from_cache(net, cfg: RunConfig, threads: int):
    """The graph of `net` from the data directory's cache (verified against the network like a
    new one, so a damaged or foreign file is only a miss), else converted and added to it. A
    cache that cannot be read or written costs a conversion, never an error."""
    from cfgdiff.data import default_data_dir
    from cfgdiff.files import atomic_write_bytes
    from cfgdiff.onnx_net import OnnxNetwork, convert, graph_key, load_verified

    folder = default_data_dir() / GRAPH_CACHE
    path = folder / f"{graph_key(net, cfg)}.onnx"
    try:
        graph, _, _ = load_verified(path.read_bytes(), net, cfg, threads)
        os.utime(path)  # the newest used
        return graph
    except (OSError, CfgDiffError):
        pass
    converted = convert(net, cfg)  # verified
    graph = OnnxNetwork(converted.model, threads)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, converted.model)
        for old in sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime)[:-GRAPHS_KEPT]:
            old.unlink(missing_ok=True)
    except (OSError, CfgDiffError):
        pass
    return graph


def choose(
    net, cfg: RunConfig, settings, images: int, guided: bool, *, min_image_steps: int | None = None
) -> Choice:
    """The backend of a job of `images` images with resolved `settings` (SamplingSettings), the
    network's batch being a guided pair when `guided`: the one asked for (checked), or auto's
    choice. `min_image_steps`: the job length from which auto measures (default
    AUTO_MIN_IMAGE_STEPS; 0 for a server, whose conversion serves every request)."""
    device = torch.device(settings.device)
    if settings.backend != "auto":
        check(settings.backend, device)
        return Choice(settings.backend, "as asked")
    import importlib.util

    least = AUTO_MIN_IMAGE_STEPS if min_image_steps is None else min_image_steps
    work = images * settings.steps
    if device.type != "cpu":
        return Choice("torch", f"auto: {device.type}, where ONNX Runtime is not used")
    if dist.world().enabled:  # each process would measure, and might choose, on its own
        return Choice("torch", "auto: several processes sample this job")
    if any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime")):
        return Choice("torch", "auto: onnxruntime is not installed (pip install 'cfgdiff[onnx]')")
    if work < least:
        return Choice("torch", f"auto: a short job ({work:,} image-steps; measured from {least:,})")
    if compile_sampling(settings.compile, device, images, settings.steps):
        return Choice("torch", "auto: torch.compile runs this job")
    if not isinstance(net, torch.nn.Module):
        return Choice("torch", "auto: the network is not a torch module")
    rows = min(settings.batch_size or CPU_SAMPLING_BATCH, max(images, 1)) * (2 if guided else 1)
    try:
        graph = runtime_network(net, cfg)
    except ConfigError as e:
        return Choice("torch", f"auto: ONNX Runtime cannot run this network ({e})")
    try:
        t_torch, t_ort = measure(net, graph, cfg, settings.precision, rows)
    except Exception as e:  # out of memory, a failing kernel: torch, the backend that loaded
        return Choice("torch", f"auto: ONNX Runtime was not measured ({error_line(e)})")
    pick = ORT if t_ort < t_torch else "torch"
    fast, slow = sorted((t_ort, t_torch))
    return Choice(
        pick,
        f"auto: {slow / max(fast, 1e-9):.2f}x as fast as {'torch' if pick == ORT else ORT} "
        f"here on a batch of {rows} ({t_ort * 1e3:.0f} ms ONNX Runtime fp32, "
        f"{t_torch * 1e3:.0f} ms torch {settings.precision})",
    )


def measure(net, graph, cfg: RunConfig, precision: str, rows: int) -> tuple[float, float]:
    """Seconds of one forward pass of `rows` rows through torch (in `precision`) and through
    `graph` (ONNX Runtime): the best of MEASURE_PASSES after one untimed pass each, the two
    interleaved so that a change in the machine's load falls on both."""
    from cfgdiff.onnx_net import example_inputs

    x, t, c = example_inputs(cfg, rows)
    device = torch.device("cpu")

    def torch_pass():
        with autocast(device, precision):
            net(x, t, c)

    best = {"torch": float("inf"), ORT: float("inf")}
    with torch.inference_mode():
        for i in range(MEASURE_PASSES + 1):
            for name, f in (("torch", torch_pass), (ORT, lambda: graph(x, t, c))):
                t0 = time.perf_counter()
                f()
                if i:
                    best[name] = min(best[name], time.perf_counter() - t0)
    return best["torch"], best[ORT]
