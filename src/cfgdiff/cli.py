"""The command-line interface: the one place where errors become messages and exit codes.

    cfgdiff train   --dataset mnist --out runs/NAME [--preset P] [--steps N] ...
    cfgdiff sample  --checkpoint PATH (--scale S | --w W) --out FILE.png|FILE.npz ...
    cfgdiff eval    --checkpoint PATH (--scale S | --w W) [--n N]   (class accuracy)
    cfgdiff sweep   --checkpoint PATH [--scales S,S,...] [--n N]   (metrics across scales)
    cfgdiff export  --checkpoint PATH --out FILE.safetensors        (one model file to ship)
    cfgdiff info    --checkpoint PATH                              (what a checkpoint holds)
    cfgdiff data    fetch NAME | info NAME

Exit status: 0 success; 2 bad input (one line on stderr, no traceback); 1 a run that could not go
on (non-finite loss, out of memory, disk full: one line saying what to change); 130 interrupted
twice; 141 the reader of its output went away (`| head`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import signal
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from cfgdiff.config import GUIDANCE_CONVENTION, MAX_STEPS, DiffusionConfig
from cfgdiff.errors import CfgDiffError, CheckpointError, ConfigError, RuntimeFault


class UsageError(CfgDiffError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


# ----------------------------------------------------------------- argument types


def _int_in(lo: int, hi: int | None = None):
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


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
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


def _duration(s: str) -> float:
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


def _classes(s: str) -> list[str]:
    """Comma-separated class names or indices; resolved against a checkpoint by _resolve_classes."""
    out = [p.strip() for p in s.split(",") if p.strip() != ""]
    if not out:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class names or indices, got {s!r}"
        )
    return out


def _resolve_classes(tokens: list[str], cfg) -> list[int]:
    """Each token is a class name of the checkpoint (a folder's sub-folder name, "Sneaker") or,
    failing that, a class index in [0, num_classes)."""
    names = cfg.label_names()
    k = cfg.model.num_classes
    out, bad = [], []
    for tok in tokens:
        if tok in names:
            out.append(names.index(tok))
        elif tok.lstrip("-").isdigit() and 0 <= int(tok) < k:
            out.append(int(tok))
        else:
            bad.append(tok)
    if bad and not cfg.class_names:
        raise ConfigError(
            f"--classes must be indices in [0, {k - 1}] for this checkpoint (it records no "
            f"class names), got {bad}"
        )
    if bad:
        shown = ", ".join(names[:20]) + (", ..." if k > 20 else "")
        raise ConfigError(
            f"--classes must be class names ({shown}) or indices in [0, {k - 1}] for this "
            f"checkpoint, got {bad}"
        )
    return out


BATCH_HELP = (
    "images per sampler batch (default: 64 on the CPU; on CUDA as many as fit in the free memory, "
    "measured, and halved if it still runs out; no effect on results)"
)


def _sampling_batch(given: int | None, net, cfg, device, precision: str) -> int:
    """CPU sampling is fastest in small batches (cache); GPUs want the largest that fits."""
    if given is not None:
        return given
    from cfgdiff.runtime import sampling_batch_size

    return sampling_batch_size(net, cfg.model, device, precision)


COMPILE_MIN_IMAGE_STEPS = 100_000  # bench/sample_throughput.py on 2 CPU cores: break-even ~40k


def _compile_sampling(choice: str, device, n_images: int, steps: int) -> bool:
    if choice != "auto":
        return choice == "on"
    return device.type == "cpu" and n_images * steps >= COMPILE_MIN_IMAGE_STEPS


# On 2 cores of an Intel Xeon with AMX the compiled cpu-demo step is 1.17x (fp32) to 1.23x (bf16)
# faster, and compiling it plus the gradient check costs ~70 s with a cold cache: break-even near
# 90,000 training images in bf16 (bench/results/compile_quality_cpu.log). Twice that leaves a
# clear gain. On 2 cores of an AMD EPYC with AVX512-BF16 and no AMX it is not faster (bf16
# 0.94-1.05x in three runs, fp32 0.89x; bench/results/precision_avx512bf16_cpu.log), so there
# auto trains eagerly whatever the length.
COMPILE_MIN_TRAIN_IMAGES = 200_000
COMPILE_TRAIN_CPU_FLAG = "amx_tile"


# ... which the cpu-demo network trains in ~800 s on the 2-core CPU (~250 images/s): the
# threshold for a run given --time instead of --steps.
COMPILE_MIN_TRAIN_SECONDS = 800


def _compile_training(
    choice: str,
    device,
    steps: int,
    batch_size: int,
    seconds: float | None = None,
    cpu_flags: Collection[str] | None = None,
) -> bool:
    """--compile for train: auto is on for CUDA, and on AMX CPUs for runs long enough to repay
    the compilation (not the 1000-step demo); `seconds` is a --time budget, `cpu_flags` this
    CPU's (read from Linux when None)."""
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return True
    if cpu_flags is None:
        from cfgdiff.runtime import cpu_flags as read_cpu_flags

        cpu_flags = read_cpu_flags()
    if COMPILE_TRAIN_CPU_FLAG not in cpu_flags:
        return False
    if seconds is not None:
        return seconds >= COMPILE_MIN_TRAIN_SECONDS
    return steps * batch_size >= COMPILE_MIN_TRAIN_IMAGES


# The settings of logit-normal training timesteps, which uniform ones ignore.
LOGIT_NORMAL_FIELDS = ("t_mean", "t_std", "t_uniform")


def _log(msg: str) -> None:
    print(f"cfgdiff: {msg}", file=sys.stderr)


# ----------------------------------------------------------------- parser


def sampling_opts(sp: argparse.ArgumentParser, required: bool = True, scale: bool = True) -> None:
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
            "--scale", type=_float_in(-20, 100), help="guidance scale s (1 = conditional)"
        )
        g.add_argument("--w", type=_float_in(-21, 99), help="paper's guidance weight w = s - 1")
    sp.add_argument("--sampler", default="dpmpp-2m", choices=["ddpm", "ddim", "dpmpp-2m"])
    sp.add_argument("--steps", type=_int_in(1, 100_000), default=20)
    sp.add_argument(
        "--spacing",
        default="trailing",
        choices=["trailing", "uniform", "quadratic", "logsnr"],
        help="which timesteps the sampler visits",
    )
    sp.add_argument(
        "--eta", type=_float_in(0, 10), default=0.0, help="DDIM noise (0: deterministic)"
    )
    sp.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    sp.add_argument("--batch-size", type=_int_in(1, 65536), help=BATCH_HELP)
    sp.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the network for sampling (CUDA graphs on CUDA; batches padded to one "
        "shape; eager fallback if compilation fails or its first output differs from eager). "
        "auto: on for CPU jobs of at least "
        f"{COMPILE_MIN_IMAGE_STEPS:,} image-steps, where the ~30 s of compilation pays off; off "
        "on CUDA until measured there",
    )
    sp.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    sp.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32",
    )
    v = sp.add_argument_group("guidance variants (see README)")
    v.add_argument(
        "--guidance-interval",
        type=_interval,
        metavar="LO,HI",
        help="guide only where LO < sigma_t <= HI, sigma_t = sqrt((1-alpha_bar)/alpha_bar)",
    )
    v.add_argument("--rescale", type=_float_in(0, 1), default=0.0, help="phi of guidance rescale")
    v.add_argument("--negative-class", type=_int_in(0), help="steer away from this class")
    v.add_argument("--guide-checkpoint", type=Path, help="autoguidance: a weaker checkpoint")
    v.add_argument("--threshold", default="static", choices=["static", "dynamic", "none"])
    v.add_argument("--threshold-percentile", type=_float_in(0, 1, lo_open=True), default=0.995)
    v.add_argument("--apg", action="store_true", help="adaptive projected guidance")
    v.add_argument("--apg-eta", type=_float_in(-10, 10), default=0.0)
    v.add_argument("--apg-norm-threshold", type=_float_in(0, 1e6), default=0.0)
    v.add_argument("--apg-momentum", type=_float_in(-1, 1), default=0.0)


def _dataset_name(name: str) -> str:
    """--dataset as given, but folder:~/x and folder:x made absolute (checked later)."""
    from cfgdiff.data import canonical_name

    return canonical_name(name)


def eval_opts(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--dataset",
        type=_dataset_name,
        help="reference data (default: the checkpoint's; for train-classifier: required)",
    )
    sp.add_argument(
        "--features",
        default="classifier",
        choices=["classifier", "inception"],
        help="feature space of FID/KID/precision/recall: the dataset's own classifier (fast, "
        "offline) or the standard FID Inception-v3 (RGB-comparable with published numbers)",
    )
    sp.add_argument("--inception", type=Path, help="a local copy of the FID Inception network")
    sp.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where datasets, classifiers and models are cached",
    )


def _floats(s: str) -> list[float]:
    try:
        out = [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(not -20 <= v <= 100 for v in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct numbers in [-20, 100], got {s!r}")
    return out


def _interval(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {s!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {s!r}")
    return lo, hi


def build_parser() -> Parser:
    from cfgdiff.config import PRESETS

    p = Parser(
        prog="cfgdiff", description="Class-conditional diffusion with classifier-free guidance."
    )
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    sub.required = True

    def data_opts(sp):
        sp.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="where datasets are found and cached (default $CFGDIFF_DATA_DIR or "
            "~/.cache/cfgdiff/data)",
        )

    tr = sub.add_parser("train", help="train a model")
    tr.add_argument(
        "--dataset",
        type=_dataset_name,
        help="mnist | fashion-mnist | cifar10 | folder:PATH (default: mnist; with --resume, the "
        "run's)",
    )
    data_opts(tr)
    tr.add_argument("--out", type=Path, required=True, help="run folder")
    tr.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="named configuration (default cpu-demo; on --resume the checkpoint's)",
    )
    tr.add_argument("--steps", type=_int_in(1, MAX_STEPS))
    tr.add_argument(
        "--time",
        type=_duration,
        help="train for about this long instead of --steps (90, 90s, 5m, 1.5h): the step count, "
        "and so the LR schedule, is sized to it from the speed of the first 25 steps; previews, "
        "evaluations and checkpoints come on top",
    )
    tr.add_argument("--batch-size", type=_int_in(1, 65536))
    tr.add_argument("--lr", type=_float_in(0, 1, lo_open=True, hi_open=True))
    tr.add_argument("--label-dropout", type=_float_in(0, 1, hi_open=True))
    tr.add_argument(
        "--t-sampling",
        choices=["uniform", "logit-normal"],
        help="training timesteps: uniform, or t/T = sigmoid(n), n ~ N(--t-mean, --t-std) "
        "(default: the preset's: cpu-demo's is logit-normal (0.5, 1) with 0.5 uniform, but "
        "uniform on fashion-mnist, where it measured better; every other preset's uniform)",
    )
    tr.add_argument("--t-mean", type=_float_in(-5, 5), help="mean of n for logit-normal")
    tr.add_argument("--t-std", type=_float_in(0, 5, lo_open=True), help="standard deviation of n")
    tr.add_argument(
        "--t-uniform",
        type=_float_in(0, 1, hi_open=True),
        help="for logit-normal: the fraction of timesteps drawn uniformly instead (a mixture; "
        "default 0)",
    )
    tr.add_argument("--ema-decay", type=_float_in(0, 1, hi_open=True))
    tr.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        help="mirror training images at random (default: on for cifar10, off for digits, "
        "clothes and folders: for a folder of photos, where left and right mean the same, pass "
        "--hflip)",
    )
    tr.add_argument("--sample-every", type=_int_in(0), help="steps between preview grids (0: off)")
    tr.add_argument("--checkpoint-every", type=_int_in(0), help="steps between checkpoints")
    tr.add_argument("--keep", type=_int_in(1), help="checkpoints kept on disk")
    tr.add_argument(
        "--skip-nonfinite",
        type=_int_in(0),
        help="skip up to N batches with a non-finite loss or gradient (default 0: stop)",
    )
    tr.add_argument(
        "--eval-every",
        type=_int_in(0),
        help="steps between small-N evaluations (FID, class accuracy) into eval.csv (0: off)",
    )
    tr.add_argument("--eval-n", type=_int_in(10, 100_000), help="samples per evaluation (500)")
    tr.add_argument("--image-size", type=_int_in(8, 1024), help="resize images to this side")
    tr.add_argument("--channels", type=int, choices=[1, 3], help="1 or 3 (default: the data's)")
    tr.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    tr.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32",
    )
    tr.add_argument("--seed", type=_int_in(0, 2**31 - 1))
    tr.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the training step (auto: on for CUDA; on CPUs with AMX for runs of "
        f"at least {COMPILE_MIN_TRAIN_IMAGES:,} training images, where the ~70 s of compilation "
        "pays off, so not for the demo; it did not pay off on the AVX512-BF16 CPU measured); "
        "its gradients are checked "
        "against eager on the first batch, and training falls back to eager if they differ or "
        "compilation fails",
    )
    tr.add_argument(
        "--channels-last",
        action="store_true",
        help="NHWC memory format (measure: not always faster)",
    )
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="generate images from a checkpoint")
    sampling_opts(sa)
    sa.add_argument(
        "--classes",
        type=_classes,
        help="comma-separated class names or indices, one grid row each (default: all)",
    )
    sa.add_argument("--per-class", type=_int_in(1, 100_000), default=8)
    sa.add_argument(
        "--out",
        type=Path,
        required=True,
        help="FILE.png (grid), FILE.npz (arrays) or a new or empty FOLDER (FOLDER/CLASS/NNNNN.png, "
        "one PNG per image, plus settings.json)",
    )

    ev = sub.add_parser(
        "eval",
        help="FID, KID, IS, precision/recall, class accuracy and memorisation of samples",
        description="cfgdiff eval --checkpoint PATH (--scale S | --w W) [--n N]  or  "
        "cfgdiff eval --samples FILE.npz|FOLDER --dataset NAME  or  "
        "cfgdiff eval train-classifier --dataset NAME",
    )
    ev.add_argument("action", nargs="?", choices=["train-classifier"], help=argparse.SUPPRESS)
    sampling_opts(ev, required=False)
    ev.add_argument(
        "--samples",
        type=Path,
        help="measure these samples instead of sampling a checkpoint: an .npz (images, labels, "
        "class_names, as `cfgdiff sample` writes) or a folder of class sub-folders of images; "
        "needs --dataset (the real data to compare with)",
    )
    ev.add_argument(
        "--n", type=_int_in(10, 1_000_000), help="samples in total (default 1000; --samples: all)"
    )
    ev.add_argument("--json", type=Path, help="also write the results here")
    ev.add_argument(
        "--image-size",
        type=_int_in(8, 1024),
        help="train-classifier only: resize images to this side (default: native; a folder of "
        "mixed sizes needs it)",
    )
    ev.add_argument(
        "--retrain",
        action="store_true",
        help="train-classifier only: train the judge even if one is cached or ships with "
        "cfgdiff (MNIST's), replacing the cached one",
    )
    eval_opts(ev)

    sw = sub.add_parser("sweep", help="metrics across guidance scales: CSV, JSON and plots")
    sampling_opts(sw, scale=False)
    g = sw.add_mutually_exclusive_group()
    g.add_argument("--scales", type=_floats, default=None, help="comma-separated scales s")
    g.add_argument("--ws", type=_floats, help="comma-separated paper weights w = s - 1")
    sw.add_argument("--n", type=_int_in(10, 1_000_000), default=5000, help="samples per scale")
    sw.add_argument("--out", type=Path, help="output folder (default: RUN/sweep)")
    eval_opts(sw)

    inf_ = sub.add_parser(
        "info",
        help="what a checkpoint or model file holds (and verify it)",
        description="cfgdiff info --checkpoint PATH [--json]",
    )
    inf_.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint folder, run folder or model file"
    )
    inf_.add_argument("--json", action="store_true", help="print the whole config as JSON")

    ex = sub.add_parser(
        "export",
        help="one .safetensors model file to ship: EMA weights + config (sample/eval take it)",
        description="cfgdiff export --checkpoint PATH --out FILE.safetensors [--raw]",
    )
    ex.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run folder")
    ex.add_argument("--out", type=Path, required=True, help="the model file (.safetensors)")
    ex.add_argument(
        "--raw", action="store_true", help="the raw weights instead of the EMA ones (sampling)"
    )
    ex.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="storage type of the weights (fp16/bf16: half the file; loaded back as fp32)",
    )

    da = sub.add_parser("data", help="obtain datasets and show where they are")
    dsub = da.add_subparsers(dest="data_command", parser_class=Parser, metavar="ACTION")
    dsub.required = True
    fe = dsub.add_parser("fetch", help="obtain, verify and cache a dataset")
    fe.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    data_opts(fe)
    inf = dsub.add_parser("info", help="files, counts per class and checksums")
    inf.add_argument(
        "name", type=_dataset_name, help="mnist | fashion-mnist | cifar10 | folder:PATH"
    )
    data_opts(inf)
    return p


