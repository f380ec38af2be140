"""`cfgdiff train`: parse, prepare and run one training run (train.run), print what it made."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cfgdiff.cli.options import (
    add_config_flags,
    data_dir_option,
    dataset_name,
    device_options,
    duration,
    int_in,
    overrides,
)
from cfgdiff.cli.progress import StopFlag, TrainProgress, log
from cfgdiff.run_layout import TENSORBOARD
from cfgdiff.runtime import COMPILE_CHOICES, COMPILE_MIN_TRAIN_IMAGES


def add_parser(sub) -> None:
    from cfgdiff.data.specs import NAMES_HELP
    from cfgdiff.presets import MACHINE_PRESETS, PRESETS

    tr = sub.add_parser("train", help="train a model")
    tr.add_argument(
        "--dataset",
        type=dataset_name,
        help=f"{NAMES_HELP} (default: mnist; with --resume, the run's)",
    )
    data_dir_option(tr)
    tr.add_argument("--out", type=Path, required=True, help="run folder")
    tr.add_argument(
        "--preset",
        default=None,
        choices=[*PRESETS, *MACHINE_PRESETS],
        help="named configuration (default cpu-demo, or with --time the recipe measured best for "
        "the budget; on --resume the checkpoint's); demo: cpu-demo where training runs in bf16, "
        "cpu-demo-fp32 on a CPU without native bf16",
    )
    tr.add_argument(
        "--time",
        type=duration,
        help="train for about this long instead of --steps (90, 90s, 5m, 1.5h): the step count, "
        "and so the LR schedule, is sized to it from the speed of the first 25 steps; previews, "
        "evaluations and checkpoints come on top. Without --preset, the recipe measured best for "
        "the budget on this kind of machine (docs/results.md, 'Quality for the time you have')",
    )
    add_config_flags(tr)
    tr.add_argument("--image-size", type=int_in(8, 1024), help="resize images to this side")
    tr.add_argument("--channels", type=int, choices=[1, 3], help="1 or 3 (default: the data's)")
    device_options(tr)
    tr.add_argument(
        "--compile",
        default="auto",
        choices=list(COMPILE_CHOICES),
        help="torch.compile the training step (auto: on for CUDA; on CPUs with AMX for runs of "
        f"at least {COMPILE_MIN_TRAIN_IMAGES:,} training images, where the compilation pays off, "
        "so not for the demo); its gradients are checked against eager on the first batch, and "
        "training falls back to eager if they differ or compilation fails",
    )
    tr.add_argument(
        "--channels-last", action="store_true", help="NHWC memory format (not always faster)"
    )
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log loss, lr, images/s, preview grids and evaluations for TensorBoard in "
        "OUT/tensorboard (needs: pip install 'cfgdiff[tensorboard]')",
    )


def request(a: argparse.Namespace):
    """The library's RunRequest for parsed `train` arguments."""
    from cfgdiff.train.run import RunRequest

    return RunRequest(
        run_dir=a.out, dataset=a.dataset, preset=a.preset, overrides=overrides(a),
        resume=a.resume, data_dir=a.data_dir, image_size=a.image_size, channels=a.channels,
        device=a.device, precision=a.precision, compile=a.compile,
        channels_last=a.channels_last, time_budget=a.time,
    )  # fmt: skip


def run(a: argparse.Namespace) -> int:
    from cfgdiff import dist
    from cfgdiff.train import run as training
    from cfgdiff.train.run_folder import summary
    from cfgdiff.train.tensorboard import TensorBoardEvents, require_tensorboard

    if a.tensorboard:
        require_tensorboard()  # before any work
    world = dist.world()  # under torchrun, rank 0 alone speaks and writes
    prepared = training.prepare(request(a), log=log if world.is_main else None)
    progress = TrainProgress(
        bar=not a.no_progress and sys.stderr.isatty(), log_every=prepared.cfg.train.log_every,
        images=len(prepared.data), machine=prepared.machine, time_budget=a.time,
        preview_scale=prepared.cfg.train.preview_scale, world=world,
    )  # fmt: skip
    on_event = progress if world.is_main else None
    if a.tensorboard and world.is_main:
        board = TensorBoardEvents(a.out / TENSORBOARD, prepared.cfg.train.log_every)

        def on_event(name, info):
            progress(name, info)
            board(name, info)

    t0 = time.perf_counter()
    with StopFlag() as stop:
        try:
            note = progress.note if world.is_main else None
            res = training.run(prepared, log=note, on_event=on_event, should_stop=stop)
        finally:
            progress.close()
            if a.tensorboard and world.is_main:
                board.close()
    if not world.is_main:
        return 0
    if res.stopped_early:
        print(f"stopped at step {res.step}; checkpoint {res.checkpoint}")
        print(f"resume with: cfgdiff train --out {a.out} --resume")
        return 0
    lines = summary(res, prepared, time.perf_counter() - t0, a.tensorboard)
    print("\n".join(lines))
    return 0
