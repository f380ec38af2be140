"""The settings a sampling job runs with: `SamplingSettings`.

Owns: every setting of how images are sampled, apart from guidance (which is `Guidance`'s) and
what they are conditioned on (conditions.py): the sampler and its options, the seed, the batch
size, the device, the precision, compilation and the backend that runs the network, each with
its default and its range stated once, here. The CLI's flags (cli.options.sampling_flags), the
page's request fields (serve.jobs) and the `cfgdiff sample` command the page shows are derived
from these fields.

A field left None takes the model's own default: the sampler its preset judges it with
(config.SamplingConfig, recorded in every checkpoint), so `cfgdiff eval` with no `--sampler`
reports the figures the model's preset was measured with. `resolve` fills those in and checks
everything against the model; `record` is what output files say about it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from cfgdiff.config import RunConfig, bounded, check_ranges
from cfgdiff.errors import ConfigError
from cfgdiff.runtime import COMPILE_CHOICES, DEVICES, PRECISIONS, resolve_device, resolve_precision
from cfgdiff.sampling.backends import BACKENDS, ORT
from cfgdiff.sampling.samplers import SAMPLERS
from cfgdiff.schedule import SPACINGS

# A seed a JavaScript number holds exactly, so the page and the CLI take the same seeds.
MAX_SEED = 2**53 - 1
MAX_SAMPLER_STEPS = 100_000  # and at most the model's T


def flag(name: str) -> str:
    """The command-line flag of a field: --batch-size for batch_size (cli.options declares the
    flags from the fields; the page writes its `cfgdiff sample` commands with them)."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample (a frozen value: make another with dataclasses.replace). None in the first
    four fields: the model's own (cfg.sampling); `resolve` fills them in."""

    sampler: str | None = field(default=None, metadata={"choices": SAMPLERS})
    steps: int | None = bounded(None, 1, MAX_SAMPLER_STEPS)  # at most the model's T
    spacing: str | None = field(default=None, metadata={"choices": SPACINGS})
    eta: float | None = bounded(None, 0.0, 10.0)  # DDIM's noise (0: deterministic)
    # sample i of a seed starts from the same noise, and sees the same noise at every step,
    # whatever the batch, the number of processes or the device (samplers.PerSampleNoise)
    seed: int = bounded(0, 0, MAX_SEED)
    # images per forward pass; None: chosen for the device and halved while it runs out of
    # memory (runtime.sampling_batch_size). Images do not depend on it.
    batch_size: int | None = bounded(None, 1, 65536)
    # "auto": where the network is (generate), or CUDA when there is one (loading a model)
    device: str = field(default="auto", metadata={"choices": DEVICES})
    # "auto": bf16 on CUDA and on CPUs with native bf16, else fp32 (runtime.resolve_precision)
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    # torch.compile the network: "auto" where the job is long enough to pay for it
    # (runtime.compile_sampling); a compile that fails or disagrees with eager falls back
    compile: str = field(default="auto", metadata={"choices": COMPILE_CHOICES})
    # what evaluates the network: PyTorch, or ONNX Runtime (CPU, fp32; the `onnx` extra); "auto"
    # measures both on the job's batch where the job is long enough (sampling/backends.py)
    backend: str = field(default="auto", metadata={"choices": BACKENDS})
    # pad a short last batch to `batch_size` so every forward pass has one shape (compiled
    # networks and CUDA graphs want that; compiling turns it on); the images are the same
    static_batches: bool = field(default=False, metadata={"flag": False})

    # the fields a model's config records its own default of (config.SamplingConfig)
    MODEL_FIELDS = ("sampler", "steps", "spacing", "eta")

    def validate(self) -> None:
        """Every field in its range and among its choices (None: decided elsewhere)."""
        check_ranges(self)
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            v = getattr(self, f.name)
            if allowed is not None and v is not None and v not in allowed:
                raise ConfigError(f"`{f.name}` must be one of {', '.join(allowed)}, got {v!r}")

    def resolve(self, cfg: RunConfig, device: torch.device | str | None = None) -> SamplingSettings:
        """Concrete settings for a model of `cfg`: the model's own sampler, steps, spacing and
        eta where these are None, the device (`device`: where the network is, for "auto") and
        the precision resolved (fp32 for ONNX Runtime, which runs nothing else), everything
        checked (steps at most the model's T; ONNX Runtime on the CPU). A backend left "auto"
        is decided per job (backends.choose)."""
        self.validate()
        own = {k: getattr(cfg.sampling, k) for k in self.MODEL_FIELDS if getattr(self, k) is None}
        if self.device == "auto" and device is not None:
            where = torch.device(device)
        else:
            where = resolve_device(self.device)
        if self.backend == ORT and where.type != "cpu":
            raise ConfigError(f"`backend={ORT}` runs on the CPU: pass `device=cpu`")
        s = dataclasses.replace(
            self,
            **own,
            device=str(where),
            precision="fp32" if self.backend == ORT else resolve_precision(self.precision, where),
        )
        if s.steps > cfg.diffusion.timesteps:
            raise ConfigError(f"`steps` must be in [1, {cfg.diffusion.timesteps}], got {s.steps}")
        return s

    def from_model(self) -> tuple[str, ...]:
        """The fields that will take the model's own default."""
        return tuple(k for k in self.MODEL_FIELDS if getattr(self, k) is None)

    def with_backend(self, backend: str) -> SamplingSettings:
        """These resolved settings sampling with `backend` (a backends.choose decision): fp32
        for ONNX Runtime."""
        precision = "fp32" if backend == ORT else self.precision
        return dataclasses.replace(self, backend=backend, precision=precision)

    def describe(self) -> str:
        """ "ddpm 20 steps" (resolved settings)."""
        eta = f", eta {self.eta:g}" if "eta" in SAMPLERS[self.sampler].options and self.eta else ""
        return f"{self.sampler} {self.steps} steps{eta}"

    def record(self) -> dict:
        """What output files say about resolved settings (settings.json, .npz, --json)."""
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "spacing": self.spacing,
            "eta": self.eta,
            "seed": self.seed,
            "backend": self.backend,
            "precision": self.precision,
        }

    def sampler_options(self) -> dict[str, Any]:
        """The options this sampler takes beyond the common signature (SamplerEntry.options),
        by their field names here."""
        return {k: getattr(self, k) for k in SAMPLERS[self.sampler].options}
