"""Generating images from a trained network: conditions + guidance + settings -> uint8 images.

Owns: batching (a batch size chosen for the device, halved while it runs out of memory),
compiling the network for a long job (runtime.compile_sampling says when), or handing its
forward passes to ONNX Runtime (backends.py), per-sample noise
streams (sample i of seed S always starts from the same x_T and sees the same per-step noise,
whatever the batch size), the float -> uint8 conversion, and the per-step callback through which
pictures of the trajectory (animations, the web page's live preview) watch a job. Given the
processes of a torchrun job (`world`), each samples its contiguous share of the images and
every process gets them all back, in order: since every sample has its own noise stream, the
images are the same whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from cfgdiff import dist
from cfgdiff.compiled import CompiledForward
from cfgdiff.config import RunConfig
from cfgdiff.errors import ConfigError, RuntimeFault
from cfgdiff.runtime import autocast, compile_sampling, is_out_of_memory, sampling_batch_size
from cfgdiff.sampling.backends import ORT, check, runtime_network
from cfgdiff.sampling.guidance import Guidance, guided_denoiser
from cfgdiff.sampling.samplers import PerSampleNoise, run_sampler
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.schedule import make_schedule

Log = Callable[[str], None]
# callback(i, t, x_t, x0_hat) after each sampler step (samplers.py), for one batch's images
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def network_device(net) -> torch.device:
    """Where a network's parameters are (the CPU for one without any, such as a test's
    function)."""
    params = getattr(net, "parameters", None)
    try:
        return next(params()).device if callable(params) else torch.device("cpu")
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def generate(
    net: torch.nn.Module,
    cfg: RunConfig,
    cond: torch.Tensor | Sequence[int],
    *,
    settings: SamplingSettings = SamplingSettings(),
    guidance: Guidance = Guidance(),
    indices: Sequence[int] | None = None,
    log: Log | None = None,
    callback: StepCallback | None = None,
    world: dist.World | None = None,
) -> torch.Tensor:
    """Sample len(cond) images; returns uint8 (N, C, H, W) on the CPU.

    cond: the network's condition of each image: (N,) class labels, or for a text model
    (cfg.model.condition "text") an (N, cond_dim) float tensor of caption embeddings
    (conditions.py makes either from what a user asks for).
    settings: how to sample (SamplingSettings; None fields take the model's own, cfg.sampling;
    device "auto" is where the network is; backend "onnxruntime" evaluates the network's
    verified ONNX graph in fp32 instead, the rest unchanged, and "auto" is torch here: a
    sampling job decides it before, sampling.backends.choose). guidance: how to guide (its
    scale may be an (N,) tensor of per-sample scales).
    indices: the noise-stream index of each sample (default 0..N-1); equal indices give equal
    noise, which is how guidance strips hold the noise fixed across scales.
    A batch size left to be chosen that runs out of memory is halved and the job retried,
    said through `log`; a batch size given that does is a RuntimeFault. Images do not depend on
    it. A compile that fails or disagrees with eager is dropped for eager, said through `log`.
    callback: called as callback(i, t, x_t, x0_hat) after every step of every batch, batches in
    order (i counts each batch's steps from 0), with float tensors of that batch's images only
    (padding dropped); a retry at a halved batch size starts again from the first batch. An
    exception it raises stops the job and reaches the caller unchanged (how a caller cancels one).
    world: the processes of a torchrun job (dist.world()) that share the work: each samples
    its part (dist.shard) and all of them return all the images (every process must call; the
    callback sees this process's batches only). None: this process alone.
    """
    if isinstance(cond, torch.Tensor) and cond.is_floating_point():
        cond = cond.float()  # a text model's (N, cond_dim) caption embeddings
    else:
        cond = torch.as_tensor(cond, dtype=torch.long)
    if world is not None and world.enabled:
        n = cond.shape[0]
        part = dist.shard(n, world)
        rows = list(part)
        indices = rows if indices is None else [list(indices)[i] for i in rows]
        if isinstance(guidance.scale, torch.Tensor) and guidance.scale.ndim:
            guidance = dataclasses.replace(guidance, scale=guidance.scale[part.start : part.stop])
        mine = generate(
            net, cfg, cond[part.start : part.stop], settings=settings, guidance=guidance,
            indices=indices, log=log, callback=callback,
        )  # fmt: skip
        return dist.gather(mine, n, world)
    s = settings.resolve(cfg, network_device(net))
    device = torch.device(s.device)
    fixed = s.batch_size is not None
    batch_size = s.batch_size or sampling_batch_size(net, cfg.model, device, s.precision)
    s = s.with_backend(ORT if s.backend == ORT else "torch")  # auto: the job decided before
    if s.backend == ORT:
        check(ORT, device)
        net = runtime_network(net, cfg)  # converted once per network (backends.py)
        compiled = False
        if settings.compile == "on" and log is not None:
            log("torch.compile does not apply to ONNX Runtime: `compile=on` ignored")
    else:
        compiled = compile_sampling(s.compile, device, len(cond), s.steps)
    if compiled:
        net = CompiledForward(net, device)
        s = dataclasses.replace(s, static_batches=True)
    while True:
        try:
            images = _generate(
                net, cfg, cond, batch_size=batch_size, settings=s, guidance=guidance,
                indices=indices, callback=callback,
            )  # fmt: skip
            break
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if fixed or batch_size == 1:
                raise RuntimeFault(
                    f"out of memory sampling {batch_size} images per batch on {device}: "
                    "lower `batch_size` (nothing was written)"
                ) from None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if log is not None:
            log(f"out of memory at {batch_size} images per batch; retrying with {batch_size // 2}")
        batch_size //= 2
    if compiled and net.fallback_reason and log is not None:
        log(f"torch.compile not used, sampled eagerly: {net.fallback_reason}")
    return images


def _generate(
    net, cfg, labels, *, batch_size: int, settings: SamplingSettings, guidance: Guidance,
    indices, callback,
) -> torch.Tensor:  # fmt: skip
    """generate's work at one batch size."""
    n = labels.shape[0]
    m = cfg.model
    if labels.is_floating_point() != (m.condition == "text"):
        raise ConfigError(
            "a text model takes prompts and a class model class labels"
            if m.condition == "text"
            else "a class model takes class labels, not prompts"
        )
    if labels.is_floating_point() and labels.shape[1:] != (m.cond_dim,):
        raise ConfigError(
            f"caption embeddings must have {m.cond_dim} components, got {tuple(labels.shape[1:])}"
        )
    if not labels.is_floating_point() and n and (labels.min() < 0 or labels.max() >= m.num_classes):
        raise ConfigError(
            f"class labels must be in [0, {m.num_classes - 1}], got {labels.tolist()}"
        )
    guidance.validate(m.num_classes)
    s = settings
    device, precision = torch.device(s.device), s.precision
    indices = list(range(n)) if indices is None else list(indices)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    shape = (m.in_channels, m.image_size, m.image_size)

    def in_precision(f):
        def call(x, t, y):
            with autocast(device, precision):
                return f(x, t, y).float()

        return call

    base = dataclasses.replace(
        guidance,
        guide_net=in_precision(guidance.guide_net) if guidance.guide_net is not None else None,
    )
    out = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        rows = list(range(lo, hi))
        if s.static_batches and n > batch_size:
            rows += [hi - 1] * (batch_size - len(rows))
        noise = PerSampleNoise(s.seed, [indices[i] for i in rows])
        x_T = noise.randn(shape, device)
        g = base
        if isinstance(base.scale, torch.Tensor):
            g = dataclasses.replace(base, scale=base.scale[rows])
        denoise = guided_denoiser(
            in_precision(net),
            labels[rows].to(device),
            schedule,
            null_label=m.num_classes,
            prediction=cfg.diffusion.prediction,
            guidance=g,
        )
        step = None
        if callback is not None:

            def step(i, t, x_t, x0_hat, k=hi - lo):
                callback(i, t, x_t[:k], x0_hat[:k])

        x0 = run_sampler(
            s.sampler, denoise, x_T, schedule, s.steps, spacing=s.spacing, generator=noise,
            callback=step, **s.sampler_options(),
        )  # fmt: skip
        if not bool(torch.isfinite(x0).all()):  # to_uint8 would make NaN black, silently
            raise RuntimeFault(
                f"sampling gave NaN or infinite values (images {lo} to {hi - 1}): the network's "
                "output is not finite; nothing was written"
            )
        out.append(to_uint8(x0[: hi - lo]).cpu())
    if not out:
        return torch.empty((0, *shape), dtype=torch.uint8)
    return torch.cat(out)


def class_grid_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: [c0]*k + [c1]*k + ..."""
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
