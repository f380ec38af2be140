"""Typed, frozen configuration.

Owns: every tunable number of a run (network shape, diffusion process, optimisation, sampling
previews, the sampler its evaluations use), the choices of its string fields, the range of each
number (declared once on its field, `bounded`, and read by validation, the CLI's flags and the
page's request parser), its validation and its JSON form. The named presets and how a run's
config is made from one are presets.py's. Knows nothing about tensors, files or the CLI: a
config is plain data that round-trips through JSON (it is stored in every checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cfgdiff.errors import ConfigError
from cfgdiff.sampling.samplers import SAMPLERS
from cfgdiff.schedule import SCHEDULES, SPACINGS

MAX_STEPS = 10_000_000  # the most optimizer steps a run may ask for (a time budget caps at it)
# Bounds on what a config may ask for, so that a config.json from anywhere cannot make loading it
# allocate without limit or loop for hours; each is far above any preset (docs/reliability.md).
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 1024
MAX_BASE_CHANNELS = 1024
MAX_LEVELS = 8
MAX_CHANNEL_MULT = 16
MAX_RES_BLOCKS = 16
MAX_HEADS = 64
MAX_PREVIEW_PER_CLASS = 64
MAX_SEED = 2**32 - 1
MAX_TEXT_DIM = 4096  # the largest sentence-embedding dimension a text model may take
MAX_TEXT_TOKENS = 64  # the most token embeddings a cross-attention text model reads
MAX_NAME_CHARS = 4096  # a class name, a dataset name or path, a preset name

# The choices of the string fields, each said once here and read by validation and the CLI.
PREDICTIONS = ("eps", "v")
CONDITIONS = ("class", "text")  # what the network is conditioned on (ModelConfig.condition)
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


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """The values a number may take: [lo, hi], either end open, hi None for no upper bound.
    Declared once on a field (`bounded`) and read by the field's validation (check_ranges),
    its CLI flag (cli.options) and the page's request parser (serve.jobs)."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        """As messages say it: "in [0, 1)", ">= 1"."""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_number(self.lo)}"
        lb, rb = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {lb}{_number(self.lo)}, {_number(self.hi)}{rb}"


def bounded(default: Any, lo: float, hi: float | None = None, **ends: bool) -> Any:
    """A dataclass field with its Range (`ends`: lo_open, hi_open)."""
    return field(default=default, metadata={"range": Range(lo, hi, **ends)})


def range_of(cls: type, name: str) -> Range | None:
    """The Range declared on field `name` of dataclass `cls`, None where it has none."""
    return next(f.metadata.get("range") for f in dataclasses.fields(cls) if f.name == name)


def check_ranges(obj: Any) -> None:
    """A ConfigError naming the first field of `obj` outside its declared Range (None values,
    meaning a default chosen elsewhere, are not checked)."""
    for f in dataclasses.fields(obj):
        r, v = f.metadata.get("range"), getattr(obj, f.name)
        if r is not None and v is not None and v not in r:
            raise ConfigError(f"`{f.name}` must be {r}, got {_number(v)}")


