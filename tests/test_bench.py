"""The benchmarks' quick modes run (CPU, seconds) and print their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    "script,expect",
    [
        (["train_throughput.py", "--quick", "--presets", "tiny"], "bf16 img/s"),
        (["sample_throughput.py", "--quick", "--preset", "tiny"], "dpmpp-2m"),
        (["sample_throughput.py", "--quick", "--preset", "tiny", "--runs", "ddim:3"], "ddim  "),
        (["samplers.py", "--quick"], "ODE err s=3"),
        (["time_to_quality.py", "--quick"], "at the end"),
        (["time_to_quality.py", "--quick", "--schedule", "budget,held"], "schedule: "),
    ],
)
def test_quick_benchmarks(script, expect):
    out = subprocess.run(
        [sys.executable, str(BENCH / script[0]), *script[1:], "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout
