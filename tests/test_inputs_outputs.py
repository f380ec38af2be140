"""Outputs never clobber inputs, and inputs are bounded: an output path that is or lies inside an
input is refused before any work, with the input left byte for byte as it was; a decompression
bomb (PNG or gzip) is one line, not a traceback or gigabytes; labels that are no class are
refused, not truncated; previews of a dataset with many classes stay small."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import pytest
from conftest import cli, image_folder, one_line, tiny_folder_run

from cfgdiff.errors import DataError


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished run of the tiny preset on a folder, and its model file."""
    from cfgdiff.cli import main

    root = tmp_path_factory.mktemp("inout")
    run, folder = tiny_folder_run(root)
    model = root / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(model)]) == 0
    return run, folder, model


def snapshot(*paths):
    """Every file under `paths` with its bytes."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        out.update({str(q): q.read_bytes() for q in files})
    return out


def ckpt_of(run):
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def test_eval_json_into_a_checkpoint_is_refused_before_work(made, capsys):
    run, _, _ = made
    before = snapshot(run)
    target = ckpt_of(run) / "MANIFEST.json"
    rc, err = cli(["eval", "--checkpoint", run, "--scale", "1", "--n", "10", "--json", target],
                  capsys)  # fmt: skip
    line = one_line(rc, err)
    assert "--json" in line and "lies inside" in line, line
    assert snapshot(run) == before


def test_eval_json_onto_a_model_file_is_refused(made, capsys):
    _, _, model = made
    before = snapshot(model)
    rc, err = cli(["eval", "--checkpoint", model, "--scale", "1", "--n", "10", "--json", model],
                  capsys)  # fmt: skip
    assert "--json" in one_line(rc, err)
    assert snapshot(model) == before


@pytest.mark.parametrize("name", ["grid.png", "arrays.npz", "pictures"])
def test_sample_out_inside_the_checkpoint_is_refused(made, capsys, name):
    run, _, _ = made
    before = snapshot(run)
    out = ckpt_of(run) / name
    rc, err = cli(["sample", "--checkpoint", run, "--scale", "2", "--steps", "2",
                   "--per-class", "1", "--device", "cpu", "--out", out], capsys)  # fmt: skip
    assert "--out" in one_line(rc, err)
    assert snapshot(run) == before and not out.exists()


def test_sample_out_inside_the_dataset_folder_is_refused(made, capsys):
    run, folder, _ = made
    before = snapshot(folder)
    out = folder / "c0" / "x.png"
    rc, err = cli(["sample", "--checkpoint", run, "--scale", "2", "--steps", "2",
                   "--per-class", "1", "--device", "cpu", "--out", out,
                   "--dataset", f"folder:{folder}"], capsys)  # fmt: skip
    one_line(rc, err)
    assert snapshot(folder) == before


def test_sweep_out_inside_the_dataset_folder_is_refused(made, capsys):
    """The sweep folder must not become a class folder of the --dataset folder it compares
    with (checked before any work)."""
    run, folder, _ = made
    before = snapshot(folder)
    argv = ["sweep", "--checkpoint", run, "--scales", "1", "--n", "10", "--steps", "2",
            "--out", folder / "sweep", "--dataset", f"folder:{folder}"]  # fmt: skip
    line = one_line(*cli(argv, capsys))
    assert "--out" in line and "the dataset folder" in line, line
    assert snapshot(folder) == before and not (folder / "sweep").exists()


@pytest.mark.parametrize("name", ["ema.safetensors", "new.safetensors"])
def test_export_into_its_checkpoint_is_refused(made, capsys, name):
    run, _, _ = made
    before = snapshot(run)
    rc, err = cli(["export", "--checkpoint", run, "--out", ckpt_of(run) / name], capsys)
    assert "--out" in one_line(rc, err)
    assert snapshot(run) == before


# ----------------------------------------------------------------- a run folder's own files


def test_the_run_layout_names_every_file_a_run_writes(made):
    """run_layout.RUN_FILES, the list every output is checked against, holds everything
    `cfgdiff train` wrote in the run folder."""
    from cfgdiff.run_layout import RUN_FILES

    run, _, _ = made
    assert {p.name for p in run.iterdir()} <= {f.name for f in RUN_FILES}


@pytest.mark.parametrize("given", ["run", "step", "checkpoints", "latest"])
def test_eval_json_onto_the_runs_training_log_is_refused(made, capsys, given):
    """`cfgdiff eval --json RUN/loss.csv` overwrote the training log (exit 0), and a resume
    then refused the run; whichever way the checkpoint is given, it is refused before work."""
    run, _, _ = made
    checkpoint = {"run": run, "step": ckpt_of(run), "checkpoints": run / "checkpoints",
                  "latest": run / "checkpoints" / "latest"}[given]  # fmt: skip
    before = snapshot(run)
    argv = ["eval", "--checkpoint", checkpoint, "--scale", "1", "--n", "10", "--json",
            run / "loss.csv"]  # fmt: skip
    line = one_line(*cli(argv, capsys))
    assert line == (
        f"cfgdiff: error: --json {run / 'loss.csv'}: is the run's training log, an input of "
        "`cfgdiff train --resume`; write it elsewhere"
    )
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "argv,words",
    [
        (["sample", "--scale", "1", "--out", "{run}/real.png"], "the run's grid of real images"),
        (["sample", "--scale", "1", "--out", "{run}/samples/x.png"], "lies inside the run's"),
        (["sample", "--scale", "1", "--out", "{run}/guidance_strip.png"], "guidance strip"),
        (["sample", "--scale", "1", "--out", "{run}/loss.png"], "the run's loss curve"),
        (["sweep", "--scales", "1", "--n", "10", "--out", "{run}/samples"], "preview grids"),
        (["sweep", "--scales", "1", "--n", "10", "--out", "{run}/tensorboard"], "TensorBoard"),
        (["eval", "--scale", "1", "--n", "10", "--json", "{run}/SUMMARY.txt"], "the run's summary"),
        (["eval", "--scale", "1", "--n", "10", "--json", "{run}/eval.csv"], "evaluations"),
        (["eval", "--scale", "1", "--n", "10", "--json", "{run}/.lock"], "the run's lock"),
        (["export", "--out", "{run}/captions.safetensors"], "a text run's caption table"),
    ],
    ids=lambda v: v[-1].rsplit("/", 1)[-1] if isinstance(v, list) else None,
)  # fmt: skip
def test_no_output_takes_one_of_the_runs_own_files(made, capsys, argv, words):
    """Every command that writes refuses a target that is, or lies inside, a file or folder of
    the run it reads, in one line naming the flag, the path and what the file is."""
    run, _, _ = made
    before = snapshot(run)
    argv = [a.format(run=run) for a in argv]
    line = one_line(*cli([argv[0], "--checkpoint", run, *argv[1:]], capsys))
    assert f" {argv[-1]}: " in line and words in line and "write it elsewhere" in line, line
    assert argv[-2] in line, line  # the flag
    assert snapshot(run) == before


def test_every_name_of_the_run_layout_is_refused(made):
    """The whole list, at the library's boundary (checkpoint.input_paths)."""
    from cfgdiff.checkpoint import input_paths
    from cfgdiff.errors import ConfigError
    from cfgdiff.files import refuse_overlap
    from cfgdiff.run_layout import RUN_FILES

    run, _, _ = made
    for f in RUN_FILES:
        for target in (run / f.name, run / f.name / "x.png"):
            with pytest.raises(ConfigError, match=f.what):
                refuse_overlap(target, input_paths(run))


