"""`cfgdiff eval` (a checkpoint at one scale, samples made elsewhere, or training a judge) and
`cfgdiff sweep` (every metric across guidance scales). A text model is measured by its prompt
and attribute adherence on held-out prompts instead (metrics/text_adherence.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cfgdiff.cli.options import (
    UsageError,
    floats,
    int_in,
    negative_prompt_option,
    reference_options,
    refuse_writing_inputs,
    sampling_options,
)
from cfgdiff.cli.progress import log
from cfgdiff.cli.sample import generate_with, guidance_of, scale_of, text_guidance_of
from cfgdiff.errors import ConfigError
from cfgdiff.files import check_output_file

METRIC_ROWS = [
    ("fid", "FID", "{:.3f}"),
    ("kid", "KID", "{:.5f}"),
    ("is", "IS (classifier)", "{:.3f}"),
    ("precision", "precision (k=3)", "{:.3f}"),
    ("recall", "recall (k=3)", "{:.3f}"),
    ("class_accuracy", "class accuracy", "{:.4f}"),
    ("memorisation", "memorised", "{:.4f}"),
]
# Text models are measured by adherence (docs/text.md): the options that only they read.
TEXT_GROUP = "text models (prompt and attribute adherence on held-out prompts; docs/text.md)"


def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="FID, KID, IS, precision/recall, class accuracy and memorisation of samples",
        description="cfgdiff eval --checkpoint PATH (--scale S | --w W) [--n N]  or  "
        "cfgdiff eval --samples FILE.npz|FOLDER --dataset NAME  or  "
        "cfgdiff eval train-classifier --dataset NAME",
    )
    ev.add_argument("action", nargs="?", choices=["train-classifier"], help=argparse.SUPPRESS)
    sampling_options(ev, required=False)
    ev.add_argument(
        "--samples",
        type=Path,
        help="measure these samples instead of sampling a checkpoint: an .npz (images, labels, "
        "class_names, as `cfgdiff sample` writes) or a folder of class sub-folders of images; "
        "needs --dataset (the real data to compare with)",
    )
    ev.add_argument(
        "--n",
        "--num-samples",  # under torchrun, whose parser takes --n for an abbreviation of its own
        type=int_in(10, 1_000_000),
        help="samples in total (default 1000; --samples: all; a text model: rounded up to whole "
        "rounds of its held-out prompts)",
    )
    ev.add_argument("--json", type=Path, help="also write the results here")
    ev.add_argument(
        "--image-size",
        type=int_in(8, 1024),
        help="train-classifier only: resize images to this side (default: native; a folder of "
        "mixed sizes needs it)",
    )
    ev.add_argument(
        "--retrain",
        action="store_true",
        help="train-classifier only: train the judge even if one is cached or ships with "
        "cfgdiff (MNIST's), replacing the cached one",
    )
    reference_options(ev)
    _text_options_of(ev)


def add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="metrics across guidance scales: CSV, JSON and plots")
    sampling_options(sw, scale=False)
    g = sw.add_mutually_exclusive_group()
    g.add_argument("--scales", type=floats, default=None, help="comma-separated scales s")
    g.add_argument("--ws", type=floats, help="comma-separated paper weights w = s - 1")
    sw.add_argument(
        "--n",
        "--num-samples",
        type=int_in(10, 1_000_000),
        default=5000,
        help="samples per scale (a text model: rounded up to whole rounds of its held-out prompts)",
    )
    sw.add_argument("--out", type=Path, help="output folder (default: RUN/sweep)")
    reference_options(sw)
    _text_options_of(sw)


def _text_options_of(sp: argparse.ArgumentParser) -> None:
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


def _reference(a: argparse.Namespace, loaded, device):
    """The real reference that eval and sweep compare n samples against (under torchrun rank 0
    builds it first, since it may train and cache a judge, then the others read it)."""
    from cfgdiff import dist
    from cfgdiff.metrics.evaluate import build_reference

    world = dist.world()
    with dist.main_first(world):
        return build_reference(
            loaded.cfg, a.n, dataset=a.dataset, features=a.features, data_dir=a.data_dir,
            inception=a.inception, device=device, log=log if world.is_main else None,
        )  # fmt: skip


def run_eval(a: argparse.Namespace) -> int:
    import torch

    from cfgdiff import dist
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.evaluate import evaluation
    from cfgdiff.runtime import describe_machine, resolve_device

    if a.action == "train-classifier":
        return run_train_classifier(a)
    _check_eval_options(a)
    if a.json is not None:  # before any work: the evaluation may take minutes
        check_output_file(a.json, "--json")
        refuse_writing_inputs(a, ("--json", a.json))
    if a.samples is not None:
        return run_eval_samples(a)
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    _check_condition_options(a, loaded.cfg.model.condition)
    if loaded.cfg.model.condition == "text":
        return run_eval_text(a, loaded, device)
    scale, _ = scale_of(a)
    # The options first: building the reference may train a classifier for minutes.
    guidance, record = guidance_of(a, loaded, scale, device)
    ref = _reference(a, loaded, device)
    labels = torch.arange(a.n) % loaded.cfg.model.num_classes
    t0 = time.perf_counter()
    images = generate_with(a, loaded, labels, guidance, device)
    dt = time.perf_counter() - t0
    record.update(n=a.n, sampling_images_per_s=a.n / dt, device=device.type)
    record["machine"] = describe_machine(device)
    result = evaluation(ref, images, labels, record, world=dist.world())
    if not dist.world().is_main:  # the work was shared out; rank 0 reports and writes
        return 0
    head = (
        f"{a.n} samples at s={scale:g} (w={scale - 1:g}), {a.sampler} {a.steps} steps, "
        f"{a.n / dt:.1f} images/s; real floor: {a.n} held-out vs {a.n} training images"
    )
    _report(a, result, loaded.cfg.label_names(), head)
    return 0


def _check_condition_options(a: argparse.Namespace, condition: str) -> None:
    """Refuse, before any work, an option the model's kind of condition does not read: a text
    model is measured by adherence, so FID's feature space and a negative class mean nothing
    to it; a class model has no negative prompt."""
    if condition == "class":
        if a.negative_prompt is not None:
            raise UsageError(
                "--negative-prompt: only for text models (a class model is steered away from "
                "a class: --negative-class K)"
            )
        if a.prompts is not None:
            raise UsageError(f"--prompts {a.prompts}: only for text models")
        return
    if a.negative_class is not None:
        raise UsageError(
            f"--negative-class {a.negative_class}: only for class models (a text model is "
            "steered away from a prompt: --negative-prompt TEXT)"
        )
    if a.features != "classifier":
        raise UsageError(
            f"--features {a.features}: only for class models (a text model is measured by the "
            "judge's class accuracy and attribute rank correlations, not FID)"
        )
    if a.inception is not None:
        raise UsageError("--inception: only for class models, with --features inception")


def _text_options(a: argparse.Namespace, device) -> dict:
    """text_adherence's keyword arguments from the sampling and reference options."""
    from cfgdiff import dist
    from cfgdiff.runtime import resolve_precision

    return dict(
        dataset=a.dataset, data_dir=a.data_dir, sampler=a.sampler, steps=a.steps, eta=a.eta,
        spacing=a.spacing, seed=a.seed, batch_size=a.batch_size, compile=a.compile,
        device=device, precision=resolve_precision(a.precision, device), log=log,
        world=dist.world(),
    )  # fmt: skip


