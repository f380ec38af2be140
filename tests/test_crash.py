"""kill -9 at random moments never leaves a checkpoint that fails to load; --resume finds the
newest complete one; at most one checkpoint interval of work is lost; the run lock dies with
the process."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.cli import main

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _train_proc(folder: Path, out: Path, resume: bool, every: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "cfgdiff",
        "train",
        "--dataset",
        f"folder:{folder}",
        "--preset",
        "tiny",
        "--steps",
        "100000",
        "--sample-every",
        "0",
        "--checkpoint-every",
        str(every),
        "--keep",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        # the step count is a stand-in for "until killed": without this, --compile auto would
        # compile such a long CPU run first (a minute with a cold inductor cache)
        "--compile",
        "off",
    ] + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _wait_started(out: Path, proc: subprocess.Popen, after_step: int) -> None:
    t0 = time.time()
    while time.time() - t0 < 60:
        assert proc.poll() is None, proc.stderr.read().decode()
        rows = _rows(out)
        if rows and rows[-1] > after_step:
            return
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def _rows(out: Path) -> list[int]:
    try:
        with open(out / "loss.csv") as f:
            return [int(r["step"]) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return []


def test_kill9_at_random_moments(tmp_path, folder_data):
    out = tmp_path / "run"
    rng = random.Random(1234)
    every = 2  # tiny model: checkpoint writes take most of the time, so kills land in them
    last_ckpt_step = 0
    for i in range(6):
        proc = _train_proc(folder_data, out, resume=i > 0, every=every)
        _wait_started(out, proc, last_ckpt_step)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = ckpt_io.latest_checkpoint(out / "checkpoints")
        assert ckpt is not None
        ckpt_io.load_for_sampling(ckpt)  # verifies every file against its manifest
        ckpt_io.load_state(ckpt)
        step = int(ckpt.name.split("-")[1])
        logged = _rows(out)[-1]
        assert step >= last_ckpt_step
        assert logged - step <= every + 5, (logged, step)  # log_every 5 of the tiny preset
        last_ckpt_step = step
    # the run goes on from the newest checkpoint and finishes cleanly
    assert (
        main(
            [
                "train",
                "--dataset",
                f"folder:{folder_data}",
                "--out",
                str(out),
                "--resume",
                "--steps",
                str(last_ckpt_step + 3),
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_lock_refuses_a_second_process_and_dies_with_kill9(tmp_path, folder_data, capsys):
    out = tmp_path / "run"
    proc = _train_proc(folder_data, out, resume=False, every=5)
    try:
        _wait_started(out, proc, 5)
        rc = main(
            [
                "train",
                "--dataset",
                f"folder:{folder_data}",
                "--out",
                str(out),
                "--resume",
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        assert rc == 2
        assert "another cfgdiff process is training in this folder" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = int(ckpt_io.latest_checkpoint(out / "checkpoints").name.split("-")[1])
    assert (
        main(
            [
                "train",
                "--dataset",
                f"folder:{folder_data}",
                "--out",
                str(out),
                "--resume",
                "--steps",
                str(step + 2),
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
