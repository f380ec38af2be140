"""The files and folders of a run folder, named once: what `cfgdiff train` writes in RUN/ and
what each one is for.

Owns the names (train/run_folder.py, train/loop.py, checkpoint.py, text/embedding.py and the
CLI's --tensorboard write and read by them) and the list of them, `RUN_FILES`, that every
command writing an output checks its target against (checkpoint.input_paths, through
files.refuse_overlap): a run folder's files are the inputs of its resume, of sampling (the
checkpoints, a text run's caption table) or the record of its training, so an output written
over one breaks the run or loses its record. A file of the user's choosing elsewhere in RUN/ is
theirs to write and rewrite (RUN/eval_s3.json and RUN/model.safetensors, which SUMMARY.txt
suggests, the sweep's default RUN/sweep/, a denoising GIF). Sits at the bottom of the package so
that checkpoint.py and the sampling request can read it; knows nothing of what the files hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"  # checkpoint.py's: step-NNNNNNN/ folders and the `latest` pointer
LOCK = ".lock"
LOSS_CSV = "loss.csv"
EVAL_CSV = "eval.csv"
REAL_GRID = "real.png"
SAMPLES = "samples"
LOSS_PLOT = "loss.png"  # and loss.svg beside it (pictures.plots.save_figure)
STRIP = "guidance_strip.png"
SUMMARY = "SUMMARY.txt"
CAPTIONS_FILE = "captions.safetensors"
TENSORBOARD = "tensorboard"

_TRAIN = "written by `cfgdiff train`"
_RESUME = "an input of `cfgdiff train --resume`"
_BOARD = "written by `cfgdiff train --tensorboard`"


@dataclass(frozen=True)
class RunFile:
    """One name a run folder holds: relative to RUN, what it is and why no output may take it."""

    name: str
    what: str
    why: str


RUN_FILES = (
    RunFile(CHECKPOINTS, "the run's checkpoints", f"{_RESUME} and of every sampling command"),
    RunFile(LOCK, "the run's lock", "held by `cfgdiff train` while it trains"),
    RunFile(LOSS_CSV, "the run's training log", _RESUME),
    RunFile(EVAL_CSV, "the run's in-training evaluations", _RESUME),
    RunFile(CAPTIONS_FILE, "a text run's caption table", "an input of sampling its model"),
    RunFile(REAL_GRID, "the run's grid of real images", f"{_TRAIN} once, kept by a resume"),
    RunFile(SAMPLES, "the run's preview grids", _TRAIN),
    RunFile(LOSS_PLOT, "the run's loss curve", _TRAIN),
    RunFile("loss.svg", "the run's loss curve", _TRAIN),
    RunFile(STRIP, "the run's guidance strip", _TRAIN),
    RunFile(SUMMARY, "the run's summary", _TRAIN),
    RunFile(TENSORBOARD, "the run's TensorBoard events", _BOARD),
)


def run_inputs(run_dir: Path) -> list[tuple[str, Path, str]]:
    """(what, path, why) for each of the run's own files and folders, for files.refuse_overlap:
    an output may be none of them and lie inside none of them."""
    return [(f.what, Path(run_dir) / f.name, f.why) for f in RUN_FILES]