def _prompt_set(a: argparse.Namespace, cfg):
    """--prompts FILE as a PromptSet (None without it: the run's held-out phrasings)."""
    from cfgdiff.metrics.text_adherence import labelled_prompts

    if a.prompts is None:
        return None
    try:
        lines = a.prompts.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts {a.prompts}: cannot read it ({e})") from None
    return labelled_prompts(lines, str(a.prompts), cfg)


def _samples_line(result: dict) -> str:
    from cfgdiff.metrics.text_adherence import HELD_OUT

    which = "held-out prompt" if result["prompts"] == HELD_OUT else "prompt"
    return f"{result['per_prompt']} per {which} x {result['num_prompts']}"


def run_eval_text(a: argparse.Namespace, loaded, device) -> int:
    """eval of a text model: prompt and attribute adherence at one scale."""
    from cfgdiff import dist
    from cfgdiff.metrics.text_adherence import at_one_scale, text_adherence
    from cfgdiff.text import run_caption_table

    scale, _ = scale_of(a)
    prompts = _prompt_set(a, loaded.cfg)
    table = run_caption_table(loaded.path)
    guidance, record = text_guidance_of(a, loaded, scale, device, table)
    result = text_adherence(
        loaded, [scale], a.n, guidance=guidance, record=record, prompts=prompts,
        **_text_options(a, device),
    )  # fmt: skip
    if not dist.world().is_main:  # the sampling was shared out; rank 0 reports and writes
        return 0
    result = at_one_scale(result)
    print(
        f"{result['n']} samples ({_samples_line(result)}) at s={scale:g} (w={scale - 1:g}), "
        f"{a.sampler} {a.steps} steps, {result['sampling_images_per_s']:.1f} images/s"
    )
    print(adherence_table([result], result.get("real_floor")))
    if "prompt_rows" in result:
        print(per_prompt_table(result["prompt_rows"]))
    _judge_note(result)
    if a.json is not None:
        from cfgdiff.files import atomic_write_json

        atomic_write_json(a.json, result)
    return 0


