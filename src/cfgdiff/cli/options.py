"""The CLI's vocabulary: argument types, the option groups commands share, the one table that
declares a training flag with the config field it sets, and the rewriting of the library's
parameter names (in backticks) into flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfgdiff.config import (
    CONDITIONS,
    T_SAMPLINGS,
    DiffusionConfig,
    ModelConfig,
    Range,
    TrainConfig,
    range_of,
)
from cfgdiff.errors import CfgDiffError
from cfgdiff.runtime import COMPILE_MIN_IMAGE_STEPS, DEVICES, PRECISIONS
from cfgdiff.sampling.backends import AUTO_MIN_IMAGE_STEPS
from cfgdiff.sampling.guidance import APG, THRESHOLDS, Guidance
from cfgdiff.sampling.request import SCALE_RANGE
from cfgdiff.sampling.settings import SamplingSettings, flag


class UsageError(CfgDiffError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


# ----------------------------------------------------------------- argument types


def int_in(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {v}")
        return v

    return parse


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        bad = not (v > lo if lo_open else v >= lo) or not (v < hi if hi_open else v <= hi)
        if bad or v != v:
            lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"must be in {lb}{lo:g}, {hi:g}{rb}, got {s}")
        return v

    return parse


def in_range(kind: type, r: Range):
    """An argument type: an int or a float (`kind`) in the Range a field declares."""
    word = "an integer" if kind is int else "a number"

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word}, got {s!r}") from None
        if v not in r:
            raise argparse.ArgumentTypeError(f"must be {r}, got {s}")
        return v

    return parse


def field_type(cls: type, name: str):
    """The argument type of field `name` of config dataclass `cls`: its Python type, in its
    declared Range."""
    import typing

    hint = typing.get_type_hints(cls)[name]
    kind = int if hint in (int, int | None) else float
    r = range_of(cls, name)
    return in_range(kind, r) if r is not None else kind


def duration(s: str) -> float:
    """Seconds from "90", "90s", "5m", "1.5h" (more than 0, at most a week)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    body, unit = (s[:-1], units[s[-1]]) if s[-1:] in units else (s, 1.0)
    try:
        v = float(body) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds or a duration such as 90s, 5m, 1.5h; got {s!r}"
        ) from None
    if not 0 < v <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 s and at most 7 days, got {s}")
    return v


def classes(s: str) -> list[str]:
    """Comma-separated class names or indices; resolved against a checkpoint by
    RunConfig.class_indices."""
    out = [p.strip() for p in s.split(",") if p.strip() != ""]
    if not out:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class names or indices, got {s!r}"
        )
    return out


