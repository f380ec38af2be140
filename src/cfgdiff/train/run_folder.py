"""A run folder's files, other than its checkpoints, and the lock that keeps one writer.

Owns: run_dir/.lock (held while training), loss.csv (one row per log interval, appended as it
goes), eval.csv (one row per in-training evaluation), real.png, samples/step-N.png, loss.png
and loss.svg, guidance_strip.png, and SUMMARY.txt (what a finished run made and how long it
took, `summary`). A resumed run keeps the rows up to its checkpoint's step and rewrites the
rest. Checkpoints are checkpoint.py's. The names are run_layout.py's, whose list of them no
command's output may take.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import stat
from pathlib import Path
from typing import Any

from cfgdiff.errors import ConfigError
from cfgdiff.files import append_bytes, atomic_write_bytes, atomic_write_csv, writing
from cfgdiff.pictures.images import save_png
from cfgdiff.records import read_step_rows
from cfgdiff.run_layout import (
    EVAL_CSV,
    LOCK,
    LOSS_CSV,
    LOSS_PLOT,
    REAL_GRID,
    SAMPLES,
    STRIP,
    SUMMARY,
    TENSORBOARD,
)

LOSS_FIELDS = ["step", "loss", "lr", "images_per_s", "elapsed_s"]


class RunLock:
    """An fcntl lock on run_dir/.lock: held while training, released by the kernel even when the
    process is killed with SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        # never through a symbolic link: a .lock planted as one would make this create or
        # truncate its target wherever it points
        try:
            with writing(self.path):
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except ConfigError:
            raise ConfigError(
                f"`run_dir` {self.path.parent}: {self.path.name} is a symbolic link or not a "
                "file; remove it"
            ) from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"`run_dir` {self.path.parent}: {self.path.name} is not a file")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise ConfigError(
                f"`run_dir` {self.path.parent}: another cfgdiff process is training in this folder"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def read_csv(
    path: Path, upto_step: int, note=None, fields: list[str] | None = None
) -> list[dict[str, Any]]:
    """Rows of a per-step CSV up to and including `upto_step` (a resumed run rewrites the rest);
    a row a crash cut short is dropped and `note` told so (records.read_step_rows)."""
    return read_step_rows(path, upto_step, note, fields)


def write_loss_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """loss.png and loss.svg (plots.loss_plot) from loss.csv's rows."""
    from cfgdiff.pictures.plots import loss_plot

    loss_plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], path)


class RunOutputs:
    """The run folder's CSVs and pictures. `resumed_at`: the step of the checkpoint a resumed run
    starts from (its rows are kept up to it), None for a new run. `note`: told of rows dropped
    because a crash or a full disk cut them short. Temporary files a killed process left
    beside the pictures are removed."""

    def __init__(self, run_dir: Path, resumed_at: int | None, note=None):
        self.run_dir = run_dir
        keep = resumed_at is not None
        rows = read_csv(run_dir / LOSS_CSV, resumed_at, note, LOSS_FIELDS) if keep else []
        self.loss_rows = rows
        self.eval_rows = read_csv(run_dir / EVAL_CSV, resumed_at, note) if keep else []
        for folder in (run_dir, run_dir / SAMPLES):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)  # atomic writes' leftovers (the caller holds the lock)
        atomic_write_csv(run_dir / LOSS_CSV, self.loss_rows, LOSS_FIELDS)

    @property
    def last_loss(self) -> float | None:
        return float(self.loss_rows[-1]["loss"]) if self.loss_rows else None

    def add_loss(self, step: int, loss: float, lr: float, images_per_s: float, elapsed: float):
        row = {
            "step": step,
            "loss": repr(loss),  # full precision: resume is checked bit for bit
            "lr": f"{lr:.6g}",
            "images_per_s": f"{images_per_s:.1f}",
            "elapsed_s": f"{elapsed:.1f}",
        }
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=LOSS_FIELDS).writerow(row)
        # a whole row or none: a failed append is cut back (files.append_bytes)
        append_bytes(self.run_dir / LOSS_CSV, line.getvalue().encode())
        self.loss_rows.append(row)

    def add_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.eval_rows.append({"step": step, **{k: f"{v:.6g}" for k, v in metrics.items()}})
        atomic_write_csv(self.run_dir / EVAL_CSV, self.eval_rows, list(self.eval_rows[-1]))

    def real_grid(self, make) -> None:
        """real.png, made by `make()` the first time only."""
        if not (self.run_dir / REAL_GRID).exists():
            save_png(make(), self.run_dir / REAL_GRID)

    def preview(self, step: int, img) -> Path:
        return save_png(img, self.run_dir / SAMPLES / f"step-{step:07d}.png")

    def strip(self, img) -> Path:
        return save_png(img, self.run_dir / STRIP)

    def loss_plot(self) -> None:
        if self.loss_rows:
            write_loss_plot(self.loss_rows, self.run_dir / LOSS_PLOT)


def summary(res, prepared, total: float, board: bool = False) -> list[str]:
    """The lines a finished run says and keeps in run_dir/SUMMARY.txt (written here): its steps,
    time, machine and where its files are, with the commands that come next (`res`:
    loop.TrainResult, `prepared`: run.PreparedRun, `total`: seconds since it was asked for,
    `board`: TensorBoard events were written too)."""
    out, time_budget = prepared.request.run_dir, prepared.request.time_budget
    scale = prepared.cfg.train.preview_scale
    budget = f" (--time {time_budget:g} s)" if time_budget is not None else ""
    loading = max(0.0, total - res.train_s - res.aside_s)
    lines = [
        f"done: {res.step} steps in {total:.0f} s "
        f"({res.images_per_s:.0f} images/s), final loss {res.last_loss:.4f}",
        f"  time:            {res.train_s:.0f} s training{budget}, {res.aside_s:.0f} s previews, "
        f"checkpoints and evaluations, {loading:.0f} s loading data",
        f"  machine:         {prepared.device.type}: {prepared.machine}",
        f"  checkpoint:      {res.checkpoint}",
        f"  sample grids:    {out / SAMPLES}/step-*.png  "
        f"(rows = classes, s={scale:g}; real images in {out / REAL_GRID})",
        f"  guidance strip:  {out / STRIP}  (rows = classes, columns = s 0,1,2,3,5)",
        f"  loss curve:      {out / LOSS_PLOT}  and  {out / LOSS_CSV}",
        *([f"  tensorboard:     tensorboard --logdir {out / TENSORBOARD}"] if board else []),
        f"  class accuracy:  cfgdiff eval --checkpoint {out} --scale 3 --json {out}/eval_s3.json",
        f"  model file:      cfgdiff export --checkpoint {out} --out {out}/model.safetensors",
    ]
    atomic_write_bytes(Path(out) / SUMMARY, ("\n".join(lines) + "\n").encode())
    return lines
