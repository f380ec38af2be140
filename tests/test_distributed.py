"""Training, sampling and evaluation over several processes (dist.py; torch.distributed, gloo on
the CPU, two processes of a tiny UNet), against one process doing the same.

The multi-process tests launch `python -m cfgdiff` twice with the environment torchrun gives its
workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so that each process's exit
status and stderr can be checked; one launches through torchrun itself."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_folder, tiny_config, write_shards

from cfgdiff import dist
from cfgdiff.cli import main
from cfgdiff.data.batches import DeviceBatches
from cfgdiff.diffusion import training_loss
from cfgdiff.errors import ConfigError, RuntimeFault
from cfgdiff.schedule import make_schedule

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT_S = 15  # CFGDIFF_DIST_TIMEOUT of the launched processes
# 2 processes of one thread each, as one process of 2 threads: the float reductions differ in
# order (DDP averages the two halves' gradients), so weights agree to rounding, not bit for bit
WEIGHT_ATOL = 1e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env["CFGDIFF_DIST_TIMEOUT"] = str(TIMEOUT_S)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`python -m cfgdiff ARGV` as ranks 0..world-1 of one job."""
    port = _port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "cfgdiff", *map(str, argv)],
            env=_env(
                RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]


def _finish(procs, timeout: float = 120) -> list[tuple[int, str, str]]:
    return [(p.wait(timeout), *p.communicate()) for p in procs]


def _torchrun(argv: list[str], world: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", "-m", "cfgdiff", *map(str, argv)]  # fmt: skip
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)


def _train_argv(folder: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in [
        "train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", out,
        "--sample-every", "0", "--checkpoint-every", "5", "--no-progress", "--precision", "fp32",
        "--device", "cpu", "--compile", "off", *extra,
    ]]  # fmt: skip


def _losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "loss.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def _weights(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def _assert_close_runs(a: Path, b: Path, step: int) -> None:
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    assert np.allclose([v for _, v in la], [v for _, v in lb], rtol=0, atol=1e-5), (la, lb)
    for name in ("model", "ema"):
        wa, wb = _weights(a, step, name), _weights(b, step, name)
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst < WEIGHT_ATOL, (name, worst)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 7 8x8 images: 21, so a global batch of 8 crosses epochs, and eval --n 10 fits."""
    return image_folder(tmp_path_factory.mktemp("dist") / "folder", 7)


@pytest.fixture(scope="module")
def one(folder, tmp_path_factory):
    """The reference: one process, 10 steps, checkpoints at 5 and 10."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(_train_argv(folder, out, "--steps", "10")) == 0
    assert not torch.distributed.is_initialized()  # one process never starts a group
    return out


# --- the pieces, in one process


@pytest.mark.parametrize("world", [2, 4])
def test_parts_of_the_global_batch_are_disjoint_and_cover_it(world):
    """The parts of W processes, put in rank order, are the one process's batches (3 epochs of
    18 images, flips on, batches crossing epochs), and over an epoch of 16 images they hold
    each image once: disjoint, and covering the order."""
    for n, steps in ((18, 7), (16, 2)):
        images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
        labels = torch.arange(n)
        whole = DeviceBatches(images, labels, 8, 3, "cpu", hflip=True)
        parts = [
            DeviceBatches(images, labels, 8, 3, "cpu", hflip=True, part=(r, world))
            for r in range(world)
        ]
        seen = []
        for _ in range(steps):
            x, y = whole.next()
            got = [p.next() for p in parts]
            assert torch.equal(torch.cat([g[1] for g in got]), y)
            assert torch.equal(torch.cat([g[0] for g in got]), x)
            assert all(p.state() == whole.state() for p in parts)  # one position for all
            seen += [i for g in got for i in g[1].tolist()]
        if n == 16:
            assert sorted(seen) == list(range(16))


