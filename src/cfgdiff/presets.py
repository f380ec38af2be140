"""Named presets, and a run's config made from one.

Owns: PRESETS (complete RunConfigs: cpu-demo, cpu-demo-fp32, mnist, cifar10, lesson-35m, tiny),
the names that stand for a preset chosen by the machine (MACHINE_PRESETS: `demo`), a preset as a
dataset's spec changes it (get_preset), a run's config resolved from a preset or a resumed run's
config, the dataset and the caller's overrides (resolve_config), and the data-dependent fields
filled from the data (config_for_dataset).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cfgdiff.config import (
    LOGIT_NORMAL_FIELDS,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    TrainConfig,
    replace_fields,
)
from cfgdiff.data.specs import DatasetName
from cfgdiff.errors import CfgDiffError, ConfigError
from cfgdiff.text.encoder import DEFAULT_ENCODER, ENCODERS

# Tuned for quality per CPU-minute on 2 cores at 28x28 (docs/results.md, "Tuning the demo
# preset").
_CPU_DEMO = RunConfig(
    model=ModelConfig(
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_levels=(2,),
        num_heads=4,
    ),
    # timesteps: half uniform, half logit-normal (0.5, 1), shifted to the noisy end where the
    # class is decided (docs/results.md, "Training timesteps").
    diffusion=DiffusionConfig(
        schedule="cosine",
        prediction="v",
        loss_weighting="none",
        t_sampling="logit-normal",
        t_mean=0.5,
        t_std=1.0,
        t_uniform=0.5,
    ),
    train=TrainConfig(
        steps=1000,
        batch_size=64,
        lr=2e-3,
        lr_schedule="cosine",
        lr_min_ratio=0.05,
        warmup_steps=100,
        # never binds in 1000 steps: EMA's warm-up term (1 + n)/(10 + n) stays below it
        ema_decay=0.995,
        sample_every=250,
        checkpoint_every=250,
    ),
    # judged by ancestral sampling in 20 steps: fresh noise undoes more of a briefly trained
    # network's errors than DPM-Solver++ does in as many steps (docs/results.md, "Which sampler
    # judges the demo")
    sampling=SamplingConfig(sampler="ddpm", steps=20),
    preset="cpu-demo",
)

# Named presets. Each is a complete RunConfig; data-dependent model fields (channels, size,
# classes) are replaced from the dataset when a run starts.
PRESETS: dict[str, RunConfig] = {
    "cpu-demo": _CPU_DEMO,
    # cpu-demo for a CPU that trains in fp32 (no AMX or AVX512-BF16): a 2x2 patch stem runs the
    # network at 14x14 and 7x7 for about a quarter of cpu-demo's FLOPs per image, trained for
    # as many steps as fit the demo's ten minutes there (docs/results.md, "The demo on a CPU
    # without native bf16"); otherwise cpu-demo's recipe.
    "cpu-demo-fp32": dataclasses.replace(
        replace_fields(
            _CPU_DEMO,
            {
                "model.patch_size": 2,
                "model.channel_mult": (1, 2),
                "model.attn_levels": (1,),
                "train.steps": 1100,
                "train.sample_every": 550,
                "train.checkpoint_every": 550,
            },
        ),
        preset="cpu-demo-fp32",
    ),  # fmt: skip
    # cpu-demo-fp32's patch stem with 48 channels and an EMA for thousands of steps, tried for 30
    # minutes of fp32 training; cpu-demo-fp32 given the same 30 minutes measured better, so
    # `--time` no longer picks it (docs/results.md, "Quality for the time you have").
    "cpu-30m-fp32": dataclasses.replace(
        replace_fields(
            _CPU_DEMO,
            {
                "model.patch_size": 2,
                "model.base_channels": 48,
                "model.channel_mult": (1, 2),
                "model.attn_levels": (1,),
                "train.steps": 2400,
                "train.warmup_steps": 200,
                "train.ema_decay": 0.999,
                "train.sample_every": 1000,
                "train.checkpoint_every": 500,
            },
        ),
        preset="cpu-30m-fp32",
    ),  # fmt: skip
    # MNIST on one GPU: a wider network and more steps.
    "mnist": RunConfig(
        model=ModelConfig(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2),
        diffusion=DiffusionConfig(schedule="cosine", prediction="v"),
        train=TrainConfig(
            steps=8000,
            batch_size=256,
            lr=1e-3,
            lr_schedule="cosine",
            lr_min_ratio=0.05,
            warmup_steps=200,
            ema_decay=0.999,
            sample_every=2000,
            checkpoint_every=2000,
        ),
        preset="mnist",
    ),
    # CIFAR-10 (32x32 RGB) on one GPU.
    "cifar10": RunConfig(
        model=ModelConfig(
            in_channels=3,
            image_size=32,
            base_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_levels=(2,),
            dropout=0.1,
        ),
        diffusion=DiffusionConfig(schedule="cosine", prediction="v"),
        train=TrainConfig(
            steps=100_000,
            batch_size=128,
            lr=2e-4,
            warmup_steps=1000,
            ema_decay=0.9999,
            sample_every=5000,
            checkpoint_every=5000,
        ),
        dataset="cifar10",
        preset="cifar10",
    ),
    # The original MNIST lesson's network class (32x32 input, 128 base channels, ~35 M
    # parameters) for like-for-like throughput comparisons; train MNIST with --image-size 32.
    "lesson-35m": RunConfig(
        model=ModelConfig(
            in_channels=1,
            image_size=32,
            base_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_levels=(1,),
            dropout=0.1,
        ),
        diffusion=DiffusionConfig(schedule="linear", prediction="eps"),
        train=TrainConfig(steps=10_000, batch_size=128, lr=2e-4, warmup_steps=500),
        preset="lesson-35m",
    ),
    # Seconds-long runs for tests and smoke checks.
    "tiny": RunConfig(
        model=ModelConfig(
            base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), num_heads=2
        ),
        train=TrainConfig(
            steps=20,
            batch_size=8,
            lr=1e-3,
            warmup_steps=2,
            ema_decay=0.9,
            log_every=5,
            sample_every=10,
            checkpoint_every=10,
            preview_steps=4,
            preview_per_class=2,
        ),
        preset="tiny",
    ),
}


# Names that stand for a preset chosen by what the machine trains in, as precision="auto" is:
# the same kind of machine always gets the same preset, and the run records the one chosen.
# `demo`: cpu-demo where training runs in bf16 (CUDA; CPUs with AMX or AVX512-BF16), its cheaper
# cousin cpu-demo-fp32 on CPUs without native bf16 (docs/results.md, "The demo on a CPU without
# native bf16").
MACHINE_PRESETS: dict[str, dict[str, str]] = {"demo": {"bf16": "cpu-demo", "fp32": "cpu-demo-fp32"}}


@dataclass(frozen=True)
class BudgetRecipe:
    """A row of BUDGET_RECIPES: the preset that measured best for time budgets up to `up_to_s`
    seconds (above the previous row's) when training on `device` in `precision`, and the
    measurement behind it, said when it is chosen."""

    device: str  # "cpu" or "cuda"
    precision: str  # "fp32" or "bf16"
    up_to_s: float
    preset: str
    evidence: str


# The recipe `cfgdiff train --time` picks where no --preset is given, from what the project
# measured on 2-core CPUs on MNIST (docs/results.md, "Quality for the time you have"). A kind
# of machine with no row of its own gets the `demo` preset's choice, and the start line says
# that no recipe was measured there.
BUDGET_RECIPES: tuple[BudgetRecipe, ...] = (
    BudgetRecipe(
        "cpu", "fp32", float("inf"), "cpu-demo-fp32",
        "the demo's recipe, measured best at 3, 10 and 30 min: after 30 min 98.4 % at s = 1, "
        "FID 1.7x the real floor, ahead of cpu-30m-fp32's 2.2x",
    ),
    BudgetRecipe(
        "cpu", "bf16", float("inf"), "cpu-demo",
        "the demo's recipe; no longer bf16 recipe is measured yet",
    ),
)  # fmt: skip


def budget_preset(seconds: float, device_type: str, precision: str) -> tuple[str, str]:
    """The preset `cfgdiff train --time` takes for a budget of `seconds` training on
    `device_type` in `precision` (BUDGET_RECIPES), and the one line that says which and why."""
    budget = _minutes(seconds)
    rows = [r for r in BUDGET_RECIPES if (r.device, r.precision) == (device_type, precision)]
    for r in rows:
        if seconds <= r.up_to_s:
            return r.preset, f"--time {budget}: preset {r.preset} ({r.evidence}; --preset chooses)"
    chosen, _ = machine_preset("demo", device_type, precision)
    return chosen, (
        f"--time {budget}: preset {chosen}, the demo's (no budget recipe is measured for "
        f"{device_type} in {precision}; --preset chooses)"
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def machine_preset(name: str, device_type: str, precision: str) -> tuple[str, str | None]:
    """The preset `name` stands for on a machine that trains on `device_type` ("cpu", "cuda")
    in `precision` ("fp32", "bf16"), and a note saying so (None for a preset that is its own
    name)."""
    if name not in MACHINE_PRESETS:
        return name, None
    chosen = MACHINE_PRESETS[name]["bf16" if device_type == "cuda" else precision]
    why = (
        "training in fp32 on a CPU without native bf16"
        if chosen != MACHINE_PRESETS[name]["bf16"]
        else f"training in {precision} on {device_type}"
    )
    return chosen, f"preset {name}: {chosen} ({why})"


def get_preset(name: str, dataset: str | None = None) -> RunConfig:
    """The named preset, with the changes `dataset`'s spec makes to it (DatasetSpec.
    preset_changes; none for an unknown dataset or none given)."""
    if name not in PRESETS:
        raise ConfigError(f"`preset` must be one of {', '.join(PRESETS)}, got {name!r}")
    changes = _dataset_changes(name, dataset)
    return replace_fields(PRESETS[name], changes) if changes else PRESETS[name]


def _dataset_changes(preset: str, dataset: str | None) -> dict[str, Any]:
    if dataset is None:
        return {}
    try:
        spec = DatasetName.parse(dataset).spec
    except CfgDiffError:
        return {}
    return dict(spec.preset_changes.get(preset, {}))


@dataclass(frozen=True)
class Resolved:
    """A run's config before the data fills its data-dependent fields (config_for_dataset), and
    what the caller may want to say about how it was resolved."""

    config: RunConfig
    dataset: str
    notes: tuple[str, ...] = ()


# The token embeddings a new text model reads by cross-attention unless `text_tokens` says
# otherwise: it obeyed held-out phrasings' digit far more often than the pooled embedding alone
# for a little more time per step (docs/text.md, "Cross-attention against FiLM alone"); the
# slots MNIST's captions leave free take filler words.
TEXT_TOKENS = 16
# The probability that a training caption of a new token model gets filler words: it obeyed
# phrasings held out of training far more often, at no cost on the training phrasings
# (docs/text.md, "Filler words").
FILLER_WORDS = 0.5


def encoder_fields(name: str = DEFAULT_ENCODER) -> dict[str, Any]:
    """The ModelConfig fields that record text encoder `name` (a text run's defaults)."""
    spec = ENCODERS[name]
    return {"text_encoder": name, "text_encoder_sha256": spec.sha256, "text_dim": spec.dim}


def resolve_config(
    overrides: dict[str, Any],
    *,
    preset: str | None = None,
    dataset: str | None = None,
    resumed: RunConfig | None = None,
) -> Resolved:
    """The config of a training run: the preset (default cpu-demo) with its dataset's changes,
    or the config of the run being resumed (`resumed`), then the caller's `overrides`
    ({"section.field": value}, only the fields given). The dataset defaults to mnist, or to the
    resumed run's.

    A dataset's preset changes are skipped where the overrides set any of the fields they
    change (the caller's choice wins whole). A new run asking for uniform timesteps records
    none of a preset's logit-normal settings; logit-normal settings on a run whose timesteps are
    uniform are refused."""
    if resumed is not None:
        if preset is not None and preset != resumed.preset:
            raise ConfigError(
                f"`preset` {preset}: the run was trained with preset {resumed.preset}"
            )
        base, dataset, notes = resumed, dataset or resumed.dataset, []
    else:
        name, dataset = preset or "cpu-demo", dataset or "mnist"
        own = get_preset(name)
        changes = _dataset_changes(name, dataset)
        base, notes = own, []
        if changes and not set(changes) & set(overrides):
            base = replace_fields(own, changes)
            d, o = base.diffusion, own.diffusion
            if d.t_sampling != o.t_sampling:
                notes.append(
                    f"{name} on {dataset}: {d.t_sampling} timesteps, measured better there than "
                    f"the preset's {o.t_sampling} law (docs/results.md; `t_sampling` chooses)"
                )
    cfg = replace_fields(base, overrides)
    if cfg.model.condition == "text" and not cfg.model.text_encoder:  # a new text model
        tokens = overrides.get("model.text_tokens", TEXT_TOKENS)
        filler = overrides.get("diffusion.filler_words", FILLER_WORDS if tokens else 0.0)
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, **encoder_fields(), text_tokens=tokens),
            diffusion=dataclasses.replace(cfg.diffusion, filler_words=filler),
        )
    if overrides.get("diffusion.t_sampling") == "uniform" and resumed is None:
        unset = DiffusionConfig()
        cfg = replace_fields(
            cfg, {f"diffusion.{f}": getattr(unset, f) for f in LOGIT_NORMAL_FIELDS}
        )
    if cfg.diffusion.t_sampling == "uniform":
        for f in LOGIT_NORMAL_FIELDS:
            if f"diffusion.{f}" in overrides:
                raise ConfigError(
                    f"`{f}={overrides[f'diffusion.{f}']:g}`: applies to "
                    "`t_sampling=logit-normal` only (this run's timesteps are uniform)"
                )
    return Resolved(cfg, dataset, tuple(notes))


def config_for_dataset(cfg: RunConfig, data: Any, dataset_name: str) -> RunConfig:
    """Fill the data-dependent fields from the dataset (anything with channels, image_size,
    num_classes and class_names, such as data.Dataset): the model's channels, size and classes,
    and horizontal flips where the run leaves them to the dataset (train.hflip None: its spec's
    default)."""
    model = dataclasses.replace(
        cfg.model,
        in_channels=data.channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    )
    train = cfg.train
    if train.hflip is None:
        train = dataclasses.replace(train, hflip=DatasetName.parse(dataset_name).spec.hflip)
    names = tuple(str(c) for c in data.class_names)
    return dataclasses.replace(
        cfg, model=model, train=train, dataset=dataset_name, class_names=names
    )
