"""Ctrl-C / SIGTERM on a real `cfgdiff train` process: the step finishes, a checkpoint is
written, the exit status is 0 and the message says how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfgdiff import checkpoint as ckpt_io

pytestmark = pytest.mark.slow


def _start(folder_data: Path, out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "cfgdiff",
        "train",
        "--dataset",
        f"folder:{folder_data}",
        "--preset",
        "tiny",
        "--steps",
        "1000000",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "0",
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
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_training(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        csv = out / "loss.csv"
        if csv.is_file() and len(csv.read_text().splitlines()) >= 3:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_exits_zero(tmp_path, folder_data, sig):
    out = tmp_path / "run"
    proc = _start(folder_data, out)
    _wait_for_training(out, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "resume with: cfgdiff train --out" in stdout
    assert "stop requested" in stderr
    ckpt = ckpt_io.latest_checkpoint(out / "checkpoints")
    assert ckpt is not None
    loaded = ckpt_io.load_for_sampling(ckpt)
    assert loaded.cfg.preset == "tiny"
    assert int(ckpt.name.split("-")[1]) >= 10  # loss.csv had two rows of log_every=5


def test_second_sigint_quits_at_once(tmp_path, folder_data):
    out = tmp_path / "run"
    proc = _start(folder_data, out)
    _wait_for_training(out, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode in (0, 130)  # 0 if the first stop completed before the second arrived
