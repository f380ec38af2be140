"""Typed, frozen configuration and named presets.

Owns: every tunable number of a run (network shape, diffusion process, optimisation, sampling
previews), the choices of its string fields, its validation and its JSON form. The named presets
and how a run's config is made from one are presets.py's. Knows nothing about tensors, files or
the CLI: a config is plain data that round-trips through JSON (it is stored in every
checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cfgdiff.errors import ConfigError
from cfgdiff.samplers import SAMPLERS
from cfgdiff.schedule import SCHEDULES

MAX_STEPS = 10_000_000  # the most optimizer steps a run may ask for (a time budget caps at it)

# The choices of the string fields, each said once here and read by validation and the CLI.
PREDICTIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("none", "min-snr")
T_SAMPLINGS = ("uniform", "logit-normal")
LR_SCHEDULES = ("constant", "cosine")
# The settings of logit-normal training timesteps, which uniform ones ignore.
LOGIT_NORMAL_FIELDS = ("t_mean", "t_std", "t_uniform")

FORMAT_VERSION = 1  # bump when checkpoint layout or config meaning changes

# The guidance convention used everywhere in the library (docs/guidance.md), as every output
# file and checkpoint names it:
#   eps_hat = eps_u + s * (eps_c - eps_u);  s = 1 conditional, s = 0 unconditional, w = s - 1.
GUIDANCE_CONVENTION = "scale: eps_u + s*(eps_c - eps_u); s=1 conditional, s=0 unconditional; w=s-1"


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The network f(x_t, t, y). Data-dependent fields are filled from the dataset."""

    in_channels: int = 1  # image channels, 1 or 3
    image_size: int = 28  # square side in pixels; must be divisible by 2**(len(channel_mult)-1)
    num_classes: int = 10  # real classes; the null label is index num_classes
    base_channels: int = 64  # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # per resolution level, full resolution first
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attn_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) with self-attention
    num_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout inside residual blocks, in [0, 1)

    def validate(self) -> None:
        if self.in_channels not in (1, 3):
            raise ConfigError(f"`in_channels` must be 1 or 3, got {self.in_channels}")
        if self.num_classes < 1:
            raise ConfigError(f"`num_classes` must be >= 1, got {self.num_classes}")
        if self.base_channels < 8 or self.base_channels % 8:
            raise ConfigError(
                f"`base_channels` must be a positive multiple of 8, got {self.base_channels}"
            )
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ConfigError(f"`channel_mult` must be positive integers, got {self.channel_mult}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 8 or self.image_size % down:
            lo = max(8, self.image_size // down * down)
            near = sorted({lo, lo + down} - {self.image_size})
            raise ConfigError(
                f"`image_size` must be >= 8 and divisible by {down} for {len(self.channel_mult)} "
                f"levels, got {self.image_size} (pass `image_size` "
                f"{' or '.join(map(str, near))} to resize the data)"
            )
        if any(not 0 <= lvl < len(self.channel_mult) for lvl in self.attn_levels):
            raise ConfigError(
                f"`attn_levels` must be in [0, {len(self.channel_mult) - 1}], "
                f"got {self.attn_levels}"
            )
        if self.num_res_blocks < 1:
            raise ConfigError(f"`num_res_blocks` must be >= 1, got {self.num_res_blocks}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"`dropout` must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective."""

    timesteps: int = 1000  # T, number of discrete diffusion steps
    schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal)
    prediction: str = "eps"  # network target: "eps" or "v" (Salimans & Ho 2022)
    label_dropout: float = 0.1  # probability a training label is replaced by the null label
    loss_weighting: str = "none"  # "none" (plain MSE on the target) or "min-snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting
    # Training timesteps: "uniform" t ~ U{0..T-1} (DDPM), or "logit-normal": t/T = sigmoid(n),
    # n ~ N(t_mean, t_std) (Esser et al. 2024, Sec. 3.1), denser in the middle of the process;
    # with t_uniform > 0, that fraction of the draws is uniform instead (a mixture, which keeps
    # every part of the process trained).
    t_sampling: str = "uniform"
    t_mean: float = 0.0
    t_std: float = 1.0
    t_uniform: float = 0.0

    def validate(self) -> None:
        if not 2 <= self.timesteps <= 100_000:
            raise ConfigError(f"`timesteps` must be in [2, 100000], got {self.timesteps}")
        _check_choice("schedule", self.schedule, tuple(SCHEDULES))
        _check_choice("prediction", self.prediction, PREDICTIONS)
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"`label_dropout` must be in [0, 1), got {self.label_dropout}")
        _check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"`min_snr_gamma` must be > 0, got {self.min_snr_gamma}")
        _check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        if not (math.isfinite(self.t_mean) and math.isfinite(self.t_std) and self.t_std > 0):
            raise ConfigError(
                f"`t_mean` must be finite and `t_std` finite and > 0, got {self.t_mean}, "
                f"{self.t_std}"
            )
        if not 0 <= self.t_uniform < 1:
            raise ConfigError(f"`t_uniform` must be in [0, 1), got {self.t_uniform}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and preview settings of one training run."""

    steps: int = 10_000  # optimizer steps
    batch_size: int = 128  # images per step
    lr: float = 2e-4  # peak AdamW learning rate
    lr_schedule: str = (
        "constant"  # after warmup: "constant" or "cosine" (decays to lr_min_ratio*lr)
    )
    lr_min_ratio: float = 0.0  # floor of the cosine decay as a fraction of lr
    warmup_steps: int = 200  # linear warmup from 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA decay per step (with warmup (1+n)/(10+n)); 0 disables EMA
    seed: int = 0
    log_every: int = 50  # steps between loss.csv rows
    sample_every: int = 1000  # steps between preview grids; 0 disables
    checkpoint_every: int = 1000  # steps between checkpoints; 0 = only at the end
    keep: int = 3  # checkpoints kept on disk (the newest); >= 1
    skip_nonfinite: int = 0  # batches with a non-finite loss/gradient that may be skipped; 0 stops
    eval_every: int = 0  # steps between small-N evaluations into eval.csv; 0 disables
    eval_n: int = 500  # samples of each evaluation during training
    preview_scale: float = 3.0  # guidance scale s of preview grids
    preview_sampler: str = "dpmpp-2m"  # sampler of preview grids and the guidance strip
    preview_steps: int = 20  # sampler steps of preview grids
    preview_per_class: int = 8  # samples per class in preview grids
    # random horizontal flips of training images (DDPM's CIFAR-10 recipe); None: the dataset's
    # default (on for cifar10, off for digits, clothes and folders), resolved when a run starts
    hflip: bool | None = None

    def validate(self) -> None:
        checks = [
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", 0 < self.lr < 1, "in (0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("sample_every", self.sample_every >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("keep", self.keep >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0"),
            ("skip_nonfinite", self.skip_nonfinite >= 0, ">= 0"),
            ("eval_n", self.eval_n >= 10, ">= 10"),
            ("preview_steps", self.preview_steps >= 1, ">= 1"),
            ("preview_per_class", self.preview_per_class >= 1, ">= 1"),
            ("lr_min_ratio", 0 <= self.lr_min_ratio <= 1, "in [0, 1]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"`{name}` must be {allowed}, got {getattr(self, name)}")
        _check_choice("preview_sampler", self.preview_sampler, tuple(SAMPLERS))
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a run: stored as config.json in each checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dataset: str = "mnist"  # mnist | fashion-mnist | cifar10 | folder:PATH
    preset: str = "custom"
    # Name of each label 0..num_classes-1 (a folder's sub-folder names, "T-shirt/top", ...), filled
    # from the dataset when a run starts; empty in checkpoints written before it was recorded.
    class_names: tuple[str, ...] = ()

    def validate(self) -> None:
        self.model.validate()
        self.diffusion.validate()
        self.train.validate()
        if self.class_names and len(self.class_names) != self.model.num_classes:
            raise ConfigError(
                f"`class_names` has {len(self.class_names)} names for "
                f"{self.model.num_classes} classes"
            )

    def label_names(self) -> list[str]:
        """The name of each class, or its index where no names were recorded."""
        return list(self.class_names) or [str(c) for c in range(self.model.num_classes)]

    def class_indices(self, tokens: list[str]) -> list[int]:
        """Each token a class name of this config ("Sneaker", a folder's sub-folder name) or,
        failing that, a class index in [0, num_classes)."""
        names, k = self.label_names(), self.model.num_classes
        out, bad = [], []
        for tok in tokens:
            if tok in names:
                out.append(names.index(tok))
            elif tok.lstrip("-").isdigit() and 0 <= int(tok) < k:
                out.append(int(tok))
            else:
                bad.append(tok)
        if bad and not self.class_names:
            raise ConfigError(
                f"`classes` must be indices in [0, {k - 1}] for this checkpoint (it records no "
                f"class names), got {bad}"
            )
        if bad:
            shown = ", ".join(names[:20]) + (", ..." if k > 20 else "")
            raise ConfigError(
                f"`classes` must be class names ({shown}) or indices in [0, {k - 1}] for this "
                f"checkpoint, got {bad}"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        d["guidance"] = {"convention": GUIDANCE_CONVENTION, "null_label": self.model.num_classes}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"config format_version must be {FORMAT_VERSION}, got {version}")
        try:
            return cls(
                model=_build(ModelConfig, d["model"]),
                diffusion=_build(DiffusionConfig, d["diffusion"]),
                # written before hflip existed: those runs trained without flips
                train=_build(TrainConfig, {"hflip": False, **d["train"]}),
                dataset=str(d["dataset"]),
                preset=str(d.get("preset", "custom")),
                class_names=tuple(str(c) for c in d.get("class_names", ())),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config is missing or has a malformed field: {e}") from None


def _build(cls: type, d: dict[str, Any]) -> Any:
    """Build a frozen dataclass from JSON, turning lists back into tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


def replace_fields(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """`cfg` with {"section.field": value} changes ("train.lr", "diffusion.t_mean")."""
    sections: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        section, _, name = path.partition(".")
        sub = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(sub) or name not in {
            f.name for f in dataclasses.fields(sub)
        }:
            raise ConfigError(f"no config field {path!r}")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    )