# ----------------------------------------------------------------- commands


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second SIGINT: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        _log(
            "stop requested: finishing this step and writing a checkpoint "
            "(Ctrl-C again to quit now)"
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self) -> bool:
        return self.requested


def _out_folder(path: Path) -> Path:
    """--out of a command that writes a folder: refuse an existing file before any work."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file; --out names a folder here")
    return path


def cmd_train(a: argparse.Namespace) -> int:
    from cfgdiff import checkpoint as ckpt_io
    from cfgdiff.config import get_preset
    from cfgdiff.data import check_name, load_dataset
    from cfgdiff.runtime import describe_machine, resolve_device, resolve_precision
    from cfgdiff.train import config_for_dataset, train

    if a.dataset is not None:
        check_name(a.dataset)
    if a.time is not None and (a.steps is not None or a.resume):
        other = "--steps" if a.steps is not None else "--resume"
        raise ConfigError(
            f"--time {a.time:g} s: not with {other} (--time sizes a new run's step count; a "
            "resumed run keeps its own, and --steps extends it)"
        )
    _out_folder(a.out)
    device = resolve_device(a.device)
    machine = describe_machine(device)
    if a.resume:
        found = ckpt_io.latest_checkpoint(a.out / "checkpoints")
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {a.out / 'checkpoints'}")
        base = ckpt_io.read_config(found)
        if a.preset is not None and a.preset != base.preset:
            raise ConfigError(f"--preset {a.preset}: the run was trained with preset {base.preset}")
        a.dataset = a.dataset or base.dataset
    else:
        a.dataset = a.dataset or "mnist"
        # The preset's fields for this dataset (PRESET_BY_DATASET), unless the timestep law is
        # the user's: then it starts from the preset's own, as on any dataset.
        law_given = any(getattr(a, k) is not None for k in ("t_sampling", *LOGIT_NORMAL_FIELDS))
        name = a.preset or "cpu-demo"
        own, base = get_preset(name), get_preset(name, None if law_given else a.dataset)
        if base.diffusion != own.diffusion:
            _log(
                f"{name} on {a.dataset}: {base.diffusion.t_sampling} timesteps, measured better "
                f"there than the preset's {own.diffusion.t_sampling} law "
                "(README; --t-sampling chooses)"
            )
    overrides = {
        k: getattr(a, k)
        for k in (
            "eval_every",
            "eval_n",
            "skip_nonfinite",
            "steps",
            "batch_size",
            "lr",
            "ema_decay",
            "sample_every",
            "checkpoint_every",
            "keep",
            "seed",
            "hflip",
        )
        if getattr(a, k) is not None
    }
    tcfg = dataclasses.replace(base.train, **overrides)
    dcfg = dataclasses.replace(
        base.diffusion,
        **{
            k: getattr(a, k)
            for k in ("label_dropout", "t_sampling", "t_mean", "t_std", "t_uniform")
            if getattr(a, k) is not None
        },
    )
    if a.t_sampling == "uniform" and not a.resume:
        # a new run asking for uniform timesteps records none of the preset's logit-normal
        # settings (cpu-demo's), so its config is that of a preset that never had them
        unset = DiffusionConfig()
        dcfg = dataclasses.replace(dcfg, **{f: getattr(unset, f) for f in LOGIT_NORMAL_FIELDS})
    if dcfg.t_sampling == "uniform":
        given = [f for f in LOGIT_NORMAL_FIELDS if getattr(a, f) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(
                f"{flag} {getattr(a, given[0]):g}: applies to --t-sampling logit-normal only "
                "(this run's timesteps are uniform)"
            )
    cfg = dataclasses.replace(base, train=tcfg, diffusion=dcfg)
    # A resumed run reads its data at the checkpoint's size and channels; a new run at the data's
    # own unless --image-size / --channels say otherwise.
    data = load_dataset(
        a.dataset,
        a.data_dir,
        image_size=a.image_size or (base.model.image_size if a.resume else None),
        channels=a.channels or (base.model.in_channels if a.resume else None),
        log=_log,
    )
    cfg = config_for_dataset(cfg, data, a.dataset)
    bar = None
    total: list[int | str] = ["?" if a.time is not None else cfg.train.steps]  # for log lines
    show = not a.no_progress and sys.stderr.isatty()

    kept_precision: str | None = None  # the line for a resume that keeps the run's precision

    def note(msg: str) -> None:
        """A line on stderr above the progress bar (tqdm.write defaults to stdout)."""
        bar.write(f"cfgdiff: {msg}", file=sys.stderr) if bar is not None else _log(msg)

    def on_event(name: str, info: dict) -> None:
        nonlocal bar
        if name == "start":
            if kept_precision is not None:
                _log(kept_precision)
            end = info["total"] or f"sized to --time {a.time:g} s after 25 steps"
            _log(
                f"training {info['params'] / 1e6:.2f}M parameters on {info['device']}: "
                f"{machine}, {info['precision']}, {len(data)} images, step {info['step']} -> {end}"
            )
            if show:
                from tqdm import tqdm

                bar = tqdm(
                    total=info["total"],
                    initial=info["step"],
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        elif name == "schedule":
            total[0] = info["total"]
            msg = (
                f"--time {info['budget_s']:g} s: {info['total']} steps "
                f"({info['steps_per_s']:.2f} steps/s over steps 5-25)"
            )
            if bar is not None:
                bar.total = info["total"]
            note(msg)
        elif name == "step":
            if bar is not None:
                bar.update(1)
                if info["loss"] is not None:
                    bar.set_postfix(
                        loss=f"{info['loss']:.4f}",
                        img_s=f"{info['images_per_s']:.0f}",
                        refresh=False,
                    )
            elif not show and info["step"] % cfg.train.log_every == 0 and info["loss"] is not None:
                _log(
                    f"step {info['step']}/{total[0]} loss {info['loss']:.4f} "
                    f"{info['images_per_s']:.0f} img/s"
                )
        elif name in ("sample", "checkpoint", "strip") and bar is None:
            _log(f"{name}: {info['path']}")
        elif name in ("skip", "compile"):
            msg = (
                f"skipped a batch with a non-finite loss at step {info['step']} "
                f"({info['skipped']} so far)"
                if name == "skip"
                else f"torch.compile: gradients match eager ({info['check']})"
                if info["ok"]
                else f"torch.compile not used, training eagerly: {info['error']}"
            )
            note(msg)
        elif name == "data_changed":
            note(
                f"--resume: the training data changed since the checkpoint ({info['was']:,} "
                f"images then, {info['now']:,} now); training goes on with the data as it is "
                "now, so the run will not repeat an uninterrupted one exactly"
            )
        elif name == "eval":
            msg = f"eval at step {info['step']}: FID {info['fid']:.3f}, class accuracy "
            msg += f"{info['class_accuracy']:.4f} (s={cfg.train.preview_scale:g})"
            note(msg)

    precision = resolve_precision(a.precision, device)
    if a.resume and a.precision == "auto":
        # A resumed run keeps the precision it trained with on this kind of device, even where
        # auto now picks another (a newer policy, another CPU): its loss trace goes on as it was.
        # Said once training starts (after the resume's own checks).
        try:
            was = ckpt_io.recorded_precision(found)
        except CheckpointError:  # unreadable: train() verifies the checkpoint and says why
            was = None
        if was is not None and was[0] == device.type and was[1] != precision:
            kept_precision = (
                f"--precision auto: {was[1]}, as the run trained (auto would pick {precision} "
                f"here; pass --precision {precision} to switch)"
            )
            precision = was[1]
    evaluator = None
    if cfg.train.eval_every:
        evaluator = _training_evaluator(cfg, a, device, precision)
    t0 = time.perf_counter()
    with StopFlag() as stop:
        try:
            res = train(
                cfg,
                a.out,
                data,
                device=device,
                precision=precision,
                resume=a.resume,
                on_event=on_event,
                should_stop=stop,
                evaluator=evaluator,
                compile=_compile_training(
                    a.compile, device, cfg.train.steps, cfg.train.batch_size, a.time
                ),
                channels_last=a.channels_last,
                time_budget=a.time,
            )
        finally:
            if bar is not None:
                bar.close()
    out = a.out
    if res.stopped_early:
        print(f"stopped at step {res.step}; checkpoint {res.checkpoint}")
        print(f"resume with: cfgdiff train --out {out} --resume")
        return 0
    total = time.perf_counter() - t0
    lines = [
        f"done: {res.step} steps in {total:.0f} s "
        f"({res.images_per_s:.0f} images/s), final loss {res.last_loss:.4f}",
        f"  time:            {res.train_s:.0f} s training"
        f"{f' (--time {a.time:g} s)' if a.time is not None else ''}, "
        f"{res.aside_s:.0f} s previews, checkpoints and evaluations, "
        f"{max(0.0, total - res.train_s - res.aside_s):.0f} s loading data",
        f"  machine:         {device.type}: {machine}",
        f"  checkpoint:      {res.checkpoint}",
        f"  sample grids:    {out / 'samples'}/step-*.png  "
        f"(rows = classes, s={cfg.train.preview_scale:g}; real images in {out / 'real.png'})",
        f"  guidance strip:  {out / 'guidance_strip.png'}  (rows = classes, columns = s 0,1,2,3,5)",
        f"  loss curve:      {out / 'loss.png'}  and  {out / 'loss.csv'}",
        f"  class accuracy:  cfgdiff eval --checkpoint {out} --scale 3 --json {out}/eval_s3.json",
        f"  model file:      cfgdiff export --checkpoint {out} --out {out}/model.safetensors",
    ]
    print("\n".join(lines))
    from cfgdiff.data.download import atomic_write_bytes

    atomic_write_bytes(out / "SUMMARY.txt", ("\n".join(lines) + "\n").encode())
    return 0


def _training_evaluator(cfg, a: argparse.Namespace, device, precision: str):
    """Small-N evaluation during training: eval_n samples at the preview scale, classifier
    features, against a reference built once."""
    import torch

    from cfgdiff.metrics.evaluate import build_reference, measure
    from cfgdiff.sample import generate

    t = cfg.train
    ref = build_reference(
        cfg,
        t.eval_n,
        dataset=a.dataset,
        data_dir=a.data_dir,
        device=device,
        log=_log,
        n_arg="--eval-n",
    )
    labels = torch.arange(t.eval_n) % cfg.model.num_classes

    batch: list[int] = []

    def evaluate(net) -> dict[str, float]:
        if not batch:  # measured once, on the first evaluation
            batch.append(_sampling_batch(None, net, cfg, device, precision))
        images = generate(
            net,
            cfg,
            labels,
            scale=t.preview_scale,
            sampler=t.preview_sampler,
            steps=t.preview_steps,
            seed=0,
            batch_size=batch[0],
            device=device,
            precision=precision,
        )
        m = measure(ref, images, labels)
        return {k: m[k] for k in ("fid", "class_accuracy", "precision", "recall", "is")}

    return evaluate


def _scale(a: argparse.Namespace) -> tuple[float, str]:
    from cfgdiff.guidance import scale_from_w

    if a.w is not None:
        return scale_from_w(a.w), "w"
    return a.scale, "scale"


def _guidance(a: argparse.Namespace, loaded, scale: float, device):
    """The Guidance the options ask for, and a plain-data record of it for output files; also
    checks --steps against the checkpoint, so that every sampling option is checked here."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.guidance import APG, Guidance
    from cfgdiff.sample import check_steps

    guide_net = None
    if a.guide_checkpoint is not None:
        guide = load_for_sampling(a.guide_checkpoint, device, arg="--guide-checkpoint")
        m, gm = loaded.cfg, guide.cfg
        for field in ("in_channels", "image_size", "num_classes"):
            if getattr(m.model, field) != getattr(gm.model, field):
                raise ConfigError(
                    f"--guide-checkpoint {a.guide_checkpoint}: model.{field}="
                    f"{getattr(gm.model, field)}, the checkpoint has {getattr(m.model, field)}"
                )
        for field in ("prediction", "schedule", "timesteps"):
            if getattr(m.diffusion, field) != getattr(gm.diffusion, field):
                raise ConfigError(
                    f"--guide-checkpoint {a.guide_checkpoint}: diffusion.{field}="
                    f"{getattr(gm.diffusion, field)}, the checkpoint has "
                    f"{getattr(m.diffusion, field)}"
                )
        guide_net = guide.net
    apg = None
    if a.apg:
        apg = APG(eta=a.apg_eta, norm_threshold=a.apg_norm_threshold, momentum=a.apg_momentum)
    g = Guidance(
        scale=scale,
        interval=a.guidance_interval,
        rescale=a.rescale,
        negative_class=a.negative_class,
        guide_net=guide_net,
        threshold=a.threshold,
        threshold_percentile=a.threshold_percentile,
        apg=apg,
    )
    g.validate(loaded.cfg.model.num_classes)
    check_steps(a.steps, loaded.cfg)  # before any compilation, batch-size probe or reference
    record = {
        "scale": scale,
        "w": scale - 1,
        "convention": GUIDANCE_CONVENTION,
        "sampler": a.sampler,
        "steps": a.steps,
        "spacing": a.spacing,
        "eta": a.eta,
        "seed": a.seed,
        "checkpoint": str(loaded.path),
        "guidance_interval": list(a.guidance_interval) if a.guidance_interval else None,
        "rescale": a.rescale,
        "negative_class": a.negative_class,
        "guide_checkpoint": str(a.guide_checkpoint) if a.guide_checkpoint else None,
        "threshold": a.threshold,
        "threshold_percentile": a.threshold_percentile,
        "apg": dataclasses.asdict(apg) if apg else None,
    }
    return g, record