def floats(s: str) -> list[float]:
    try:
        out = [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(not -20 <= v <= 100 for v in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct numbers in [-20, 100], got {s!r}")
    return out


def interval(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {s!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {s!r}")
    return lo, hi


def dataset_name(name: str) -> str:
    """--dataset as given, but folder:~/x and folder:x made absolute (checked later)."""
    from cfgdiff.data import canonical_name

    return canonical_name(name)


# ----------------------------------------------------------------- library words -> flags

# A library parameter whose flag is not "--" + its name with "-" for "_".
PARAM_FLAGS = {
    "run_dir": "--out",
    "time_budget": "--time",
    "interval": "--guidance-interval",
    "prompts_file": "--prompts",
    "prompts": "--prompt",
    "animate_scales": "--animate-scales",
}
_PARAM = re.compile(r"`([a-z_]+)(?:=([^`]*))?`")
# Every option string of the CLI (cli.build_parser fills it): the flags flag_words may use.
KNOWN_FLAGS: set[str] = set()


def flag_words(message: str, known: Iterable[str] | None = None) -> str:
    """A library message in the CLI's words: each `name` or `name=value` (errors.py) becomes
    the flag that sets it ("--steps", "--resume", "--time 60", "--no-hflip") where the CLI has
    one (`known`: its option strings, default KNOWN_FLAGS), else the bare name."""
    known = KNOWN_FLAGS if known is None else set(known)

    def word(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        flag = PARAM_FLAGS.get(name, "--" + name.replace("_", "-"))
        if flag not in known:
            return name if value is None else f"{name}={value}"
        if value is None or value == "True":
            return flag
        if value == "False":
            return "--no-" + flag[2:]
        return f"{flag} {value}"

    return _PARAM.sub(word, message)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and its sub-commands."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= option_strings(sub)
    return out


# ----------------------------------------------------------------- config fields as flags


@dataclass(frozen=True)
class ConfigFlag:
    """A `train` flag that sets one config field ("section.field"): declared here, once, so it
    is both parsed and applied (overrides() reads this table). `example`: a valid value other
    than every preset's, for the test that each flag reaches the config."""

    flag: str
    field: str
    example: str | None  # None: a switch (BooleanOptionalAction)
    kwargs: dict[str, Any] = field(default_factory=dict)


TIMESTEP_HELP = (
    "training timesteps: uniform, or t/T = sigmoid(n), n ~ N(--t-mean, --t-std) (default: the "
    "preset's: cpu-demo's is logit-normal (0.5, 1) with 0.5 uniform, but uniform on "
    "fashion-mnist, where it measured better; every other preset's uniform)"
)
CONFIG_FLAGS = (
    ConfigFlag(
        "--condition",
        "model.condition",
        "text",
        dict(
            choices=CONDITIONS,
            help="what the model is conditioned on: class labels, or text prompts (captions made "
            "from each image's label and measured attributes, encoded once by the `text` extra's "
            "sentence encoder; docs/text.md)",
        ),
    ),
    ConfigFlag(
        "--patch-size",
        "model.patch_size",
        "4",
        dict(
            type=int,
            choices=(1, 2, 4),
            help="side of the square patches the network works on (2: the first level runs at "
            "half resolution, about 3x faster per step on a CPU)",
        ),
    ),
    ConfigFlag(
        "--text-tokens",
        "model.text_tokens",
        "16",
        dict(
            help="text models: also read a caption's first N token embeddings by "
            "cross-attention at the attention levels (default 16; longer prompts are refused); "
            "0 reads its pooled embedding only, through FiLM (docs/text.md)",
        ),
    ),
    ConfigFlag(
        "--filler-words",
        "diffusion.filler_words",
        "0.25",
        dict(
            help="text models that read tokens: the probability a training caption gets 1-3 "
            "filler words, so that words the model has no use for change nothing (default "
            "0.5; 0 turns it off; docs/text.md)",
        ),
    ),
    ConfigFlag("--steps", "train.steps", "7", {}),
    ConfigFlag("--batch-size", "train.batch_size", "12", {}),
    ConfigFlag("--lr", "train.lr", "0.003", {}),
    ConfigFlag("--label-dropout", "diffusion.label_dropout", "0.2"),
    ConfigFlag(
        "--t-sampling",
        "diffusion.t_sampling",
        "logit-normal",
        dict(choices=T_SAMPLINGS, help=TIMESTEP_HELP),
    ),
    ConfigFlag(
        "--t-mean",
        "diffusion.t_mean",
        "0.25",
        dict(help="mean of n for logit-normal"),
    ),
    ConfigFlag(
        "--t-std",
        "diffusion.t_std",
        "0.75",
        dict(help="standard deviation of n"),
    ),
    ConfigFlag(
        "--t-uniform",
        "diffusion.t_uniform",
        "0.25",
        dict(
            help="for logit-normal: the fraction of timesteps drawn uniformly instead (a "
            "mixture; default 0)",
        ),
    ),
    ConfigFlag("--ema-decay", "train.ema_decay", "0.98"),
    ConfigFlag(
        "--hflip",
        "train.hflip",
        None,
        dict(
            action=argparse.BooleanOptionalAction,
            help="mirror training images at random (default: on for cifar10, off for digits, "
            "clothes and folders: for a folder of photos, where left and right mean the same, "
            "pass --hflip)",
        ),
    ),
    ConfigFlag(
        "--sample-every",
        "train.sample_every",
        "3",
        dict(help="steps between preview grids (0: off)"),
    ),
    ConfigFlag(
        "--checkpoint-every",
        "train.checkpoint_every",
        "3",
        dict(help="steps between checkpoints"),
    ),
    ConfigFlag("--keep", "train.keep", "5", dict(help="checkpoints kept on disk")),
    ConfigFlag(
        "--skip-nonfinite",
        "train.skip_nonfinite",
        "2",
        dict(
            help="skip up to N batches with a non-finite loss or gradient (default 0: stop)",
        ),
    ),
    ConfigFlag(
        "--eval-every",
        "train.eval_every",
        "4",
        dict(
            help="steps between small-N evaluations (FID, class accuracy) into eval.csv (0: off)",
        ),
    ),
    ConfigFlag(
        "--eval-n",
        "train.eval_n",
        "20",
        dict(help="samples per evaluation (500)"),
    ),
    ConfigFlag("--seed", "train.seed", "3"),
)


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every CONFIG_FLAGS flag; a number's type and range are its config field's."""
    for f in CONFIG_FLAGS:
        kwargs = dict(f.kwargs)
        if not {"type", "choices", "action"} & set(kwargs):
            section, _, name = f.field.partition(".")
            kwargs["type"] = field_type(SECTIONS[section], name)
        parser.add_argument(f.flag, dest=f.field, **kwargs)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command line set: {"train.lr": 0.003, ...}."""
    return {
        f.field: getattr(args, f.field) for f in CONFIG_FLAGS if getattr(args, f.field) is not None
    }


# ----------------------------------------------------------------- shared option groups

BATCH_HELP = (
    "images per sampler batch (default: 64 on the CPU; on CUDA as many as fit in the free memory, "
    "measured, and halved if it still runs out; no effect on results)"
)
PRECISION_HELP = "auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32"


def data_dir_option(sp: argparse.ArgumentParser, help: str | None = None) -> None:
    sp.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=help
        or "where datasets are found and cached (default $CFGDIFF_DATA_DIR or "
        "~/.cache/cfgdiff/data)",
    )


def device_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", default="auto", choices=[d for d in DEVICES])
    sp.add_argument("--precision", default="auto", choices=list(PRECISIONS), help=PRECISION_HELP)


# Help of the SamplingSettings flags (their types, ranges, choices and defaults are the
# fields' own).
SETTINGS_HELP = {
    "sampler": "default: the model's own, the sampler its preset is judged with (cfgdiff info "
    "says which)",
    "steps": "sampler steps (default: the model's own)",
    "spacing": "which timesteps the sampler visits (default: the model's own)",
    "eta": "DDIM noise (0: deterministic; default: the model's own)",
    "seed": "image i of a seed is the same whatever the batch, device or processes",
    "batch_size": BATCH_HELP,
    "precision": PRECISION_HELP,
    "compile": "torch.compile the network for sampling (CUDA graphs on CUDA; batches padded to "
    "one shape; eager fallback if compilation fails or its first output differs from eager). "
    f"auto: on for CPU jobs of at least {COMPILE_MIN_IMAGE_STEPS:,} image-steps, where the "
    "compilation pays off; off on CUDA until measured there",
    "backend": "what runs the network: torch, or onnxruntime (its ONNX graph, checked against "
    "torch, on the CPU in fp32; needs pip install 'cfgdiff[onnx]'). auto (default): on a CPU "
    f"with onnxruntime installed and a job of at least {AUTO_MIN_IMAGE_STEPS:,} image-steps, the "
    "faster of the two measured on the job's batch; else torch. The first line says which",
}


def _settings_fields():
    return [f for f in dataclasses.fields(SamplingSettings) if f.metadata.get("flag", True)]


def settings_options(sp: argparse.ArgumentParser) -> None:
    """SamplingSettings' fields as flags (--sampler, --steps, ...): their types, ranges and
    choices are the fields' own; a flag not given leaves the field's default (None: the
    model's own)."""
    for f in _settings_fields():
        kwargs: dict[str, Any] = {"help": SETTINGS_HELP.get(f.name), "default": None}
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        else:
            kwargs["type"] = field_type(SamplingSettings, f.name)
        sp.add_argument(flag(f.name), **kwargs)


def backend_option(sp: argparse.ArgumentParser) -> None:
    """--backend alone, as SamplingSettings declares it (for `serve`, which decides it once)."""
    (f,) = [f for f in _settings_fields() if f.name == "backend"]
    sp.add_argument(
        flag(f.name), choices=list(f.metadata["choices"]), default=None,
        help=SETTINGS_HELP[f.name] + " (serve: measured once, when it starts, on one image)",
    )  # fmt: skip


def settings_of(a: argparse.Namespace) -> SamplingSettings:
    """The SamplingSettings the flags ask for."""
    given = {f.name: getattr(a, f.name, None) for f in _settings_fields()}
    return SamplingSettings(**{k: v for k, v in given.items() if v is not None})


def sampling_options(sp: argparse.ArgumentParser, required: bool = True, scale: bool = True):
    """Options shared by `sample`, `eval` and `sweep`: checkpoint, the sampling settings,
    guidance variants.

    required=False leaves --checkpoint and --scale/--w to be checked by the command (eval has a
    sub-action that needs neither); scale=False omits --scale/--w (sweep has --scales)."""
    sp.add_argument(
        "--checkpoint",
        type=Path,
        required=required,
        help="checkpoint folder, a run folder (uses its latest checkpoint), or a model file "
        "from cfgdiff export",
    )
    if scale:
        lo, hi = SCALE_RANGE
        g = sp.add_mutually_exclusive_group(required=required)
        g.add_argument(
            "--scale",
            type=in_range(float, Range(lo, hi)),
            help="guidance scale s (1 = conditional)",
        )
        g.add_argument(
            "--w",
            type=in_range(float, Range(lo - 1, hi - 1)),
            help="paper's guidance weight w = s - 1",
        )
    settings_options(sp)
    v = sp.add_argument_group("guidance variants (docs/guidance.md)")
    v.add_argument(
        "--guidance-interval",
        type=interval,
        metavar="LO,HI",
        help="guide only where LO < sigma_t <= HI, sigma_t = sqrt((1-alpha_bar)/alpha_bar)",
    )
    v.add_argument(
        "--rescale", type=field_type(Guidance, "rescale"), help="phi of guidance rescale"
    )
    v.add_argument(
        "--negative-class",
        type=field_type(Guidance, "negative_class"),
        help="steer away from this class",
    )
    v.add_argument("--guide-checkpoint", type=Path, help="autoguidance: a weaker checkpoint")
    v.add_argument("--threshold", choices=list(THRESHOLDS))
    v.add_argument("--threshold-percentile", type=field_type(Guidance, "threshold_percentile"))
    v.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    for name in ("eta", "norm_threshold", "momentum"):
        v.add_argument(f"--apg-{name.replace('_', '-')}", type=field_type(APG, name))


def guidance_of(a: argparse.Namespace) -> Guidance:
    """The Guidance variants the flags ask for (the scale is set by the library: --scale or
    --w; the negative class and the guide network are the request's)."""
    apg = None
    if a.apg:
        given = {k: getattr(a, f"apg_{k}") for k in ("eta", "norm_threshold", "momentum")}
        apg = APG(**{k: v for k, v in given.items() if v is not None})
    given = {
        "interval": a.guidance_interval,
        "rescale": a.rescale,
        "threshold": a.threshold,
        "threshold_percentile": a.threshold_percentile,
    }
    return Guidance(apg=apg, **{k: v for k, v in given.items() if v is not None})


def negative_prompt_option(group) -> None:
    """--negative-prompt, of sample, eval and sweep (text models only)."""
    group.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="text models: guide away from this prompt: the reference in place of the null "
        "condition",
    )


def reference_options(sp: argparse.ArgumentParser) -> None:
    """Options of the real data eval and sweep compare with."""
    from cfgdiff.metrics.evaluate import FEATURES

    sp.add_argument(
        "--dataset",
        type=dataset_name,
        help="reference data (default: the checkpoint's; for train-classifier: required)",
    )
    sp.add_argument(
        "--features",
        default="classifier",
        choices=list(FEATURES),
        help="feature space of FID/KID/precision/recall: the dataset's own classifier (fast, "
        "offline) or the standard FID Inception-v3 (RGB-comparable with published numbers)",
    )
    sp.add_argument("--inception", type=Path, help="a local copy of the FID Inception network")
    data_dir_option(sp, "where datasets, classifiers and models are cached")


def reference_of(a: argparse.Namespace):
    """The ReferenceOptions the flags ask for."""
    from cfgdiff.metrics.evaluate import ReferenceOptions

    return ReferenceOptions(a.dataset, a.features, a.inception, a.data_dir, a.device or "auto")


# What eval and sweep read of a text model (metrics.judging: prompt adherence).
TEXT_GROUP = "text models (prompt and attribute adherence on held-out prompts; docs/text.md)"


def judged_options(sp: argparse.ArgumentParser) -> None:
    """eval's and sweep's options of a text model: a negative prompt, prompts of a file."""
    g = sp.add_argument_group(TEXT_GROUP)
    negative_prompt_option(g)
    g.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="measure these prompts instead of the run's held-out phrasings: one "
        "CLASS<TAB>prompt per line, CLASS the class the prompt asks for (a name or an index); "
        "reports the judge's accuracy per prompt and in all, and each prompt's mean thickness "
        "and slant",
    )


def sampling_request(a: argparse.Namespace):
    """The SampleRequest of eval's and sweep's sampling flags (its rows are the judge's)."""
    from cfgdiff.sampling.conditions import Asks
    from cfgdiff.sampling.request import SampleRequest

    asks = Asks(
        prompts_file=a.prompts, negative_class=a.negative_class,
        negative_prompt=a.negative_prompt,
    )  # fmt: skip
    return SampleRequest(
        checkpoint=a.checkpoint, scale=getattr(a, "scale", None), w=getattr(a, "w", None),
        asks=asks, per_class=1, guidance=guidance_of(a), guide_checkpoint=a.guide_checkpoint,
        settings=settings_of(a),
    )  # fmt: skip
