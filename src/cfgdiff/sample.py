"""Generating images from a trained network: labels + guidance + sampler -> uint8 images.

Owns: batching (a batch size chosen for the device, halved while it runs out of memory),
compiling the network for a long job (runtime.compile_sampling says when), per-sample noise
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
from cfgdiff.guidance import Guidance, guided_denoiser
from cfgdiff.runtime import autocast, compile_sampling, is_out_of_memory, sampling_batch_size
from cfgdiff.samplers import PerSampleNoise, check_sampler, run_sampler
from cfgdiff.schedule import make_schedule

Log = Callable[[str], None]
# callback(i, t, x_t, x0_hat) after each sampler step (samplers.py), for one batch's images
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def check_steps(steps: int, cfg: RunConfig) -> None:
    """Sampler steps must be in [1, T] for the checkpoint's T."""
    if steps < 1 or steps > cfg.diffusion.timesteps:
        raise ConfigError(f"`steps` must be in [1, {cfg.diffusion.timesteps}], got {steps}")


@torch.inference_mode()
def generate(
    net: torch.nn.Module,
    cfg: RunConfig,
    labels: torch.Tensor | Sequence[int],
    *,
    scale: float | torch.Tensor = 1.0,
    guidance: Guidance | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "trailing",
    seed: int = 0,
    batch_size: int | None = 256,
    indices: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    static_batches: bool = False,
    compile: str = "off",
    log: Log | None = None,
    callback: StepCallback | None = None,
    world: dist.World | None = None,
) -> torch.Tensor:
    """Sample len(labels) images; returns uint8 (N, C, H, W) on the CPU.

    labels: (N,) class labels, or for a text model (cfg.model.condition "text") an (N, cond_dim)
    float tensor of caption embeddings (text.TextConditions.embed gives them).

    scale: guidance scale s (float, or (N,) tensor of per-sample scales); or pass a full
    `guidance` (its scale may also be an (N,) tensor); not both.
    indices: the noise-stream index of each sample (default 0..N-1); equal indices give equal
    noise, which is how guidance strips hold the noise fixed across scales.
    batch_size: images per forward pass; None chooses it for the device (runtime.
    sampling_batch_size) and halves it while it runs out of memory, saying so through `log`.
    A batch size given that runs out of memory is a RuntimeFault. Images do not depend on it.
    compile: "auto" | "on" | "off": the network through torch.compile (runtime.compile_sampling
    says when auto is on), with every batch padded to one shape; a compile that fails or
    disagrees with eager is dropped for eager, said through `log`.
    static_batches: pad a short last batch to `batch_size` (repeating its last sample, then
    dropping the copies) so every forward pass has the same shape, as compiled networks and CUDA
    graphs want; the images are the same either way.
    callback: called as callback(i, t, x_t, x0_hat) after every step of every batch, batches in
    order (i counts each batch's steps from 0), with float tensors of that batch's images only
    (padding dropped); a retry at a halved batch size starts again from the first batch. An
    exception it raises stops the job and reaches the caller unchanged (how a caller cancels one).
    world: the processes of a torchrun job (dist.world()) that share the work: each samples
    its part (dist.shard) and all of them return all the images (every process must call; the
    callback sees this process's batches only). None: this process alone.
    """
    if isinstance(labels, torch.Tensor) and labels.is_floating_point():
        labels = labels.float()  # a text model's (N, cond_dim) caption embeddings
    else:
        labels = torch.as_tensor(labels, dtype=torch.long)
    if world is not None and world.enabled:
        n = labels.shape[0]
        part = dist.shard(n, world)
        rows = list(part)
        indices = rows if indices is None else [list(indices)[i] for i in rows]
        if isinstance(scale, torch.Tensor) and scale.ndim:
            scale = scale[part.start : part.stop]
        if guidance is not None and isinstance(guidance.scale, torch.Tensor):
            if guidance.scale.ndim:
                sliced = guidance.scale[part.start : part.stop]
                guidance = dataclasses.replace(guidance, scale=sliced)
        mine = generate(
            net, cfg, labels[part.start : part.stop], scale=scale, guidance=guidance,
            sampler=sampler, steps=steps, eta=eta, spacing=spacing, seed=seed,
            batch_size=batch_size, indices=indices, device=device, precision=precision,
            static_batches=static_batches, compile=compile, log=log, callback=callback,
        )  # fmt: skip
        return dist.gather(mine, n, world)
    device = torch.device(device)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"`batch_size` must be >= 1, got {batch_size}")
    check_steps(steps, cfg)
    check_sampler(sampler)
    compiled = compile_sampling(compile, device, len(labels), steps)
    fixed = batch_size is not None
    if batch_size is None:
        batch_size = sampling_batch_size(net, cfg.model, device, precision)
    if compiled:
        net = CompiledForward(net, device)
    options = dict(
        scale=scale, guidance=guidance, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
        seed=seed, indices=indices, device=device, precision=precision,
        static_batches=static_batches or compiled, callback=callback,
    )  # fmt: skip
    while True:
        try:
            images = _generate(net, cfg, labels, batch_size=batch_size, **options)
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
    net, cfg, labels, *, batch_size, scale, guidance, sampler, steps, eta, spacing, seed, indices,
    device, precision, static_batches, callback,
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
    if guidance is None:
        guidance = Guidance(scale=scale)
    guidance.validate(m.num_classes)
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
        if static_batches and n > batch_size:
            rows += [hi - 1] * (batch_size - len(rows))
        noise = PerSampleNoise(seed, [indices[i] for i in rows])
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
            sampler, denoise, x_T, schedule, steps, eta=eta, spacing=spacing, generator=noise,
            callback=step,
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
