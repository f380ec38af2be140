"""`cfgdiff eval`: a checkpoint at one scale, samples made elsewhere (metrics.eval), or training
a judge (metrics.classifier); parse, one library call, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from cfgdiff.cli.options import (
    UsageError,
    int_in,
    judged_options,
    reference_of,
    reference_options,
    sampling_options,
    sampling_request,
)
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
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
    judged_options(ev)


def request(a: argparse.Namespace):
    """The library's EvalRequest for parsed `eval` arguments."""
    from cfgdiff.metrics.eval import EvalRequest

    sampled = a.checkpoint is not None or a.scale is not None or a.w is not None
    return EvalRequest(
        sampling=sampling_request(a) if sampled else None, n=a.n, reference=reference_of(a),
        samples=a.samples, json=a.json,
    )  # fmt: skip


def run(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.metrics.eval import evaluate

    if a.action == "train-classifier":
        return run_train_classifier(a)
    for flag, given in (("--image-size", a.image_size), ("--retrain", a.retrain or None)):
        if given is not None:
            shown = f" {given}" if flag == "--image-size" else ""
            raise UsageError(f"{flag}{shown}: only for eval train-classifier")
    req = request(a)
    result = evaluate(req, log=log, world=dist.world())
    if result is not None:  # rank 0 of a torchrun job, or the one process
        print("\n".join(result.lines()))
    return 0


def run_train_classifier(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.metrics.classifier import train_judge

    if not dist.world().is_main:  # under torchrun rank 0 alone trains and caches it
        return 0
    line = train_judge(
        a.dataset, a.data_dir, device=a.device or "auto", image_size=a.image_size,
        retrain=a.retrain,
        log=log,
    )  # fmt: skip
    print(line)
    return 0