def test_a_new_file_of_the_users_choosing_in_the_run_folder_is_allowed(made, capsys):
    """What SUMMARY.txt suggests (RUN/eval_s3.json, RUN/model.safetensors) and any other new
    name are the user's: only the run's own names are refused."""
    from cfgdiff.metrics.eval import EvalRequest
    from cfgdiff.sampling.request import SampleRequest

    run, _, _ = made
    EvalRequest(SampleRequest(checkpoint=run, scale=3), json=run / "eval_s3.json").outputs()
    out = run / "grid.png"
    argv = ["sample", "--checkpoint", run, "--scale", "2", "--steps", "1", "--per-class", "1",
            "--device", "cpu", "--out", out]  # fmt: skip
    rc, err = cli(argv, capsys)
    assert rc == 0 and out.is_file(), err
    out.unlink()


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares width x height grey pixels and holds a few bytes of them: what a
    decompression bomb's header looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_png_in_a_folder_is_one_line(tmp_path, capsys):
    folder = image_folder(tmp_path / "folder", 3)
    bomb = folder / "class0" / "bomb.png"
    _png_header_only(bomb, 8_500, 8_500)  # past cfgdiff's limit, below Pillow's own
    rc, err = cli(["data", "info", f"folder:{folder}"], capsys)
    line = one_line(rc, err)
    assert "bomb.png" in line and "8500x8500" in line and "decompression bomb" in line, line
    _png_header_only(bomb, 30_000, 30_000)  # past Pillow's: its error, in one line too
    rc, err = cli(["data", "info", f"folder:{folder}"], capsys)
    line = one_line(rc, err)
    assert "bomb.png" in line and "decompression bomb" in line, line


def test_a_gzip_bomb_is_stopped_at_the_limit(tmp_path):
    from cfgdiff.data.idx import read_idx_bytes

    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00" * 200_000))  # 200 kB from a few hundred bytes
    assert path.stat().st_size < 2_000
    with pytest.raises(DataError, match="decompresses to more than"):
        read_idx_bytes(path, max_bytes=100_000)
    assert len(read_idx_bytes(path, max_bytes=300_000)) == 200_000


@pytest.mark.parametrize("bad", [2.7, np.nan, -1, 3])
def test_eval_samples_labels_that_are_no_class_are_refused(tmp_path, capsys, bad):
    folder = image_folder(tmp_path / "folder", 12)
    path = tmp_path / "s.npz"
    labels = np.arange(12) % 3
    labels = np.where(np.arange(12) == 5, bad, labels)  # one sample asked for no class at all
    np.savez(path, images=np.zeros((12, 1, 8, 8), np.uint8), labels=labels)
    rc, err = cli(["eval", "--samples", path, "--dataset", f"folder:{folder}"], capsys)
    line = one_line(rc, err)
    assert "--samples" in line and "labels" in line, line


def test_eval_samples_float_labels_that_are_whole_are_classes(tmp_path):
    from cfgdiff.metrics.evaluate import read_samples

    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((12, 1, 8, 8), np.uint8), labels=(np.arange(12) % 3) * 1.0)
    _, y = read_samples(path, ["class0", "class1", "class2"])
    assert y.tolist() == (np.arange(12) % 3).tolist()  # 2.0 is class 2


def test_previews_of_many_classes_show_a_bounded_sample_of_them():
    from cfgdiff.sampling.previews import MAX_SHOWN_CLASSES, shown_classes

    assert shown_classes(10) == list(range(10))
    many = shown_classes(10_000)
    assert len(many) == MAX_SHOWN_CLASSES and many[0] == 0 and many[-1] == 9_999
    assert many == sorted(set(many))
