"""Property: any argument vector gives exit status 0 or 2 (never a traceback) and writes
nothing outside the output it names (--out, the data dir, a sweep's default folder)."""

from __future__ import annotations

import os
import tempfile
import urllib.error
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfgdiff.cli import main
from cfgdiff.data import sources
from cfgdiff.errors import DataError
from cfgdiff.metrics import inception

pytestmark = pytest.mark.slow

ROOT = Path(tempfile.mkdtemp(prefix="cfgdiff-fuzz-"))
OUTCOMES: list[int] = []


@pytest.fixture(scope="module")
def world():
    """A folder dataset and a trained tiny checkpoint, made once."""
    import numpy as np
    from PIL import Image

    folder = ROOT / "folder"
    rng = np.random.default_rng(0)
    for c in range(3):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(30):
            a = (rng.random((8, 8)) * 60).astype(np.uint8)
            a[:, 2 * c : 2 * c + 2] = 255
            Image.fromarray(a).save(folder / f"c{c}" / f"{i}.png")
    run = ROOT / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                f"folder:{folder}",
                "--preset",
                "tiny",
                "--out",
                str(run),
                "--steps",
                "4",
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    return folder, run


def _offline(monkeypatch):
    def no_net(*a, **k):
        raise urllib.error.URLError("network is unreachable (test)")

    def no_index(*a, **k):
        raise DataError("package index unreachable (test)")

    monkeypatch.setattr("urllib.request.urlopen", no_net)
    monkeypatch.setattr(sources, "mnist_from_package_index", no_index)
    monkeypatch.setattr(inception, "_from_package_index", no_index)


COMMANDS = [
    "train",
    "sample",
    "eval",
    "sweep",
    "export",
    "info",
    "data",
    "data fetch",
    "data info",
    "eval train-classifier",
    "bogus",
    "",
]
OPTION_VALUES = {
    "--dataset": ["mnist", "cifar10", "imagenet", "FOLDER", "folder:", "folder:/nonexistent"],
    "--out": ["OUT/a.png", "OUT/b.npz", "OUT/c.jpg", "OUT", "OUT/run", "OUT/m.safetensors"],
    "--checkpoint": ["RUN", "RUN/checkpoints", "/nonexistent", "FOLDER", "OUT/m.safetensors"],
    "--guide-checkpoint": ["RUN", "/nonexistent"],
    "--scale": ["3", "1", "0", "-50", "nan", "x"],
    "--w": ["2", "-1", "1e9"],
    "--scales": ["0,1,3", "1,1", "a,b", ""],
    "--steps": ["1", "3", "0", "-1", "abc", "1e9"],
    "--n": ["10", "5", "100000", "x"],
    "--per-class": ["1", "0", "2"],
    "--classes": ["0,1", "0,9", "-1", "x"],
    "--sampler": ["ddpm", "ddim", "dpmpp-2m", "euler"],
    "--spacing": ["logsnr", "cubic"],
    "--batch-size": ["1", "0", "3"],
    "--preset": ["tiny", "cpu-demo", "huge"],
    "--lr": ["0.001", "2", "-1"],
    "--label-dropout": ["0.1", "1", "x"],
    "--t-sampling": ["uniform", "logit-normal", "lognormal"],
    "--t-mean": ["0.5", "9", "x"],
    "--t-std": ["1", "0"],
    "--guidance-interval": ["0.5,10", "3,1", "x"],
    "--rescale": ["0.5", "2"],
    "--negative-class": ["1", "99"],
    "--threshold": ["dynamic", "soft"],
    "--device": ["cpu", "cuda", "tpu"],
    "--precision": ["fp32", "bf16", "fp8"],
    "--image-size": ["8", "7", "99999"],
    "--channels": ["1", "2"],
    "--keep": ["1", "0"],
    "--seed": ["0", "-5"],
    "--features": ["classifier", "inception", "vgg"],
    "--compile": ["off", "sometimes"],
    "--dtype": ["fp16", "int8"],
    "--inception": ["/nonexistent.pt", "FOLDER"],
    "--samples": ["FOLDER", "OUT/b.npz", "/nonexistent", "RUN"],
}
FLAGS = ["--raw", "--resume", "--apg", "--no-progress", "--help", "mnist", "fashion-mnist"]
FLAGS += ["--hflip", "--no-hflip"]