@dataclass(frozen=True)
class ModelConfig:
    """The network f(x_t, t, y). Data-dependent fields are filled from the dataset."""

    in_channels: int = 1  # image channels, 1 or 3
    image_size: int = 28  # square side in pixels; divisible by patch_size * 2**(levels - 1)
    num_classes: int = 10  # real classes; the null label is index num_classes
    base_channels: int = 64  # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 2)  # per resolution level, full resolution first
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attn_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) with self-attention
    num_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout inside residual blocks, in [0, 1)
    # side of the square patches the network works on: 1 works on pixels; 2 folds each 2x2
    # patch into channels on the way in (pixel unshuffle) and back on the way out, so the first
    # level runs at half the resolution (patch size 2 in DiT, U-ViT)
    patch_size: int = 1
    # what the network is conditioned on: "class" (a label index; the null label is index
    # num_classes) or "text" (a caption's sentence embedding of text_dim components, added to the
    # timestep embedding through an MLP, i.e. FiLM in every residual block; the null condition
    # is a learned vector, asked for by an all-zero embedding)
    condition: str = "class"
    text_encoder: str = ""  # text: the encoder's name (text_encoder.ENCODERS); "" for class
    text_encoder_sha256: str = ""  # text: the SHA-256 of its weights, compared on loading
    text_dim: int = 0  # text: the embedding's dimension; 0 for class
    # text: 0 conditions on the caption's one pooled embedding (FiLM only); N > 0 on its first N
    # token embeddings laid end to end (N * text_dim numbers, zero rows padding a shorter
    # caption), which every attention level's blocks also read by cross-attention, the pooled
    # embedding still going through FiLM (docs/text.md, "Cross-attention against FiLM alone")
    text_tokens: int = 0

    @property
    def cond_dim(self) -> int:
        """The length of a text model's condition vector: text_dim, or text_tokens of them."""
        return self.text_dim * max(1, self.text_tokens)

    def validate(self) -> None:
        if self.condition not in CONDITIONS:
            raise ConfigError(
                f"`condition` must be {' or '.join(CONDITIONS)}, got {self.condition!r}"
            )
        if self.condition == "text" and not 1 <= self.text_dim <= MAX_TEXT_DIM:
            raise ConfigError(
                f"`text_dim` must be in [1, {MAX_TEXT_DIM}] for a text model, got {self.text_dim}"
            )
        if self.condition == "class" and (
            self.text_dim or self.text_encoder or self.text_encoder_sha256 or self.text_tokens
        ):
            raise ConfigError(
                "`text_encoder`, `text_dim` and `text_tokens` are for `condition` text only"
            )
        if not 0 <= self.text_tokens <= MAX_TEXT_TOKENS:
            raise ConfigError(
                f"`text_tokens` must be in [0, {MAX_TEXT_TOKENS}], got {self.text_tokens}"
            )
        if self.text_tokens and not self.attn_levels:
            raise ConfigError(
                f"`text_tokens` {self.text_tokens}: cross-attention runs at the attention "
                "levels, and `attn_levels` is empty"
            )
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
        if self.patch_size not in (1, 2, 4):
            raise ConfigError(f"`patch_size` must be 1, 2 or 4, got {self.patch_size}")
        down = self.patch_size * 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 8 or self.image_size % down:
            lo = max(8, self.image_size // down * down)
            near = sorted({lo, lo + down} - {self.image_size})
            raise ConfigError(
                f"`image_size` must be >= 8 and divisible by {down} for {len(self.channel_mult)} "
                f"levels{f' of patch size {self.patch_size}' if self.patch_size > 1 else ''}, "
                f"got {self.image_size} (pass `image_size` "
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
        for name, hi in (
            ("num_classes", MAX_CLASSES),
            ("image_size", MAX_IMAGE_SIZE),
            ("base_channels", MAX_BASE_CHANNELS),
            ("num_res_blocks", MAX_RES_BLOCKS),
        ):
            if getattr(self, name) > hi:
                raise ConfigError(f"`{name}` must be <= {hi}, got {getattr(self, name)}")
        if len(self.channel_mult) > MAX_LEVELS or max(self.channel_mult) > MAX_CHANNEL_MULT:
            raise ConfigError(
                f"`channel_mult` must have at most {MAX_LEVELS} levels of at most "
                f"{MAX_CHANNEL_MULT}, got {self.channel_mult}"
            )
        if not 1 <= self.num_heads <= MAX_HEADS:
            raise ConfigError(f"`num_heads` must be in [1, {MAX_HEADS}], got {self.num_heads}")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective."""

    timesteps: int = bounded(1000, 2, 100_000)  # T, number of discrete diffusion steps
    schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal)
    prediction: str = "eps"  # network target: "eps" or "v" (Salimans & Ho 2022)
    # probability a training label is replaced by the null label
    label_dropout: float = bounded(0.1, 0.0, 1.0, hi_open=True)
    # probability a training caption of a token text model gets 1-3 filler words (text.py;
    # docs/text.md, "Filler words"); 0 for every other model
    filler_words: float = bounded(0.0, 0.0, 1.0)
    loss_weighting: str = "none"  # "none" (plain MSE on the target) or "min-snr" (Hang et al. 2023)
    min_snr_gamma: float = bounded(5.0, 0.0, lo_open=True)  # gamma of min-SNR weighting
    # Training timesteps: "uniform" t ~ U{0..T-1} (DDPM), or "logit-normal": t/T = sigmoid(n),
    # n ~ N(t_mean, t_std) (Esser et al. 2024, Sec. 3.1), denser in the middle of the process;
    # with t_uniform > 0, that fraction of the draws is uniform instead (a mixture, which keeps
    # every part of the process trained).
    t_sampling: str = "uniform"
    t_mean: float = bounded(0.0, -5.0, 5.0)
    t_std: float = bounded(1.0, 0.0, 5.0, lo_open=True)
    t_uniform: float = bounded(0.0, 0.0, 1.0, hi_open=True)

    def validate(self) -> None:
        check_ranges(self)
        _check_choice("schedule", self.schedule, tuple(SCHEDULES))
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and preview settings of one training run."""

    steps: int = bounded(10_000, 1, MAX_STEPS)  # optimizer steps
    batch_size: int = bounded(128, 1, 65536)  # images per step
    lr: float = bounded(2e-4, 0.0, 1.0, lo_open=True, hi_open=True)  # peak AdamW learning rate
    # after warmup: "constant" or "cosine" (decays to lr_min_ratio*lr)
    lr_schedule: str = "constant"
    lr_min_ratio: float = bounded(0.0, 0.0, 1.0)  # floor of the cosine decay as a fraction of lr
    warmup_steps: int = bounded(200, 0, MAX_STEPS)  # linear warmup from 0
    weight_decay: float = bounded(0.0, 0.0)  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = bounded(1.0, 0.0)  # max global grad norm; 0 disables clipping
    # EMA decay per step (with warmup (1+n)/(10+n)); 0 disables EMA
    ema_decay: float = bounded(0.999, 0.0, 1.0, hi_open=True)
    seed: int = bounded(0, 0, MAX_SEED)
    log_every: int = bounded(50, 1, MAX_STEPS)  # steps between loss.csv rows
    sample_every: int = bounded(1000, 0, MAX_STEPS)  # steps between preview grids; 0 disables
    # steps between checkpoints; 0 = only at the end
    checkpoint_every: int = bounded(1000, 0, MAX_STEPS)
    keep: int = bounded(3, 1, 10_000)  # checkpoints kept on disk (the newest)
    # batches with a non-finite loss/gradient that may be skipped; 0 stops
    skip_nonfinite: int = bounded(0, 0, MAX_STEPS)
    eval_every: int = bounded(0, 0, MAX_STEPS)  # steps between small-N evaluations; 0 disables
    eval_n: int = bounded(500, 10, 100_000)  # samples of each evaluation during training
    preview_scale: float = bounded(3.0, -20.0, 100.0)  # guidance scale s of preview grids
    preview_sampler: str = "dpmpp-2m"  # sampler of preview grids and the guidance strip
    preview_steps: int = bounded(20, 1, 1000)  # sampler steps of preview grids
    # samples per class in preview grids
    preview_per_class: int = bounded(8, 1, MAX_PREVIEW_PER_CLASS)
    # random horizontal flips of training images (DDPM's CIFAR-10 recipe); None: the dataset's
    # default (on for cifar10, off for digits, clothes and folders), resolved when a run starts
    hflip: bool | None = None

    def validate(self) -> None:
        check_ranges(self)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"`adam_betas` must be two numbers in [0, 1), got {self.adam_betas}")
        _check_choice("preview_sampler", self.preview_sampler, tuple(SAMPLERS))
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)


