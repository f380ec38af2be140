"""The CLI's vocabulary: argument types, the option groups commands share, the one table that
declares a training flag with the config field it sets, and the rewriting of the library's
parameter names (in backticks) into flags.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfgdiff.config import CONDITIONS, MAX_STEPS, MAX_TEXT_TOKENS, T_SAMPLINGS
from cfgdiff.errors import CfgDiffError
from cfgdiff.guidance import THRESHOLDS
from cfgdiff.runtime import COMPILE_CHOICES, COMPILE_MIN_IMAGE_STEPS, DEVICES, PRECISIONS
from cfgdiff.samplers import SAMPLERS
from cfgdiff.schedule import SPACINGS


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
PARAM_FLAGS = {"run_dir": "--out", "time_budget": "--time", "interval": "--guidance-interval"}
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
            type=int_in(0, MAX_TEXT_TOKENS),
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
            type=float_in(0, 1),
            help="text models that read tokens: the probability a training caption gets 1-3 "
            "filler words, so that words the model has no use for change nothing (default "
            "0.5; 0 turns it off; docs/text.md)",
        ),
    ),
    ConfigFlag("--steps", "train.steps", "7", dict(type=int_in(1, MAX_STEPS))),
    ConfigFlag("--batch-size", "train.batch_size", "12", dict(type=int_in(1, 65536))),
    ConfigFlag("--lr", "train.lr", "0.003", dict(type=float_in(0, 1, True, True))),
    ConfigFlag(
        "--label-dropout", "diffusion.label_dropout", "0.2", dict(type=float_in(0, 1, False, True))
    ),
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
        dict(type=float_in(-5, 5), help="mean of n for logit-normal"),
    ),
    ConfigFlag(
        "--t-std",
        "diffusion.t_std",
        "0.75",
        dict(type=float_in(0, 5, lo_open=True), help="standard deviation of n"),
    ),
    ConfigFlag(
        "--t-uniform",
        "diffusion.t_uniform",
        "0.25",
        dict(
            type=float_in(0, 1, hi_open=True),
            help="for logit-normal: the fraction of timesteps drawn uniformly instead (a "
            "mixture; default 0)",
        ),
    ),
    ConfigFlag("--ema-decay", "train.ema_decay", "0.98", dict(type=float_in(0, 1, hi_open=True))),
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
        dict(type=int_in(0), help="steps between preview grids (0: off)"),
    ),
    ConfigFlag(
        "--checkpoint-every",
        "train.checkpoint_every",
        "3",
        dict(type=int_in(0), help="steps between checkpoints"),
    ),
    ConfigFlag("--keep", "train.keep", "5", dict(type=int_in(1), help="checkpoints kept on disk")),
    ConfigFlag(
        "--skip-nonfinite",
        "train.skip_nonfinite",
        "2",
        dict(
            type=int_in(0),
            help="skip up to N batches with a non-finite loss or gradient (default 0: stop)",
        ),
    ),
    ConfigFlag(
        "--eval-every",
        "train.eval_every",
        "4",
        dict(
            type=int_in(0),
            help="steps between small-N evaluations (FID, class accuracy) into eval.csv (0: off)",
        ),
    ),
    ConfigFlag(
        "--eval-n",
        "train.eval_n",
        "20",
        dict(type=int_in(10, 100_000), help="samples per evaluation (500)"),
    ),
    ConfigFlag("--seed", "train.seed", "3", dict(type=int_in(0, 2**31 - 1))),
)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in CONFIG_FLAGS:
        parser.add_argument(f.flag, dest=f.field, **f.kwargs)


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


def sampling_options(sp: argparse.ArgumentParser, required: bool = True, scale: bool = True):
    """Options shared by `sample`, `eval` and `sweep`: checkpoint, sampler, guidance variants.

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
        g = sp.add_mutually_exclusive_group(required=required)
        g.add_argument(
            "--scale", type=float_in(-20, 100), help="guidance scale s (1 = conditional)"
        )
        g.add_argument("--w", type=float_in(-21, 99), help="paper's guidance weight w = s - 1")
    sp.add_argument("--sampler", default="dpmpp-2m", choices=list(SAMPLERS))
    sp.add_argument("--steps", type=int_in(1, 100_000), default=20)
    sp.add_argument(
        "--spacing",
        default="trailing",
        choices=list(SPACINGS),
        help="which timesteps the sampler visits",
    )
    sp.add_argument(
        "--eta", type=float_in(0, 10), default=0.0, help="DDIM noise (0: deterministic)"
    )
    sp.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    sp.add_argument("--batch-size", type=int_in(1, 65536), help=BATCH_HELP)
    sp.add_argument(
        "--compile",
        default="auto",
        choices=list(COMPILE_CHOICES),
        help="torch.compile the network for sampling (CUDA graphs on CUDA; batches padded to one "
        "shape; eager fallback if compilation fails or its first output differs from eager). "
        f"auto: on for CPU jobs of at least {COMPILE_MIN_IMAGE_STEPS:,} image-steps, where the "
        "compilation pays off; off on CUDA until measured there",
    )
    device_options(sp)
    v = sp.add_argument_group("guidance variants (docs/guidance.md)")
    v.add_argument(
        "--guidance-interval",
        type=interval,
        metavar="LO,HI",
        help="guide only where LO < sigma_t <= HI, sigma_t = sqrt((1-alpha_bar)/alpha_bar)",
    )
    v.add_argument("--rescale", type=float_in(0, 1), default=0.0, help="phi of guidance rescale")
    v.add_argument("--negative-class", type=int_in(0), help="steer away from this class")
    v.add_argument("--guide-checkpoint", type=Path, help="autoguidance: a weaker checkpoint")
    v.add_argument("--threshold", default="static", choices=list(THRESHOLDS))
    v.add_argument("--threshold-percentile", type=float_in(0, 1, lo_open=True), default=0.995)
    v.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    v.add_argument("--apg-eta", type=float_in(-10, 10), default=0.0)
    v.add_argument("--apg-norm-threshold", type=float_in(0, 1e6), default=0.0)
    v.add_argument("--apg-momentum", type=float_in(-1, 1), default=0.0)


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


def refuse_writing_inputs(a: argparse.Namespace, *outputs: tuple[str, Path | None]) -> None:
    """Refuse, before any work, an output ((flag, path) pairs; None paths skipped) that is or
    lies inside one of the command's inputs: --checkpoint and --guide-checkpoint (the
    checkpoint, its run's checkpoints folder, or the model file), --samples, a --dataset
    folder, --inception."""
    from cfgdiff.checkpoint import input_paths
    from cfgdiff.data import DatasetName
    from cfgdiff.files import refuse_overlap

    inputs: list[tuple[str, Path]] = []
    for flag in ("checkpoint", "guide_checkpoint"):
        if getattr(a, flag, None) is not None:
            inputs += input_paths(getattr(a, flag))
    if getattr(a, "samples", None) is not None:
        inputs.append(("the samples", a.samples))
    if getattr(a, "inception", None) is not None:
        inputs.append(("the Inception network", a.inception))
    if getattr(a, "dataset", None) is not None:
        try:
            folder = DatasetName.parse(a.dataset).folder
        except CfgDiffError:  # a bad name: the command says why
            folder = None
        inputs.append(("the dataset folder", folder))
    for flag, out in outputs:
        if out is not None:
            refuse_overlap(out, inputs, flag)