VALID = [
    "sample --checkpoint RUN --scale 3 --out OUT/a.png --steps 2 --per-class 1",
    "sample --checkpoint RUN --w 1 --out OUT/b.npz --steps 2 --per-class 1",
    "eval --checkpoint RUN --scale 2 --n 10 --steps 2",
    "sweep --checkpoint RUN --scales 0,2 --n 10 --steps 2 --out OUT/sw",
    "data info FOLDERDS",
    "export --checkpoint RUN --out OUT/m.safetensors",
    "info --checkpoint RUN",
    "train --dataset FOLDER --out OUT/run",
]


@st.composite
def argvs(draw):
    if draw(st.booleans()):  # a valid command with a few random options appended
        argv = draw(st.sampled_from(VALID)).split()
        extra = draw(st.integers(0, 3))
    else:
        argv = draw(st.sampled_from(COMMANDS)).split()
        extra = draw(st.integers(0, 6))
    for _ in range(extra):
        kind = draw(st.integers(0, 9))
        if kind < 7:
            opt = draw(st.sampled_from(sorted(OPTION_VALUES)))
            argv += [opt, draw(st.sampled_from(OPTION_VALUES[opt]))]
        elif kind < 9:
            argv.append(draw(st.sampled_from(FLAGS)))
        else:
            argv.append(draw(st.text(min_size=0, max_size=6)))
    # keep runs short: a real training run only with the tiny preset and few steps
    if argv[:1] == ["train"]:
        argv += ["--preset", "tiny", "--steps", "2"]
    return argv


def _snapshot(root: Path) -> dict[str, float]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                out[p] = os.stat(p).st_mtime_ns
            except FileNotFoundError:
                pass
    return out


# CI runs a fixed set of 200 examples (derandomize): the guard below counts successes, and with
# fresh random examples on every run that count varied from 10 to 37, so it could fail by chance.
# CFGDIFF_FUZZ=N explores N new random examples instead (run by hand: 3,000 passed).
EXPLORE = int(os.environ.get("CFGDIFF_FUZZ", "0"))


@settings(
    max_examples=EXPLORE or 200,
    derandomize=not EXPLORE,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(argv=argvs())
def test_any_argv_exits_0_or_2_and_writes_only_its_output(world, monkeypatch, argv):
    folder, run = world
    _offline(monkeypatch)
    work = Path(tempfile.mkdtemp(dir=ROOT, prefix="w"))
    data_dir = work / "data"
    monkeypatch.setenv("CFGDIFF_DATA_DIR", str(data_dir))
    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.chdir(work)
    real = []
    for prev, a in zip([""] + argv, argv, strict=False):
        if a == "FOLDERDS":
            a = f"folder:{folder}"
        elif a == "FOLDER":
            a = f"folder:{folder}" if prev == "--dataset" else str(folder)
        elif a.startswith("RUN"):
            a = str(run) + a[3:]
        elif a.startswith("OUT"):
            a = str(work / "out") + a[3:]
        real.append(a)
    before = _snapshot(ROOT)
    rc = main(real)
    OUTCOMES.append(rc)
    assert rc in (0, 2), real
    after = _snapshot(ROOT)
    changed = {p for p in after if before.get(p) != after[p]}
    allowed = [str(work / "out"), str(data_dir), str(run / "sweep")]
    if "--out" in real and real[real.index("--out") + 1 :][:1]:
        allowed.append(real[real.index("--out") + 1])
    bad = [p for p in changed if not any(p.startswith(a) for a in allowed)]
    assert not bad, (real, bad)


def test_the_fuzzer_reached_successful_commands_too():
    """Guard against a generator that only ever produces errors."""
    assert OUTCOMES.count(0) >= 8, (OUTCOMES.count(0), len(OUTCOMES))  # 22 of the fixed 200