def adherence_table(rows: list[dict], real: dict | None = None) -> str:
    """A text model's adherence rows (metrics.text_adherence) as a table ("-": a correlation
    not measured, prompts of a file ask for no level), with FID, IS, precision and recall
    against real images when they were measured, and `real` (the real-vs-real floor) last."""

    def num(v, width: int, digits: int = 3) -> str:
        return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"

    fidelity = rows[0].get("fid") is not None
    head = f"{'s':>6s} {'w':>6s} {'n':>7s} {'accuracy':>9s} {'thickness':>10s} {'slant':>7s}"
    lines = [head + (f" {'FID':>8s} {'IS':>6s} {'prec':>6s} {'recall':>6s}" if fidelity else "")]
    for r in rows:
        line = (
            f"{r['scale']:6g} {r['w']:6g} {r['n']:7d} {r['class_accuracy']:9.4f} "
            f"{num(r['thickness_spearman'], 10)} {num(r['slant_spearman'], 7)}"
        )
        if fidelity:
            line += f" {r['fid']:8.3f} {r['is']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f}"
        lines.append(line)
    if fidelity and real is not None:
        lines.append(
            f"{'real':>6s} {'':>6s} {'':>7s} {'':>9s} {'':>10s} {'':>7s} {real['fid']:8.3f} "
            f"{real['is']:6.3f} {real['precision']:6.3f} {real['recall']:6.3f}"
        )
    return "\n".join(lines)


def per_prompt_table(rows: list[dict]) -> str:
    """adherence's per-prompt rows: class, accuracy, mean thickness and slant, prompt."""
    lines = [f"{'class':>10s} {'accuracy':>9s} {'thickness':>10s} {'slant':>7s}  prompt"]
    for r in rows:
        attrs = (
            f"{r['thickness']:10.2f} {r['slant']:7.3f}"
            if "thickness" in r
            else f"{'-':>10s} {'-':>7s}"
        )
        lines.append(f"{r['class'][:10]:>10s} {r['class_accuracy']:9.4f} {attrs}  {r['prompt']}")
    return "\n".join(lines)