def _generate(a: argparse.Namespace, loaded, labels, guidance, device, indices=None):
    """Sample `labels` with the sampler options shared by `sample`, `eval` and `sweep`.

    A batch size chosen here (no --batch-size) that runs out of memory is halved and the
    sampling retried: images do not depend on the batch size (sample.py), so the result is the
    same. A --batch-size the user gave is kept, and running out of memory is an error."""
    from cfgdiff.runtime import CompiledForward, is_out_of_memory, resolve_precision
    from cfgdiff.sample import generate

    precision = resolve_precision(a.precision, device)
    batch_size = _sampling_batch(a.batch_size, loaded.net, loaded.cfg, device, precision)
    compiled = _compile_sampling(a.compile, device, len(labels), a.steps)
    net = CompiledForward(loaded.net, device) if compiled else loaded.net
    while True:
        try:
            images = generate(
                net,
                loaded.cfg,
                labels,
                guidance=guidance,
                sampler=a.sampler,
                steps=a.steps,
                eta=a.eta,
                spacing=a.spacing,
                seed=a.seed,
                batch_size=batch_size,
                indices=indices,
                device=device,
                precision=precision,
                static_batches=compiled,
            )
            break
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if a.batch_size is not None or batch_size == 1:
                raise RuntimeFault(
                    f"out of memory sampling {batch_size} images per batch on {device}: "
                    "lower --batch-size (nothing was written)"
                ) from None
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        _log(f"out of memory at {batch_size} images per batch; retrying with {batch_size // 2}")
        batch_size //= 2
    if compiled and net.fallback_reason:
        _log(f"torch.compile not used, sampled eagerly: {net.fallback_reason}")
    return images