def test_split_draws_are_the_whole_batch_draws(tiny_net):
    """The loss of a batch split in parts (each drawing the global batch's t, eps and dropout
    and keeping its rows) averages to the one-process loss; a single part is the one-process
    code path exactly."""
    cfg = tiny_config()
    d = cfg.diffusion
    sched = make_schedule(d.schedule, d.timesteps)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    y = torch.arange(8) % 3

    def loss(xs, ys, rows=None):
        g = torch.Generator().manual_seed(5)
        return training_loss(tiny_net, xs, ys, sched, d, 3, g, rows=rows)

    whole = loss(x, y)
    assert torch.equal(whole, loss(x, y, rows=(0, 8)))
    halves = [loss(x[r * 4 : r * 4 + 4], y[r * 4 : r * 4 + 4], rows=(r * 4, 8)) for r in (0, 1)]
    assert torch.allclose((halves[0] + halves[1]) / 2, whole, atol=1e-6)
    assert not torch.allclose(halves[0], halves[1])  # each part has its own noise


def test_world_from_the_environment_and_the_batch_rule(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist.detect() == dist.World() and not dist.world().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.detect() == dist.World(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK 4 outside WORLD_SIZE 4"):
        dist.detect()
    w = dist.World(1, 4)
    assert dist.per_rank_batch(32, w) == 8
    with pytest.raises(ConfigError, match="`batch_size` 30 is the global batch and must be a"):
        dist.per_rank_batch(30, w)
    with pytest.raises(ConfigError, match="`batch_size` 2 is the global batch, smaller than"):
        dist.per_rank_batch(2, w)
    parts = [dist.shard(10, dist.World(r, 4)) for r in range(4)]
    assert [i for p in parts for i in p] == list(range(10))


def _collectives(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    got = {}
    with dist.session("cpu") as w:
        got["any"] = (dist.any_rank(rank == 1, w), dist.any_rank(False, w))
        got["every"] = dist.every_rank(rank == 0, w)
        got["first"] = (dist.first_step(-1 if rank == 0 else 7, w), dist.first_step(-1, w))
        got["mean"] = dist.mean_(torch.tensor(float(rank)), w).item()
        got["gather"] = dist.gather(torch.arange(5)[dist.shard(5, w).start :][:3], 5, w).tolist()
        same = {"a": torch.ones(3), "b": torch.zeros(2)}
        dist.check_equal(same, "the EMA", w)
        differs = {"a": torch.ones(3), "b": torch.full((2,), float(rank))}
        try:
            dist.check_equal(differs, "the EMA", w)
            got["check"] = None
        except RuntimeFault as e:
            got["check"] = str(e)
    q.put((rank, got))


def test_collectives_on_two_processes():
    ctx = torch.multiprocessing.get_context("spawn")
    q, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=_collectives, args=(r, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for got in results.values():
        assert got["any"] == (True, False) and got["every"] is False
        assert got["first"] == (7, -1) and got["mean"] == 0.5
        assert got["gather"] == [0, 1, 2, 3, 4]
        assert got["check"] == (
            "the EMA differs across processes: `b` on rank 1 is not rank 0's; nothing was written"
        )


# --- whole commands on two processes


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_across_world_sizes(one, folder, tmp_path):
    """2 processes (torchrun) at the same global batch train as 1 does; a checkpoint of 1
    process resumes on 2 and one of 2 on 1, continuing the same order and loss trace."""
    two = tmp_path / "two"
    r = _torchrun(_train_argv(folder, two, "--steps", "10"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 8 = 4 per process x 2" in r.stderr
    assert r.stderr.count("done: 10 steps") + r.stdout.count("done: 10 steps") == 1  # rank 0
    _assert_close_runs(one, two, 10)

    def halfway(src: Path, dst: Path) -> Path:  # the run as it was at step 5
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "checkpoints" / "step-0000010")
        return dst

    onto_two = halfway(one, tmp_path / "onto_two")
    procs = _launch(["train", "--out", onto_two, "--resume", "--steps", "10", "--no-progress",
                     "--device", "cpu", "--compile", "off"])  # fmt: skip
    for rc, _out, err in _finish(procs):
        assert rc == 0, err[-3000:]
    _assert_close_runs(one, onto_two, 10)

    onto_one = halfway(two, tmp_path / "onto_one")
    argv = ["train", "--out", onto_one, "--resume", "--steps", "10", "--no-progress"]
    assert main([*map(str, argv), "--device", "cpu", "--compile", "off"]) == 0
    _assert_close_runs(one, onto_one, 10)


@pytest.mark.slow
def test_two_processes_train_a_text_model_as_one(folder, tmp_path):
    """A text model (captions of the class names, filler words) on 2 processes draws each
    image's caption and filler words as 1 process does, so it trains the same."""
    pytest.importorskip("wordllama", reason="the text extra is not installed")
    text = ["--condition", "text", "--steps", "6", "--filler-words", "0.5"]
    one_text, two_text = tmp_path / "one", tmp_path / "two"
    assert main(_train_argv(folder, one_text, *text)) == 0
    r = _torchrun(_train_argv(folder, two_text, *text))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_close_runs(one_text, two_text, 5)


@pytest.mark.slow
def test_two_processes_decode_their_own_shards_and_train_on_their_captions_as_one(tmp_path):
    """Captioned tar shards on 2 processes: each decodes its own shards, rank 0 joins them into
    the cache one process writes, byte for byte, and a text model trains on the captions as on
    one process."""
    pytest.importorskip("webdataset")
    pytest.importorskip("wordllama", reason="the text extra is not installed")
    folder = image_folder(tmp_path / "f", 7)  # 21 images: 6 shards of 4
    caps = {i: f"bar number {i % 5}" for i in range(0, 21, 2)}
    shards = write_shards(folder, tmp_path / "s", per_shard=4, captions=caps)

    def argv(out: Path, data: Path) -> list[str]:
        a = _train_argv(folder, out, "--condition", "text", "--steps", "6", "--data-dir", data)
        return [f"shards:{shards}" if x == f"folder:{folder}" else x for x in a]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(argv(one, tmp_path / "d1")) == 0
    r = _torchrun(argv(two, tmp_path / "d2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 0 of 2 decoding 3 of 6 shards" in r.stderr
    assert "(6 decoded by the processes)" in r.stderr
    e1, e2 = ((tmp_path / d / "cache" / "shards").glob("*/*") for d in ("d1", "d2"))
    (e1,), (e2,) = list(e1), list(e2)  # the parts are gone once joined
    for name in ("images.npy", "labels.npy", "captions.json"):
        assert (e1 / name).read_bytes() == (e2 / name).read_bytes(), name
    _assert_close_runs(one, two, 5)


@pytest.mark.slow
def test_sharded_sample_and_eval_equal_one_process(one, tmp_path, capsys):
    """`sample` on 2 processes writes the .npz one process writes; `eval` reports the same
    figures (the judge is trained once, before, into a shared data directory)."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.metrics.evaluate import ReferenceOptions, build_reference

    dd = tmp_path / "dd"
    build_reference(load_for_sampling(one).cfg, 10, ReferenceOptions(data_dir=dd))
    common = ["--checkpoint", one, "--scale", "2", "--steps", "3", "--device", "cpu",
              "--precision", "fp32", "--sampler", "ddpm"]  # fmt: skip
    sample = ["sample", *common, "--per-class", "4", "--batch-size", "2"]
    evaluate = ["eval", *common, "--n", "10", "--data-dir", dd]
    assert main([*map(str, sample), "--out", str(tmp_path / "one.npz")]) == 0
    assert main([*map(str, evaluate), "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    results = _finish(_launch([*sample, "--out", tmp_path / "two.npz"]))
    results += _finish(_launch([*evaluate, "--json", tmp_path / "two.json"]))
    for rc, _out, err in results:
        assert rc == 0, err[-3000:]
    assert [out.count("wrote 12 images") for _, out, _ in results[:2]] == [1, 0]  # rank 0 alone
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert set(a.files) == set(b.files)
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    ea = json.loads((tmp_path / "one.json").read_text())
    eb = json.loads((tmp_path / "two.json").read_text())
    # the same images; the judge's features differ by float rounding only (1 thread per
    # process there, 2 here)
    for key in ("fid", "kid", "is", "precision", "recall", "class_accuracy"):
        assert eb["generated"][key] == pytest.approx(ea["generated"][key], rel=1e-6, abs=1e-9)
    # without --device (the settings' default, auto) the processes join on the auto device
    auto = [w for w in sample if w not in ("--device", "cpu")]
    for rc, _out, err in _finish(_launch([*auto, "--out", tmp_path / "auto.npz"])):
        assert rc == 0, err[-3000:]
    c = np.load(tmp_path / "auto.npz")
    assert np.array_equal(a["images"], c["images"])


def _wait_for_rows(run: Path, procs, rows: int = 2, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        csv_path = run / "loss.csv"
        if csv_path.is_file() and len(csv_path.read_text().splitlines()) > rows:
            return
        for p in procs:
            assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    raise AssertionError("training did not start")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_one_checkpoint(folder, tmp_path):
    run = tmp_path / "run"
    argv = _train_argv(folder, run, "--steps", "1000000", "--checkpoint-every", "0")
    procs = _launch(argv)
    _wait_for_rows(run, procs)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs, timeout=60)
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    ckpts = list((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert f"stopped at step {step}; checkpoint" in results[0][1]


@pytest.mark.slow
def test_killed_rank_makes_the_other_exit_within_the_timeout(folder, tmp_path):
    run = tmp_path / "run"
    procs = _launch(_train_argv(folder, run, "--steps", "1000000", "--checkpoint-every", "0"))
    _wait_for_rows(run, procs)
    procs[1].kill()
    t0 = time.time()
    rc, _, err = _finish(procs[:1], timeout=TIMEOUT_S + 30)[0]
    assert time.time() - t0 < TIMEOUT_S + 10
    assert rc == 1, err[-2000:]
    lines = err.strip().splitlines()
    errors = [e for e in lines if e.startswith("cfgdiff: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert "rank 0 of 2: another process of this run died or stopped answering" in errors[0]
    procs[1].wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch, words",
    [("7", "--batch-size 7 is the global batch and must be a multiple of the 2 processes"),
     ("1", "--batch-size 1 is the global batch, smaller than the 2 processes")],
)  # fmt: skip
def test_a_batch_that_does_not_split_is_refused(folder, tmp_path, batch, words):
    procs = _launch(_train_argv(folder, tmp_path / "run", "--steps", "2", "--batch-size", batch))
    for rc, _, err in _finish(procs, timeout=90):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and words in lines[0], lines
        assert lines[0].startswith("cfgdiff: error: ")
    assert not (tmp_path / "run").exists()


def test_torchrun_passes_every_flag_on_but_n(capsys):
    """torchrun's parser also reads the options after `-m cfgdiff`: every cfgdiff flag must
    reach cfgdiff, except `--n`, which it takes for an abbreviation of its own; so `--n` has
    the alias `--num-samples`, which does reach it."""
    from torch.distributed.run import get_args_parser

    from cfgdiff.cli import build_parser
    from cfgdiff.cli.options import option_strings

    launcher = get_args_parser()
    refused = []
    for flag in sorted(option_strings(build_parser())):
        try:
            args = launcher.parse_args(["--standalone", "-m", "cfgdiff", "eval", flag, "1"])
            assert args.training_script_args == ["eval", flag, "1"], flag
        except SystemExit:
            refused.append(flag)
    capsys.readouterr()
    assert refused == ["--n"]
    assert "--num-samples" in option_strings(build_parser())
    for command in ("eval", "sweep"):
        a = build_parser().parse_args([command, "--checkpoint", "x", "--num-samples", "12"])
        assert a.n == 12