def _judge_note(result: dict) -> None:
    from cfgdiff.metrics.text_adherence import HELD_OUT

    if not result["levels"]:  # prompts of a file, or held-out ones of class names
        which = "phrasings held out of training" if result["prompts"] == HELD_OUT else ""
        print(
            "(accuracy: the judge's, against the class each prompt asks for, on "
            f"{which or result['prompts']}; thickness in px and slant: the means measured on "
            "each prompt's samples, in sweep.json for a sweep)"
        )
    else:
        print(
            "(accuracy: the judge's on prompts in phrasings held out of training; thickness, "
            "slant: Spearman's rank correlation of the requested and the measured level)"
        )
    if "real_floor" in result:
        print(
            f"(FID, IS, precision, recall: the samples against {result['reference_n']} real "
            f"images in the judge's features; real: {result['reference_n']} other real images "
            "against them, the floor)"
        )
    print(
        f"(judge: {result['dataset']} classifier, test accuracy "
        f"{result['classifier_test_accuracy']:.4f})"
    )


def _check_eval_options(a: argparse.Namespace) -> None:
    if a.image_size is not None:
        raise ConfigError(
            f"--image-size {a.image_size}: only for eval train-classifier (samples are judged "
            "at the classifier's size)"
        )
    if a.retrain:
        raise ConfigError("--retrain: only for eval train-classifier")
    if a.samples is not None:
        if a.checkpoint is not None or a.scale is not None or a.w is not None:
            raise ConfigError(
                "--samples: not with --checkpoint, --scale or --w (nothing is sampled)"
            )
        if a.n is not None:
            raise ConfigError(
                "--samples: not with --n (every sample in the file or folder is used)"
            )
        if a.dataset is None:
            raise ConfigError("--samples: --dataset is required (the real data to compare with)")
        return
    a.n = a.n or 1000
    if a.checkpoint is None:
        raise ConfigError("eval: --checkpoint is required (or use: eval train-classifier)")
    if a.scale is None and a.w is None:
        raise ConfigError("eval: one of --scale or --w is required")


def run_eval_samples(a: argparse.Namespace) -> int:
    """eval --samples: the same report for images made elsewhere (another sampler, another
    tool's model), against --dataset, at the samples' size and channels. Under torchrun rank 0
    alone does it (there is nothing to sample)."""
    from cfgdiff import dist
    from cfgdiff.metrics.evaluate import evaluation, samples_reference

    if not dist.world().is_main:
        return 0
    from cfgdiff.runtime import resolve_device

    ref, images, labels, names = samples_reference(
        a.samples, a.dataset, features=a.features, data_dir=a.data_dir, inception=a.inception,
        device=resolve_device(a.device), log=log,
    )  # fmt: skip
    n = len(images)
    result = evaluation(ref, images, labels, {"samples": str(a.samples), "n": n})
    head = f"{n} samples from {a.samples}; real floor: {n} held-out vs {n} training images"
    _report(a, result, names, head)
    return 0


def _report(a: argparse.Namespace, result: dict, names, head: str) -> None:
    """Print an evaluation (metrics.evaluate.evaluation's record): the table beside the real
    floor, the per-class accuracy and the judge; write --json."""
    gen, real = result["generated"], result["real_floor"]
    print(head)
    print(metrics_table({"generated": gen, "real floor": real}, result["features"]))
    print(
        "class accuracy per class: "
        + ", ".join(f"{names[c]} {v:.3f}" for c, v in enumerate(gen["per_class_accuracy"]))
    )
    print(
        f"(judge: {result['dataset']} classifier, test accuracy "
        f"{result['classifier_test_accuracy']:.4f})"
    )
    if a.json is not None:
        from cfgdiff.files import atomic_write_json

        atomic_write_json(a.json, result)


def metrics_table(columns: dict[str, dict], features: str) -> str:
    head = f"{'metric (' + features + ' features)':34s}" + "".join(f"{c:>14s}" for c in columns)
    lines = [head]
    for key, label, fmt in METRIC_ROWS:
        lines.append(
            f"{label:34s}" + "".join(f"{fmt.format(v[key]):>14s}" for v in columns.values())
        )
    return "\n".join(lines)