def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np

    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.data.download import atomic_write_bytes
    from cfgdiff.runtime import resolve_device
    from cfgdiff.sample import class_grid_labels
    from cfgdiff.viz import labelled_grid, save_png, write_image_folder

    suffix = a.out.suffix.lower()
    to_folder = a.out.is_dir() or (suffix == "" and not a.out.exists())
    if to_folder and a.out.is_dir() and any(a.out.iterdir()):
        raise ConfigError(
            f"--out {a.out}: folder is not empty (a folder of images is written only into a new "
            "or empty one)"
        )
    if not to_folder and suffix not in (".png", ".npz"):
        raise ConfigError(
            f"--out must end in .png (grid) or .npz (arrays), or name a new or empty folder "
            f"(one PNG per image), got {a.out}"
        )
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    k = loaded.cfg.model.num_classes
    classes = _resolve_classes(a.classes, loaded.cfg) if a.classes is not None else list(range(k))
    scale, given = _scale(a)
    guidance, record = _guidance(a, loaded, scale, device)
    labels = class_grid_labels(classes, a.per_class)
    t0 = time.perf_counter()
    images = _generate(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if to_folder:
        settings = {**record, "given": given}
        write_image_folder(images, labels.tolist(), loaded.cfg.label_names(), a.out, settings)
    elif suffix == ".png":
        names = loaded.cfg.label_names()
        save_png(labelled_grid(images, a.per_class, [names[c][:12] for c in classes]), a.out)
    else:  # labels are class indices; class_names[i] names index i
        buf = io.BytesIO()
        np.savez(
            buf,
            images=images.numpy(),
            labels=labels.numpy(),
            class_names=np.array(loaded.cfg.label_names(), dtype=np.str_),
            scale=np.float64(scale),
            w=np.float64(scale - 1),
            convention=np.str_(GUIDANCE_CONVENTION),
            given=np.str_(given),
            sampler=np.str_(a.sampler),
            steps=np.int64(a.steps),
            eta=np.float64(a.eta),
            seed=np.int64(a.seed),
            checkpoint=np.str_(str(loaded.path)),
            settings=np.str_(json.dumps(record)),  # everything, guidance variants included
        )
        atomic_write_bytes(a.out, buf.getvalue())
    where = f"{a.out}/CLASS/NNNNN.png" if to_folder else a.out
    print(
        f"wrote {len(labels)} images to {where} (s={scale:g}, w={scale - 1:g}, {a.sampler} "
        f"{a.steps} steps, seed {a.seed}; {len(labels) / dt:.1f} images/s)"
    )
    return 0


METRIC_ROWS = [
    ("fid", "FID", "{:.3f}"),
    ("kid", "KID", "{:.5f}"),
    ("is", "IS (classifier)", "{:.3f}"),
    ("precision", "precision (k=3)", "{:.3f}"),
    ("recall", "recall (k=3)", "{:.3f}"),
    ("class_accuracy", "class accuracy", "{:.4f}"),
    ("memorisation", "memorised", "{:.4f}"),
]


def _metrics_table(columns: dict[str, dict], features: str) -> str:
    head = f"{'metric (' + features + ' features)':34s}" + "".join(f"{c:>14s}" for c in columns)
    lines = [head]
    for key, label, fmt in METRIC_ROWS:
        lines.append(
            f"{label:34s}" + "".join(f"{fmt.format(v[key]):>14s}" for v in columns.values())
        )
    return "\n".join(lines)


def cmd_train_classifier(a: argparse.Namespace) -> int:
    from cfgdiff.data import check_name
    from cfgdiff.metrics.classifier import classifier_path, get_classifier
    from cfgdiff.runtime import resolve_device

    if a.dataset is None:
        raise ConfigError("eval train-classifier: --dataset is required")
    check_name(a.dataset)
    device = resolve_device(a.device)
    _, meta = get_classifier(
        a.dataset, a.data_dir, device=device, log=_log, image_size=a.image_size, retrain=a.retrain
    )
    path = classifier_path(a.data_dir or _default_data_dir(), a.dataset)
    epochs = meta.get("epochs_trained", meta["epochs"])  # (cached before the step floor: epochs)
    how = f"{meta['train_seconds']} s", f"{meta['precision']}, {epochs} epochs"
    made = f"trained in {how[0]} ({how[1]})"
    if meta.get("source") == "shipped":
        here = meta["test_accuracy_here"]
        made = f"{here:.4f} on this test split; shipped with cfgdiff (trained in {', '.join(how)})"
    print(
        f"{a.dataset}: test accuracy {meta['test_accuracy']:.4f}, {made}, weights "
        f"sha256 {meta['weights_sha256'][:16]}..., cached at {path}.safetensors"
    )
    return 0


def _default_data_dir():
    from cfgdiff.data import default_data_dir

    return default_data_dir()


def _reference(a: argparse.Namespace, loaded, device):
    """The real reference that eval and sweep compare n samples against."""
    from cfgdiff.metrics.evaluate import build_reference

    return build_reference(
        loaded.cfg,
        a.n,
        dataset=a.dataset,
        features=a.features,
        data_dir=a.data_dir,
        inception=a.inception,
        device=device,
        log=_log,
    )


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.runtime import describe_machine, resolve_device

    if a.action == "train-classifier":
        return cmd_train_classifier(a)
    if a.image_size is not None:
        raise ConfigError(
            f"--image-size {a.image_size}: only for eval train-classifier (samples are judged "
            "at the classifier's size)"
        )
    if a.retrain:
        raise ConfigError("--retrain: only for eval train-classifier")
    if a.samples is not None:
        return _eval_samples(a)
    a.n = a.n or 1000
    if a.checkpoint is None:
        raise ConfigError("eval: --checkpoint is required (or use: eval train-classifier)")
    if a.scale is None and a.w is None:
        raise ConfigError("eval: one of --scale or --w is required")
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    scale, _ = _scale(a)
    # The options first: building the reference may train a classifier for minutes.
    guidance, record = _guidance(a, loaded, scale, device)
    ref = _reference(a, loaded, device)
    labels = torch.arange(a.n) % loaded.cfg.model.num_classes
    t0 = time.perf_counter()
    images = _generate(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    head = (
        f"{a.n} samples at s={scale:g} (w={scale - 1:g}), {a.sampler} {a.steps} steps, "
        f"{a.n / dt:.1f} images/s; real floor: {a.n} held-out vs {a.n} training images"
    )
    record = {
        **record,
        "n": a.n,
        "sampling_images_per_s": a.n / dt,
        "device": device.type,
        "machine": describe_machine(device),
    }
    _eval_report(a, ref, images, labels, loaded.cfg.label_names(), head, record)
    return 0


def _eval_report(a, ref, images, labels, names, head: str, record: dict) -> None:
    """Measure `images` (asked for `labels`) and the real floor against `ref`; print the table,
    the per-class accuracy and the judge; write --json (`record` first, then the results)."""
    from cfgdiff.metrics.evaluate import floor, measure

    gen = measure(ref, images, labels)
    real = floor(ref)
    result = {
        **record,
        "dataset": ref.dataset,
        "features": a.features,
        "classifier_test_accuracy": ref.classifier_meta["test_accuracy"],
        "generated": gen,
        "real_floor": real,
        # flat copies of the headline numbers
        "class_accuracy": gen["class_accuracy"],
        "fid": gen["fid"],
    }
    print(head)
    print(_metrics_table({"generated": gen, "real floor": real}, a.features))
    print(
        "class accuracy per class: "
        + ", ".join(f"{names[c]} {v:.3f}" for c, v in enumerate(gen["per_class_accuracy"]))
    )
    print(
        f"(judge: {ref.dataset} classifier, test accuracy {result['classifier_test_accuracy']:.4f})"
    )
    if a.json is not None:
        from cfgdiff.data.download import atomic_write_bytes

        atomic_write_bytes(a.json, json.dumps(result, indent=1).encode())


def _eval_samples(a: argparse.Namespace) -> int:
    """eval --samples: the same report for images made elsewhere (another sampler, another
    tool's model), against --dataset, at the samples' size and channels."""
    from cfgdiff.config import PRESETS
    from cfgdiff.data import class_names_of, load_dataset
    from cfgdiff.metrics.evaluate import build_reference, read_samples
    from cfgdiff.runtime import resolve_device
    from cfgdiff.train import config_for_dataset

    if a.checkpoint is not None or a.scale is not None or a.w is not None:
        raise ConfigError("--samples: not with --checkpoint, --scale or --w (nothing is sampled)")
    if a.n is not None:
        raise ConfigError("--samples: not with --n (every sample in the file or folder is used)")
    if a.dataset is None:
        raise ConfigError("--samples: --dataset is required (the real data to compare with)")
    device = resolve_device(a.device)
    images, labels = read_samples(a.samples, class_names_of(a.dataset, a.data_dir, log=_log))
    n, c, h, w = images.shape
    if h != w or c not in (1, 3) or not 8 <= h <= 1024:
        raise ConfigError(
            f"--samples {a.samples}: images must be square, 8 to 1024 pixels, with 1 or 3 "
            f"channels, got {c}x{h}x{w}"
        )
    if n < 10:
        raise ConfigError(f"--samples {a.samples}: at least 10 samples are needed, got {n}")
    # A stand-in config: the reference is read at the samples' size and channels, as it would be
    # for a model that made them (so a folder of mixed sizes is fine, as in training, and
    # build_reference's own read of it hits the decoded-folder cache); hflip as the dataset's
    # default (for memorisation).
    data = load_dataset(a.dataset, a.data_dir, image_size=h, channels=c, log=_log)
    cfg = config_for_dataset(PRESETS["tiny"], data, a.dataset)
    ref = build_reference(
        cfg,
        n,
        features=a.features,
        data_dir=a.data_dir,
        inception=a.inception,
        device=device,
        log=_log,
        n_arg="the number of --samples",
    )
    head = f"{n} samples from {a.samples}; real floor: {n} held-out vs {n} training images"
    record = {"samples": str(a.samples), "n": n}
    _eval_report(a, ref, images, labels, data.class_names, head, record)
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    import csv

    import torch

    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.data.download import atomic_write_bytes
    from cfgdiff.metrics.evaluate import floor, measure
    from cfgdiff.runtime import resolve_device, resolve_precision
    from cfgdiff.train import guidance_strip
    from cfgdiff.viz import line_plot, save_png

    scales = [w + 1 for w in a.ws] if a.ws else (a.scales or [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    if a.out is not None:
        out = _out_folder(a.out)
    elif loaded.path.is_file():  # a model file: FILE-sweep beside it
        out = loaded.path.with_name(loaded.path.stem + "-sweep")
    else:  # RUN/checkpoints/step-N -> RUN/sweep
        out = loaded.path.parent.parent / "sweep"
    # The options first: building the reference may train a classifier for minutes.
    g, record = _guidance(a, loaded, 1.0, device)
    ref = _reference(a, loaded, device)
    out.mkdir(parents=True, exist_ok=True)
    k = loaded.cfg.model.num_classes
    per_sample = torch.tensor([s for s in scales for _ in range(a.n)], dtype=torch.float32)
    labels = (torch.arange(a.n) % k).repeat(len(scales))
    indices = list(range(a.n)) * len(scales)  # the same noise at every scale
    t0 = time.perf_counter()
    images = _generate(
        a, loaded, labels, dataclasses.replace(g, scale=per_sample), device, indices=indices
    )
    dt = time.perf_counter() - t0
    rows = []
    for i, s in enumerate(scales):
        m = measure(ref, images[i * a.n : (i + 1) * a.n], labels[: a.n])
        rows.append(
            {
                "scale": s,
                "w": s - 1,
                **{key: m[key] for key, _, _ in METRIC_ROWS},
                "kid_std": m["kid_std"],
                "is_std": m["is_std"],
            }
        )
        _log(
            f"s={s:g}: FID {m['fid']:.3f}, IS {m['is']:.3f}, accuracy {m['class_accuracy']:.4f}, "
            f"precision {m['precision']:.3f}, recall {m['recall']:.3f}"
        )
    real = floor(ref)
    fields = list(rows[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    w.writerow(
        {
            "scale": "real",
            "w": "",
            **{key: real[key] for key, _, _ in METRIC_ROWS},
            "kid_std": real["kid_std"],
            "is_std": real["is_std"],
        }
    )
    atomic_write_bytes(out / "sweep.csv", buf.getvalue().encode())
    record.pop("scale"), record.pop("w")
    result = {
        **record,
        "scales": scales,
        "n": a.n,
        "dataset": ref.dataset,
        "features": a.features,
        "rows": rows,
        "real_floor": real,
        "sampling_images_per_s": len(labels) / dt,
    }
    atomic_write_bytes(out / "sweep.json", json.dumps(result, indent=1).encode())
    xs = scales
    col = {
        key: [r[key] for r in rows]
        for key in ("fid", "is", "class_accuracy", "precision", "recall")
    }
    flat = lambda key: (xs, [real[key]] * len(xs))  # noqa: E731
    f = a.features
    plots = {
        "fid_vs_scale.png": (
            {"generated": (xs, col["fid"]), "real floor": flat("fid")},
            f"FID ({f} features) vs guidance scale s",
            "s",
            "FID",
        ),
        "accuracy_vs_scale.png": (
            {"generated": (xs, col["class_accuracy"]), "real floor": flat("class_accuracy")},
            "class accuracy vs guidance scale s",
            "s",
            "accuracy",
        ),
        "precision_recall_vs_scale.png": (
            {"precision": (xs, col["precision"]), "recall": (xs, col["recall"])},
            "precision and recall (k=3) vs s",
            "s",
            "fraction",
        ),
        "fid_vs_is.png": (
            {"generated (s in CSV order)": (col["is"], col["fid"])},
            "FID vs IS: the guidance frontier",
            "IS (classifier)",
            "FID",
        ),
    }
    for name, (series, title, xl, yl) in plots.items():
        labels_ = [f"s={s:g}" for s in scales] if name == "fid_vs_is.png" else None
        save_png(line_plot(series, title, xl, yl, point_labels=labels_), out / name)
    strip = guidance_strip(
        loaded.net,
        loaded.cfg,
        loaded.cfg.label_names(),
        device,
        resolve_precision(a.precision, device),
        seed=a.seed,
        scales=scales,
        steps=a.steps,
    )
    save_png(strip, out / "strip.png")
    print(
        f"{len(scales)} scales x {a.n} samples ({len(labels) / dt:.1f} images/s); "
        f"{a.features} features; real floor in the last row"
    )
    print(f"{'s':>6s} {'w':>6s} {'FID':>9s} {'IS':>7s} {'acc':>7s} {'prec':>6s} {'recall':>6s}")
    for r in rows + [{"scale": "real", "w": "", **real}]:
        s_, w_ = (
            f"{v:6g}" if isinstance(v, int | float) else f"{v:>6}" for v in (r["scale"], r["w"])
        )
        print(
            f"{s_} {w_} {r['fid']:9.3f} {r['is']:7.3f} "
            f"{r['class_accuracy']:7.4f} {r['precision']:6.3f} {r['recall']:6.3f}"
        )
    print(
        f"wrote {out}/sweep.csv, sweep.json, fid_vs_scale.png, accuracy_vs_scale.png, "
        "precision_recall_vs_scale.png, fid_vs_is.png, strip.png"
    )
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    """Load (and so verify) a checkpoint or model file and say what it is."""
    from cfgdiff.checkpoint import PREFIX, load_for_sampling, training_record
    from cfgdiff.unet import count_parameters

    loaded = load_for_sampling(a.checkpoint)
    cfg, m, d, t = loaded.cfg, loaded.cfg.model, loaded.cfg.diffusion, loaded.cfg.train
    kind = "model file" if loaded.path.is_file() else "checkpoint"
    # a checkpoint's training state (read once) says what it trained on and how
    record = training_record(loaded.path) if kind == "checkpoint" else None
    data = loaded.data if record is None else record["data_identity"]
    trained = None if record is None else record["precision"]
    if a.json:
        out = {"path": str(loaded.path), "kind": kind, **cfg.to_dict(), "data_identity": data}
        if trained is not None:
            out["trained_with"] = {"device": trained[0], "precision": trained[1]}
        print(json.dumps(out, indent=1))
        return 0
    names = cfg.label_names()
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    name = loaded.path.name
    step = name[len(PREFIX) :] if kind == "checkpoint" and name.startswith(PREFIX) else ""
    at = f", step {int(step)}" if step.isdigit() else ""
    print(f"{loaded.path} ({kind}{at}; SHA-256 verified)")
    print(f"  data:      {cfg.dataset}, {m.num_classes} classes: {shown}")
    if data is not None:  # absent from checkpoints and files made before it was recorded
        print(f"             {data['n']:,} training images, SHA-256 {data['sha256'][:16]}...")
    print(f"  images:    {m.in_channels} x {m.image_size} x {m.image_size}")
    print(
        f"  network:   {count_parameters(loaded.net) / 1e6:.2f} M parameters, base channels "
        f"{m.base_channels}, mult {m.channel_mult}, {m.num_res_blocks} res blocks per level, "
        f"attention at levels {m.attn_levels}"
    )
    print(
        f"  diffusion: {d.schedule} schedule, T = {d.timesteps}, {d.prediction}-prediction, "
        f"label dropout {d.label_dropout:g}"
        + (
            f", timesteps logit-normal ({d.t_mean:g}, {d.t_std:g})"
            + (f" with {d.t_uniform:g} uniform" if d.t_uniform else "")
            if d.t_sampling == "logit-normal"
            else ""
        )
    )
    print(
        f"  training:  preset {cfg.preset}, {t.steps} steps x {t.batch_size} planned, lr {t.lr:g} "
        f"({t.lr_schedule}), EMA {t.ema_decay:g}"
        + (", random horizontal flips" if t.hflip else "")
        + (f", trained in {trained[1]} on {trained[0]}" if trained is not None else "")
    )
    print(f"  guidance:  {GUIDANCE_CONVENTION}; null label {m.num_classes}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from cfgdiff.checkpoint import export_model

    if a.out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {a.out}")
    if a.out.is_dir():
        raise ConfigError(f"--out {a.out}: is a directory")
    if (a.out.parent / "MANIFEST.json").is_file() or (a.out.parent / "config.json").is_file():
        raise ConfigError(
            f"--out {a.out}: inside a checkpoint folder, whose files it could overwrite; write "
            "it elsewhere (e.g. the run folder)"
        )
    if Path(a.checkpoint).is_file():
        raise ConfigError(f"--checkpoint {a.checkpoint}: expected a checkpoint or run folder")
    meta = export_model(a.checkpoint, a.out, ema=not a.raw, dtype=a.dtype)
    size = a.out.stat().st_size / 2**20
    print(
        f"wrote {a.out} ({size:.1f} MiB: {meta['weights']} weights of {meta['source']} in "
        f"{meta['dtype']}, config "
        f"embedded); sample with: cfgdiff sample --checkpoint {a.out} --scale 3 --out grid.png"
    )
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from cfgdiff.data import default_data_dir, info, obtain

    data_dir = a.data_dir or default_data_dir()
    if a.data_command == "fetch":
        meta = obtain(a.name, data_dir, log=_log)
        total = {s: v["shape"][0] for s, v in meta["splits"].items()}
        print(
            f"{a.name}: {total} images cached in {data_dir / 'cache' / a.name} "
            f"(source: {meta['source']})"
        )
        return 0
    meta = info(a.name, data_dir, log=_log)
    print(f"{a.name}: {meta['path']}")
    if "source" in meta:
        print(f"  source: {meta['source']}")
    if "image_sizes" in meta:  # a folder
        sizes = sorted(meta["image_sizes"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{size} ({n})" for size, n in sizes[:8])
        more = f", and {len(sizes) - 8} more sizes" if len(sizes) > 8 else ""
        print(f"  image sizes: {shown}{more}")
        print("  modes: " + ", ".join(f"{m} ({n})" for m, n in meta["modes"].items()))
        if meta["skipped"]:
            first = ", ".join(meta["skipped"][:3])
            print(f"  skipped: {len(meta['skipped'])} hidden or non-image files ({first}, ...)")
    for split, s in meta["splits"].items():
        print(f"  {split}: shape {tuple(s['shape'])}" if "shape" in s else f"  {split}:")
        print(
            "    counts per class: "
            + ", ".join(f"{n}={c}" for n, c in zip(meta["class_names"], s["counts"], strict=True))
        )
        if "images_sha256" in s:
            print(f"    images sha256 {s['images_sha256']}")
            print(f"    labels sha256 {s['labels_sha256']}")
    for c in meta.get("caches", []):  # a folder, as decoded at a size by earlier commands
        shape = "x".join(map(str, c["shape"][1:]))
        print(f"  decoded at {shape}: {c['path']} ({c['bytes'] / 2**20:,.1f} MiB)")
    if "note" in meta:
        print(f"  note: {meta['note']}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "info": cmd_info,
    "export": cmd_export,
    "data": cmd_data,
}


def _check_data_dir(given: Path | None) -> None:
    """The data directory (--data-dir, else $CFGDIFF_DATA_DIR or ~/.cache/cfgdiff/data) must be a
    directory or not exist yet: checked before any work, since a file there would fail only when
    something is first cached, after a judge's training."""
    import os

    from cfgdiff.data import default_data_dir

    d = given if given is not None else default_data_dir()
    if not d.exists() or d.is_dir():
        return
    if given is not None:
        raise UsageError(f"argument --data-dir: not a directory: {d}")
    what = "$CFGDIFF_DATA_DIR" if os.environ.get("CFGDIFF_DATA_DIR") else "data dir"
    raise UsageError(f"{what}: not a directory: {d} (pass --data-dir DIR)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (tests call this directly)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if hasattr(args, "data_dir"):
            _check_data_dir(args.data_dir)
        if args.command != "data":  # every command that runs a network
            from cfgdiff.runtime import configure_cpu_threads, configure_cuda

            configure_cpu_threads()
            configure_cuda()
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except UsageError as e:
        print(f"cfgdiff: error: {e}", file=sys.stderr)
        return 2
    except RuntimeFault as e:
        print(f"cfgdiff: error: {e}", file=sys.stderr)
        return 1
    except CfgDiffError as e:
        print(f"cfgdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cfgdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cfgdiff ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        print(f"cfgdiff: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # an allocation failure outside the paths that name their batch size
        from cfgdiff.runtime import error_line, is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print(
            f"cfgdiff: error: out of memory ({error_line(e)}); lower --batch-size", file=sys.stderr
        )
        return 1


def console_main() -> None:
    sys.exit(main())
