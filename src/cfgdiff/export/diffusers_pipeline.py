"""A cfgdiff class model as Hugging Face diffusers components: what the folder written by
`cfgdiff export --format diffusers` loads into (docs/export.md).

    from cfgdiff.export.diffusers_pipeline import CfgdiffPipeline
    pipe = CfgdiffPipeline.from_pretrained("mnist-diffusers")
    images = pipe(["7", "7", "3"], guidance_scale=3.0).images   # PIL images

Owns two classes, both importable with only cfgdiff and diffusers installed:
- `CfgdiffUNet`, a diffusers model (ModelMixin + ConfigMixin) whose config.json holds the run's
  config and whose forward is cfgdiff's UNet, called the way diffusers calls a class-conditional
  UNet: `unet(sample, timestep, class_labels).sample`. diffusers' own UNet2DModel is not the
  same network (its residual blocks, attention, label embedding and up path differ), so the
  weights are cfgdiff's, under `net.`, unchanged.
- `CfgdiffPipeline(unet, scheduler)`, a DiffusionPipeline that samples with any diffusers
  scheduler and guides as cfgdiff does (config.GUIDANCE_CONVENTION): eps_hat = eps_null +
  s (eps_cond - eps_null), s = 1 conditional, s = 0 unconditional, one batched forward pass
  over [cond; null] rows, the null label being index num_classes; only the conditional half at
  s = 1 and only the null half at s = 0 (sampling/guidance.py). x0_hat is clamped to [-1, 1]
  by the scheduler's config (thresholding with sample_max_value 1), cfgdiff's default static
  threshold, and a DDIM step re-derives eps from the clamped x0_hat as cfgdiff's does.

Knows nothing of checkpoints, files or the command line; export/diffusers.py writes the folder.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from cfgdiff.config import RunConfig
from cfgdiff.errors import ConfigError
from cfgdiff.schedule import make_schedule, spaced_timesteps
from cfgdiff.unet import UNet

# What __call__ returns, as diffusers pipelines name it.
OUTPUT_TYPES = ("pil", "np", "pt")
# Scheduler options that choose timesteps by noise level instead of by spacing.
_OTHER_SIGMAS = (
    "use_karras_sigmas",
    "use_lu_lambdas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_flow_sigmas",
)


@dataclass
class CfgdiffUNetOutput(BaseOutput):
    """The network's output (eps or v, as the run's diffusion.prediction says), (B, C, H, W)."""

    sample: torch.Tensor


class CfgdiffUNet(ModelMixin, ConfigMixin):
    """cfgdiff's UNet of a class model, built from `run_config` (RunConfig.to_dict(): the
    checkpoint's config.json, kept whole so that what a run was is not lost on the way)."""

    @register_to_config
    def __init__(self, run_config: dict[str, Any]):
        super().__init__()
        cfg = RunConfig.from_dict(run_config)
        cfg.validate()
        if cfg.model.condition != "class":
            raise ConfigError(
                f"`run_config`: a {cfg.model.condition} model; CfgdiffUNet holds class models"
            )
        self.cfg = cfg
        self.net = UNet(cfg.model)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CfgdiffUNetOutput | tuple[torch.Tensor]:
        """sample: (B, C, H, W) x_t; timestep: one t in [0, T-1] for the batch, or (B,) of them
        (cfgdiff's t, which diffusers' schedulers use too: t = 0 is the least noisy step);
        class_labels: (B,) in [0, num_classes], num_classes (or None) the null label."""
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.ndim == 0 else t.reshape(b)
        if class_labels is None:
            class_labels = torch.full((b,), self.cfg.model.num_classes, device=sample.device)
        # half weights (loaded with dtype=torch.float16 or bfloat16) compute under autocast,
        # as cfgdiff samples in bf16: the timestep embedding is made in fp32
        half = self.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(sample.device.type, dtype=self.dtype, enabled=half):
            out = self.net(sample, t, class_labels.to(sample.device).long())
        return CfgdiffUNetOutput(sample=out) if return_dict else (out,)


class CfgdiffPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance in cfgdiff's convention, with
    any diffusers scheduler (the folder's is the counterpart of the model's own sampler:
    DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler; another one from
    `SCHEDULER.from_config(pipe.scheduler.config)`). The progress bar is off unless asked for
    (`pipe.set_progress_bar_config(disable=False)`)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: CfgdiffUNet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.set_progress_bar_config(disable=True)

    def label_ids(self, class_labels: int | str | Sequence[int | str]) -> list[int]:
        """Class indices of labels given as indices (a list, tensor or array) or as the class
        names the model records (`pipe.unet.cfg.label_names()`)."""
        if isinstance(class_labels, torch.Tensor | np.ndarray):
            class_labels = class_labels.tolist()
        labels = [class_labels] if isinstance(class_labels, int | str) else list(class_labels)
        names, k = self.unet.cfg.label_names(), self.unet.cfg.model.num_classes
        out = []
        for c in labels:
            if isinstance(c, str) and c in names:
                out.append(names.index(c))
            elif isinstance(c, int | np.integer) and not isinstance(c, bool) and 0 <= c < k:
                out.append(int(c))
            else:
                shown = ", ".join(names[:20]) + (", ..." if k > 20 else "")
                raise ConfigError(
                    f"`class_labels` must be indices in [0, {k - 1}] or class names ({shown}), "
                    f"got {c!r:.40}"
                )
        if not out:
            raise ConfigError("`class_labels` is empty: name at least one class")
        return out

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str],
        guidance_scale: float = 3.0,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """One image per label.

        class_labels: class indices or names. guidance_scale: s in cfgdiff's convention (1:
        conditional, 0: unconditional; the paper's w is s - 1). num_inference_steps: None is
        the model's own (its preset's sampling.steps). generator: for the initial noise and any
        noise the scheduler adds. latents: (B, C, H, W) x_T to start from instead of drawing
        it. eta: DDIM's noise, for schedulers whose step takes it. output_type: "pil" (uint8
        images), "np" (float (B, H, W, C) in [0, 1]) or "pt" (float (B, C, H, W) in [0, 1])."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(
                f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r:.40}"
            )
        s = float(guidance_scale)
        if not math.isfinite(s):
            raise ConfigError(f"`guidance_scale` must be a finite number, got {guidance_scale}")
        cfg = self.unet.cfg
        m = cfg.model
        steps = cfg.sampling.steps if num_inference_steps is None else num_inference_steps
        T = cfg.diffusion.timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ConfigError(
                f"`num_inference_steps` must be an integer in [1, {T}], got {steps!r}"
            )
        device = self._execution_device
        y = torch.tensor(self.label_ids(class_labels), device=device)
        shape = (len(y), m.in_channels, m.image_size, m.image_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        # the sampler's state in fp32 whatever the network's dtype, as in cfgdiff
        x = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma

        # [cond; null] rows, or one half where the other has weight 0 (sampling/guidance.py)
        null = torch.full_like(y, m.num_classes)
        rows = y if s == 1 else null if s == 0 else torch.cat([y, null])
        self._set_timesteps(steps, device)
        step_kwargs = self._step_kwargs(eta, generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = x if len(rows) == len(y) else torch.cat([x, x])
            x_in = self.scheduler.scale_model_input(x_in, t)
            pred = self.unet(x_in, t, rows).sample.float()
            if len(rows) > len(y):
                cond, ref = pred.chunk(2)
                pred = ref + s * (cond - ref)
            x = self.scheduler.step(pred, t, x, **step_kwargs).prev_sample

        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out: Any = images.cpu()
        else:
            out = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    def _set_timesteps(self, steps: int, device) -> None:
        """The scheduler's timesteps; "trailing" ones as cfgdiff computes them (exactly, in
        integers) where its set_timesteps takes a list (DDPM, DPM-Solver): numpy's float
        arange rounds some ties the other way and, for some step counts, adds a step at
        t = -1 (docs/export.md, "Timesteps"). DDIM takes only a count."""
        sch = self.scheduler
        takes = inspect.signature(sch.set_timesteps).parameters
        d = self.unet.cfg.diffusion
        if (
            sch.config.get("timestep_spacing") == "trailing"
            and sch.config.get("num_train_timesteps") == d.timesteps
            and "timesteps" in takes
            and not any(sch.config.get(k) for k in _OTHER_SIGMAS)
        ):
            schedule = make_schedule(d.schedule, d.timesteps)
            sch.set_timesteps(
                timesteps=spaced_timesteps(schedule, steps, "trailing"), device=device
            )
        else:
            sch.set_timesteps(steps, device=device)

    def _step_kwargs(self, eta: float, generator) -> dict[str, Any]:
        """What this scheduler's step takes of: eta and a generator (DDIM, DDPM), and DDIM's
        use_clipped_model_output, which makes its step use the eps of the clamped x0_hat, as
        cfgdiff's samplers do."""
        takes = set(inspect.signature(self.scheduler.step).parameters)
        if eta and "eta" not in takes:
            raise ConfigError(
                f"`eta` {eta} is for schedulers whose step adds noise by it (DDIMScheduler); "
                f"{type(self.scheduler).__name__} does not"
            )
        given = {"eta": eta, "generator": generator, "use_clipped_model_output": True}
        return {k: v for k, v in given.items() if k in takes}
