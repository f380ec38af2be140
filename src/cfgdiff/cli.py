"""The command-line interface: the one place where errors become messages and exit codes.

    cfgdiff train   --dataset mnist --out runs/NAME [--preset P] [--steps N] ...
    cfgdiff sample  --checkpoint PATH (--scale S | --w W) --out FILE.png|FILE.npz ...
    cfgdiff eval    --checkpoint PATH (--scale S | --w W) [--n N]   (class accuracy)
    cfgdiff data    fetch NAME | info NAME

Exit status: 0 success, 2 bad input (one line on stderr, no traceback), 130 interrupted twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cfgdiff.config import GUIDANCE_CONVENTION
from cfgdiff.errors import CfgDiffError, ConfigError


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


def _classes(s: str) -> list[int]:
    try:
        out = [int(p) for p in s.split(",") if p.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class indices, got {s!r}"
        ) from None
    if not out or any(c < 0 for c in out):
        raise argparse.ArgumentTypeError(f"expected non-negative class indices, got {s!r}")
    return out


BATCH_HELP = "images per sampler batch (default 64 on CPU, 1024 on CUDA; no effect on results)"


def _sampling_batch(given: int | None, device) -> int:
    """CPU sampling is fastest in small batches (cache); GPUs want large ones."""
    if given is not None:
        return given
    return 1024 if device.type == "cuda" else 64


def _log(msg: str) -> None:
    print(f"cfgdiff: {msg}", file=sys.stderr)


# ----------------------------------------------------------------- parser


def sampling_opts(sp: argparse.ArgumentParser) -> None:
    """Options shared by `sample` and `eval`: checkpoint, sampler, guidance and its variants."""
    sp.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint folder, or a run folder (uses its latest checkpoint)",
    )
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--scale", type=_float_in(-20, 100), help="guidance scale s (1 = conditional)")
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
    sp.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    sp.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on CUDA and AMX CPUs, else fp32",
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
        "--dataset", default="mnist", help="mnist | fashion-mnist | cifar10 | folder:PATH"
    )
    data_opts(tr)
    tr.add_argument("--out", type=Path, required=True, help="run folder")
    tr.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="named configuration (default cpu-demo; on --resume the checkpoint's)",
    )
    tr.add_argument("--steps", type=_int_in(1, 10_000_000))
    tr.add_argument("--batch-size", type=_int_in(1, 65536))
    tr.add_argument("--lr", type=_float_in(0, 1, lo_open=True, hi_open=True))
    tr.add_argument("--label-dropout", type=_float_in(0, 1, hi_open=True))
    tr.add_argument("--ema-decay", type=_float_in(0, 1, hi_open=True))
    tr.add_argument("--sample-every", type=_int_in(0), help="steps between preview grids (0: off)")
    tr.add_argument("--checkpoint-every", type=_int_in(0), help="steps between checkpoints")
    tr.add_argument("--keep", type=_int_in(1), help="checkpoints kept on disk")
    tr.add_argument("--image-size", type=_int_in(8, 1024), help="resize images to this side")
    tr.add_argument("--channels", type=int, choices=[1, 3], help="1 or 3 (default: the data's)")
    tr.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    tr.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on CUDA and AMX CPUs, else fp32",
    )
    tr.add_argument("--seed", type=_int_in(0, 2**31 - 1))
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="generate images from a checkpoint")
    sampling_opts(sa)
    sa.add_argument("--classes", type=_classes, help="comma-separated classes (default: all)")
    sa.add_argument("--per-class", type=_int_in(1, 100_000), default=8)
    sa.add_argument("--out", type=Path, required=True, help="FILE.png (grid) or FILE.npz (arrays)")

    ev = sub.add_parser("eval", help="class accuracy of generated samples (own classifier)")
    sampling_opts(ev)
    ev.add_argument("--n", type=_int_in(10, 1_000_000), default=1000, help="samples in total")
    ev.add_argument("--json", type=Path, help="also write the results here")
    data_opts(ev)

    da = sub.add_parser("data", help="obtain datasets and show where they are")
    dsub = da.add_subparsers(dest="data_command", parser_class=Parser, metavar="ACTION")
    dsub.required = True
    fe = dsub.add_parser("fetch", help="obtain, verify and cache a dataset")
    fe.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    data_opts(fe)
    inf = dsub.add_parser("info", help="files, counts per class and checksums")
    inf.add_argument("name", help="mnist | fashion-mnist | cifar10 | folder:PATH")
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


def cmd_train(a: argparse.Namespace) -> int:
    from cfgdiff import checkpoint as ckpt_io
    from cfgdiff.config import get_preset
    from cfgdiff.data import check_name, load_dataset
    from cfgdiff.runtime import resolve_device, resolve_precision
    from cfgdiff.train import config_for_dataset, train

    check_name(a.dataset)
    device = resolve_device(a.device)
    if a.resume:
        found = ckpt_io.latest_checkpoint(a.out / "checkpoints")
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {a.out / 'checkpoints'}")
        base = ckpt_io.read_config(found)
        if a.preset is not None and a.preset != base.preset:
            raise ConfigError(f"--preset {a.preset}: the run was trained with preset {base.preset}")
    else:
        base = get_preset(a.preset or "cpu-demo")
    overrides = {
        k: getattr(a, k)
        for k in (
            "steps",
            "batch_size",
            "lr",
            "ema_decay",
            "sample_every",
            "checkpoint_every",
            "keep",
            "seed",
        )
        if getattr(a, k) is not None
    }
    tcfg = dataclasses.replace(base.train, **overrides)
    dcfg = base.diffusion
    if a.label_dropout is not None:
        dcfg = dataclasses.replace(dcfg, label_dropout=a.label_dropout)
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
    show = not a.no_progress and sys.stderr.isatty()

    def on_event(name: str, info: dict) -> None:
        nonlocal bar
        if name == "start":
            _log(
                f"training {info['params'] / 1e6:.2f}M parameters on {info['device']} "
                f"({info['precision']}), {len(data)} images, step {info['step']} -> {info['total']}"
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
                    f"step {info['step']}/{cfg.train.steps} loss {info['loss']:.4f} "
                    f"{info['images_per_s']:.0f} img/s"
                )
        elif name in ("sample", "checkpoint", "strip") and bar is None:
            _log(f"{name}: {info['path']}")

    t0 = time.perf_counter()
    with StopFlag() as stop:
        try:
            res = train(
                cfg,
                a.out,
                data,
                device=device,
                precision=resolve_precision(a.precision, device),
                resume=a.resume,
                on_event=on_event,
                should_stop=stop,
            )
        finally:
            if bar is not None:
                bar.close()
    out = a.out
    if res.stopped_early:
        print(f"stopped at step {res.step}; checkpoint {res.checkpoint}")
        print(f"resume with: cfgdiff train --out {out} --resume")
        return 0
    lines = [
        f"done: {res.step} steps in {time.perf_counter() - t0:.0f} s "
        f"({res.images_per_s:.0f} images/s), final loss {res.last_loss:.4f}",
        f"  checkpoint:      {res.checkpoint}",
        f"  sample grids:    {out / 'samples'}/step-*.png  "
        f"(rows = classes, s={cfg.train.preview_scale:g})",
        f"  guidance strip:  {out / 'guidance_strip.png'}  (rows = classes, columns = s 0,1,2,3,5)",
        f"  loss curve:      {out / 'loss.png'}  and  {out / 'loss.csv'}",
        f"  class accuracy:  cfgdiff eval --checkpoint {out} --scale 3  ({out}/eval_s*.json)",
    ]
    print("\n".join(lines))
    from cfgdiff.data.download import atomic_write_bytes

    atomic_write_bytes(out / "SUMMARY.txt", ("\n".join(lines) + "\n").encode())
    return 0


def _scale(a: argparse.Namespace) -> tuple[float, str]:
    from cfgdiff.guidance import scale_from_w

    if a.w is not None:
        return scale_from_w(a.w), "w"
    return a.scale, "scale"


def _guidance(a: argparse.Namespace, loaded, scale: float, device):
    """The Guidance the options ask for, and a plain-data record of it for output files."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.guidance import APG, Guidance

    guide_net = None
    if a.guide_checkpoint is not None:
        guide = load_for_sampling(a.guide_checkpoint, device)
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