def run_train_classifier(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.data import check_name, default_data_dir

    if not dist.world().is_main:  # under torchrun rank 0 alone trains and caches it
        return 0
    from cfgdiff.metrics.classifier import classifier_path, get_classifier
    from cfgdiff.runtime import resolve_device

    if a.dataset is None:
        raise ConfigError("eval train-classifier: --dataset is required")
    check_name(a.dataset)
    device = resolve_device(a.device)
    _, meta = get_classifier(
        a.dataset, a.data_dir, device=device, log=log, image_size=a.image_size, retrain=a.retrain
    )
    path = classifier_path(a.data_dir or default_data_dir(), a.dataset)
    epochs = meta.get("epochs_trained", meta["epochs"])  # (cached before the step floor: epochs)
    how = f"{meta['train_seconds']} s", f"{meta['precision']}, {epochs} epochs"
    made = f"trained in {how[0]} ({how[1]})"
    if meta.get("source") == "shipped":
        here = meta.get("test_accuracy_here")
        where = "the split it was measured on" if here is None else f"{here:.4f} on this test split"
        made = f"{where}; shipped with cfgdiff (trained in {', '.join(how)})"
    print(
        f"{a.dataset}: test accuracy {meta['test_accuracy']:.4f}, {made}, weights "
        f"sha256 {meta['weights_sha256'][:16]}..., cached at {path}.safetensors"
    )
    return 0


def run_sweep(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.sweep import DEFAULT_SCALES, default_sweep_dir, sweep
    from cfgdiff.runtime import resolve_device, resolve_precision

    scales = [w + 1 for w in a.ws] if a.ws else (a.scales or list(DEFAULT_SCALES))
    if a.out is not None and a.out.exists() and not a.out.is_dir():
        raise ConfigError(f"--out {a.out}: is a file; --out names a folder here")
    refuse_writing_inputs(a, ("--out", a.out))
    device = resolve_device(a.device)
    loaded = load_for_sampling(a.checkpoint, device)
    _check_condition_options(a, loaded.cfg.model.condition)
    out = a.out if a.out is not None else default_sweep_dir(loaded.path)
    if loaded.cfg.model.condition == "text":
        return run_sweep_text(a, loaded, scales, out, device)
    # The options first: building the reference may train a classifier for minutes.
    guidance, record = guidance_of(a, loaded, 1.0, device)
    ref = _reference(a, loaded, device)
    result = sweep(
        loaded, guidance, scales, a.n, ref, out, record=record, sampler=a.sampler,
        steps=a.steps, spacing=a.spacing, eta=a.eta, seed=a.seed, batch_size=a.batch_size,
        compile=a.compile, device=device, precision=resolve_precision(a.precision, device),
        log=log, world=dist.world(),
    )  # fmt: skip
    if result is None:  # not rank 0 of a torchrun job: it measured and wrote
        return 0
    rows, real = result["rows"], result["real_floor"]
    print(
        f"{len(scales)} scales x {a.n} samples ({result['sampling_images_per_s']:.1f} images/s); "
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
        f"wrote {out}/sweep.csv, sweep.json, fid_vs_scale, accuracy_vs_scale, "
        "precision_recall_vs_scale and fid_vs_is (.png and .svg), strip.png"
    )
    return 0


def run_sweep_text(a: argparse.Namespace, loaded, scales: list[float], out: Path, device) -> int:
    """sweep of a text model: prompt and attribute adherence at every scale."""
    from cfgdiff.metrics.sweep import text_sweep
    from cfgdiff.text import run_caption_table

    prompts = _prompt_set(a, loaded.cfg)
    table = run_caption_table(loaded.path)
    guidance, record = text_guidance_of(a, loaded, 1.0, device, table)
    result = text_sweep(
        loaded, scales, a.n, out, guidance=guidance, record=record, prompts=prompts,
        **_text_options(a, device),
    )  # fmt: skip
    if result is None:  # not rank 0 of a torchrun job: it sampled its share
        return 0
    print(
        f"{len(scales)} scales x {result['n']} samples ({_samples_line(result)}; "
        f"{result['sampling_images_per_s']:.1f} images/s)"
    )
    print(adherence_table(result["rows"], result.get("real_floor")))
    _judge_note(result)
    print(f"wrote {out}/sweep.csv, sweep.json, adherence_vs_scale (.png and .svg)")
    return 0