@dataclass(frozen=True)
class SamplingConfig:
    """How the model is sampled where a command or caller does not say: the sampler its
    evaluations use, recorded by its preset (`cfgdiff sample`, `eval`, `sweep` and the page
    take it without `--sampler`; sampling.settings.SamplingSettings resolves against it)."""

    sampler: str = "dpmpp-2m"  # a name of sampling.samplers.SAMPLERS
    steps: int = bounded(20, 1, 100_000)  # sampler steps (at most the schedule's T)
    spacing: str = "trailing"  # which timesteps the sampler visits (schedule.SPACINGS)
    eta: float = bounded(0.0, 0.0, 10.0)  # DDIM's noise (0: deterministic); others ignore it

    def validate(self) -> None:
        check_ranges(self)
        _check_choice("sampler", self.sampler, tuple(SAMPLERS))
        _check_choice("spacing", self.spacing, tuple(SPACINGS))


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a run: stored as config.json in each checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the sampler its evaluations use (absent from configs written before it was recorded:
    # SamplingConfig's defaults)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dataset: str = "mnist"  # mnist | fashion-mnist | cifar10 | folder:PATH
    preset: str = "custom"
    # Name of each label 0..num_classes-1 (a folder's sub-folder names, "T-shirt/top", ...), filled
    # from the dataset when a run starts; empty in checkpoints written before it was recorded.
    class_names: tuple[str, ...] = ()

    def validate(self) -> None:
        self.model.validate()
        self.diffusion.validate()
        self.train.validate()
        self.sampling.validate()
        if self.sampling.steps > self.diffusion.timesteps:
            raise ConfigError(
                f"`sampling.steps` must be at most `timesteps` {self.diffusion.timesteps}, got "
                f"{self.sampling.steps}"
            )
        if self.diffusion.filler_words and not self.model.text_tokens:
            raise ConfigError(
                f"`filler_words` {self.diffusion.filler_words:g}: filler words are for text "
                "models that read tokens (`condition` text, `text_tokens` > 0)"
            )
        if self.class_names and len(self.class_names) != self.model.num_classes:
            raise ConfigError(
                f"`class_names` has {len(self.class_names)} names for "
                f"{self.model.num_classes} classes"
            )
        for name in ("dataset", "preset", *self.class_names):
            text = getattr(self, name) if name in ("dataset", "preset") else name
            if len(text) > MAX_NAME_CHARS or "\0" in text:
                raise ConfigError(
                    f"names must be at most {MAX_NAME_CHARS} characters without NUL, got "
                    f"{text[:40]!r}..."
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
        """A config from its JSON form, every field checked for its type first (a string where
        an int belongs, a fraction where an int belongs, a list that should be a number): a
        ConfigError naming the field, never a TypeError later. Ranges are validate()'s."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ConfigError(f"config format_version must be {FORMAT_VERSION}, got {version!r}")
        for key in ("model", "diffusion", "train", "dataset"):
            if key not in d:
                raise ConfigError(f"config has no {key!r}")
        top = {k: d[k] for k in ("dataset", "preset", "class_names") if k in d}
        top = _fields_from_json(cls, top, "", skip=("model", "diffusion", "train"))
        train = d["train"]
        if isinstance(train, dict):  # written before hflip existed: those runs did not flip
            train = {"hflip": False, **train}
        return cls(
            model=_build(ModelConfig, d["model"], "model"),
            diffusion=_build(DiffusionConfig, d["diffusion"], "diffusion"),
            train=_build(TrainConfig, train, "train"),
            sampling=_build(SamplingConfig, d.get("sampling", {}), "sampling"),
            **top,
        )


def _build(cls: type, d: Any, section: str) -> Any:
    """A frozen dataclass from its JSON object, each field's type checked, lists made tuples."""
    if not isinstance(d, dict):
        raise ConfigError(f"{section} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {section} field(s): {sorted(unknown)[:10]}")
    return cls(**_fields_from_json(cls, d, f"{section}."))


def _fields_from_json(cls: type, d: dict[str, Any], prefix: str, skip=()) -> dict[str, Any]:
    """{name: value} of `d` checked against the type hints of `cls` (int, float, str, bool,
    None, tuple[X, ...], tuple[X, Y]) and converted: lists to tuples, ints to floats."""
    hints = typing.get_type_hints(cls)
    return {k: _typed(f"{prefix}{k}", v, hints[k]) for k, v in d.items() if k not in skip}


def _typed(name: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        ok, converted = _as(value, option)
        if ok:
            return converted
    shown = "an object" if isinstance(value, dict) else repr(value)
    want = " or ".join(_describe(o) for o in options)
    raise ConfigError(f"{name} must be {want}, got {shown[:60]}")


def _describe(hint: Any) -> str:
    words = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        plural = {int: "integers", float: "numbers", str: "strings"}[args[0]]
        return f"a list of {plural}" if args[-1] is Ellipsis else f"a list of {len(args)} {plural}"
    return words.get(hint, "null")


def _as(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether `value` is of type `hint`, the value as that type)."""
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and math.isfinite(value), float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) > MAX_CLASSES:
            return False, value
        each = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(each) != len(value):
            return False, value
        out = [_as(v, a) for v, a in zip(value, each, strict=True)]
        return all(ok for ok, _ in out), tuple(v for _, v in out)
    return False, value


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