def _generate(a: argparse.Namespace, loaded, labels, guidance, device):
    """Sample `labels` with the sampler options shared by `sample` and `eval`."""
    from cfgdiff.runtime import resolve_precision
    from cfgdiff.sample import generate

    return generate(
        loaded.net,
        loaded.cfg,
        labels,
        guidance=guidance,
        sampler=a.sampler,
        steps=a.steps,
        eta=a.eta,
        spacing=a.spacing,
        seed=a.seed,
        batch_size=_sampling_batch(a.batch_size, device),
        device=device,
        precision=resolve_precision(a.precision, device),
    )


def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np

    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.data.download import atomic_write_bytes
    from cfgdiff.runtime import resolve_device
    from cfgdiff.sample import class_grid_labels
    from cfgdiff.viz import labelled_grid, save_png

    suffix = a.out.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise ConfigError(f"--out must end in .png or .npz, got {a.out}")
    if a.out.exists() and a.out.is_dir():
        raise ConfigError(f"--out {a.out}: is a directory")
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    k = loaded.cfg.model.num_classes
    classes = a.classes if a.classes is not None else list(range(k))
    bad = [c for c in classes if c >= k]
    if bad:
        raise ConfigError(f"--classes must be in [0, {k - 1}] for this checkpoint, got {bad}")
    scale, given = _scale(a)
    guidance, record = _guidance(a, loaded, scale, device)
    labels = class_grid_labels(classes, a.per_class)
    t0 = time.perf_counter()
    images = _generate(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        save_png(labelled_grid(images, a.per_class, [str(c) for c in classes]), a.out)
    else:
        buf = io.BytesIO()
        np.savez(
            buf,
            images=images.numpy(),
            labels=labels.numpy(),
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
    print(
        f"wrote {len(labels)} images to {a.out} (s={scale:g}, w={scale - 1:g}, {a.sampler} "
        f"{a.steps} steps, seed {a.seed}; {len(labels) / dt:.1f} images/s)"
    )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.classifier import class_accuracy, get_classifier, predict
    from cfgdiff.runtime import resolve_device

    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    m = loaded.cfg.model
    clf, meta = get_classifier(
        loaded.cfg.dataset,
        a.data_dir,
        device=device,
        log=_log,
        image_size=m.image_size,
        channels=m.in_channels,
    )
    if (meta["in_channels"], meta["num_classes"]) != (m.in_channels, m.num_classes):
        raise ConfigError(
            f"classifier for {loaded.cfg.dataset} has {meta['in_channels']} channels and "
            f"{meta['num_classes']} classes; checkpoint has {m.in_channels} and {m.num_classes}"
        )
    scale, _ = _scale(a)
    guidance, record = _guidance(a, loaded, scale, device)
    labels = torch.arange(a.n) % m.num_classes
    t0 = time.perf_counter()
    images = _generate(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    acc, per = class_accuracy(predict(clf, images, device=device), labels)
    result = {
        **record,
        "n": a.n,
        "class_accuracy": acc,
        "per_class_accuracy": per,
        "classifier_test_accuracy": meta["test_accuracy"],
        "sampling_images_per_s": a.n / dt,
    }
    print(
        f"class accuracy at s={scale:g} (w={scale - 1:g}): {acc:.4f} over {a.n} samples "
        f"({a.sampler} {a.steps} steps; classifier test accuracy {meta['test_accuracy']:.4f}; "
        f"{a.n / dt:.1f} images/s)"
    )
    print("per class: " + " ".join(f"{c}:{v:.3f}" for c, v in enumerate(per)))
    if a.json is not None:
        from cfgdiff.data.download import atomic_write_bytes

        atomic_write_bytes(a.json, json.dumps(result, indent=1).encode())
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
    meta = info(a.name, data_dir)
    print(f"{a.name}: {meta['path']}")
    if "source" in meta:
        print(f"  source: {meta['source']}")
    for split, s in meta["splits"].items():
        print(f"  {split}: shape {tuple(s['shape'])}")
        print(
            "    counts per class: "
            + ", ".join(f"{n}={c}" for n, c in zip(meta["class_names"], s["counts"], strict=True))
        )
        print(f"    images sha256 {s['images_sha256']}")
        print(f"    labels sha256 {s['labels_sha256']}")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "data": cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (tests call this directly)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except UsageError as e:
        print(f"cfgdiff: error: {e}", file=sys.stderr)
        return 2
    except CfgDiffError as e:
        print(f"cfgdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cfgdiff: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("cfgdiff: error: out of memory; lower --batch-size", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cfgdiff: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


def console_main() -> None:
    sys.exit(main())
