"""cfgdiff export: one .safetensors model file that sample, eval and sweep take as a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import image_folder
from safetensors import safe_open

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.cli import main
from cfgdiff.errors import CheckpointError


@pytest.fixture
def folder(tmp_path):
    """3 classes x 40 images: enough held-out images for a 10-sample sweep."""
    return image_folder(tmp_path / "folder", 40)


@pytest.fixture
def run(tmp_path, folder):
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", str(out)]
    assert main([*argv, "--steps", "4", "--no-progress", "--precision", "fp32"]) == 0
    return out


def _sample(checkpoint, out):
    argv = ["sample", "--checkpoint", str(checkpoint), "--scale", "3", "--per-class", "2"]
    assert main([*argv, "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out) as z:
        return z["images"], z["class_names"].tolist()


def test_exported_file_samples_like_the_checkpoint(run, tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(f)]) == 0
    assert f"wrote {f}" in capsys.readouterr().out
    images, names = _sample(f, tmp_path / "a.npz")
    expected, expected_names = _sample(run, tmp_path / "b.npz")
    assert np.array_equal(images, expected) and names == expected_names == [
        "class0",
        "class1",
        "class2",
    ]
    # plain safetensors: any reader sees the EMA tensors and the metadata
    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    with safe_open(str(f), "pt") as sf, safe_open(str(ckpt / "ema.safetensors"), "pt") as ema:
        meta = sf.metadata()
        assert sorted(sf.keys()) == sorted(ema.keys())
        assert all((sf.get_tensor(k) == ema.get_tensor(k)).all() for k in sf.keys())
    assert meta["format"] == "cfgdiff-model-1" and meta["weights"] == "ema"
    assert meta["source"] == "run/step-0000004"  # no local path in a file meant to be shipped
    assert json.loads(meta["config"])["model"]["num_classes"] == 3
    assert f.stat().st_size < sum(p.stat().st_size for p in ckpt.iterdir()) / 2


def test_raw_weights_and_sweep_beside_the_file(run, tmp_path):
    f = tmp_path / "raw.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(f), "--raw"]) == 0
    with safe_open(str(f), "pt") as sf:
        assert sf.metadata()["weights"] == "model"
    images, _ = _sample(f, tmp_path / "a.npz")
    assert not np.array_equal(images, _sample(run, tmp_path / "b.npz")[0])  # EMA differs
    argv = ["sweep", "--checkpoint", str(f), "--scales", "0,3", "--n", "10", "--steps", "2"]
    assert main([*argv, "--data-dir", str(tmp_path / "dd"), "--precision", "fp32"]) == 0
    assert (tmp_path / "raw-sweep" / "sweep.csv").is_file()


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_or_foreign_files_are_refused(run, tmp_path, damage, capsys):
    from safetensors.torch import save_file

    f = tmp_path / "m.safetensors"
    ckpt_io.export_model(run, f)
    raw = bytearray(f.read_bytes())
    if damage == "flip":  # one bit in the last tensor's bytes
        raw[-3] ^= 0x01
        f.write_bytes(bytes(raw))
        message = "SHA-256 of config and weights does not match"
    elif damage == "truncate":
        f.write_bytes(bytes(raw[: len(raw) // 2]))
        message = "cannot load"
    else:  # a safetensors file cfgdiff did not write
        import torch

        save_file({"w": torch.zeros(2)}, str(f))
        message = "not a cfgdiff model file"
    with pytest.raises(CheckpointError, match=message):
        ckpt_io.load_for_sampling(f)
    out = tmp_path / "a.png"
    assert main(["sample", "--checkpoint", str(f), "--scale", "3", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "out,message",
    [("m.pt", "--out must end in .safetensors"), ("dir.safetensors", "is a directory")],
)
def test_export_bad_input(run, tmp_path, out, message, capsys):
    (tmp_path / "dir.safetensors").mkdir()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / out)]) == 2
    assert message in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", "x.safetensors"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_export_never_writes_into_a_checkpoint(run, capsys):
    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    for name in ("model.safetensors", "ema.safetensors", "new.safetensors"):
        assert main(["export", "--checkpoint", str(run), "--out", str(ckpt / name)]) == 2
        assert "inside a checkpoint folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    ckpt_io.load_for_sampling(ckpt)  # still verifies


def test_info_on_checkpoints_and_model_files(run, tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    ckpt_io.export_model(run, f)
    assert main(["info", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step-0000004 (checkpoint, step 4; SHA-256 verified)" in out
    assert "3 classes: class0, class1, class2" in out and "1 x 8 x 8" in out
    trained = ckpt_io.recorded_precision(ckpt_io.latest_checkpoint(run / "checkpoints"))
    assert trained == ("cpu", "fp32") and ", trained in fp32 on cpu" in out  # as the run was
    assert main(["info", "--checkpoint", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["trained_with"]
    assert (got["device"], got["precision"]) == trained
    assert main(["info", "--checkpoint", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{f} (model file; SHA-256 verified)" in out and "trained in" not in out
    assert main(["info", "--checkpoint", str(f), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "model file" and d["class_names"] == ["class0", "class1", "class2"]
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01  # damaged: info is also the integrity check
    f.write_bytes(bytes(raw))
    assert main(["info", "--checkpoint", str(f)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_output_to_a_closed_pipe_is_quiet(run):
    """`cfgdiff info ... | head -0`: no traceback and no error line, exit status 141."""
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-m", "cfgdiff", "info", "--checkpoint", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == b""


def test_the_training_summary_names_a_working_export_command(run):
    line = next(x for x in (run / "SUMMARY.txt").read_text().splitlines() if "model file:" in x)
    argv = line.split("model file:")[1].split()
    assert argv[0] == "cfgdiff" and main(argv[1:]) == 0
    assert ckpt_io.load_for_sampling(run / "model.safetensors").cfg.class_names == (
        "class0",
        "class1",
        "class2",
    )


def test_eval_of_a_shipped_file_whose_folder_is_elsewhere(run, folder, tmp_path, capsys):
    import shutil

    f = tmp_path / "m.safetensors"
    ckpt_io.export_model(run, f)
    moved = shutil.move(folder, tmp_path / "moved")
    argv = ["eval", "--checkpoint", str(f), "--scale", "3", "--n", "10", "--steps", "2"]
    argv += ["--data-dir", str(tmp_path / "dd")]
    assert main(argv) == 2
    assert f"trained on folder:{folder}, which is not on this machine; pass --dataset" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--dataset", f"folder:{moved}"]) == 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_files_are_half_the_size_and_sample_alike(run, tmp_path, dtype):
    full, half = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(full)]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(half), "--dtype", dtype]) == 0
    assert half.stat().st_size < 0.6 * full.stat().st_size
    with safe_open(str(half), "pt") as sf:
        assert sf.metadata()["dtype"] == dtype
    a = _sample(half, tmp_path / "a.npz")[0].astype(int)
    b = _sample(full, tmp_path / "b.npz")[0].astype(int)
    assert np.abs(a - b).mean() < 2  # uint8 levels; weights rounded, not changed
    assert next(ckpt_io.load_for_sampling(half).net.parameters()).dtype == torch.float32


def test_the_training_data_identity_travels_with_checkpoint_and_model_file(
    run, folder, tmp_path, capsys
):
    """info says how many images a model was trained on and their SHA-256, from the checkpoint's
    training state or the model file's metadata (covered by the file's hash); files and
    checkpoints from before it was recorded still load, without the line."""
    from cfgdiff.data import load_dataset
    from cfgdiff.train import data_identity

    want = data_identity(load_dataset(f"folder:{folder}"))
    assert want["n"] == 120
    latest = ckpt_io.resolve(run)
    assert ckpt_io.recorded_data_identity(latest) == want
    f = tmp_path / "m.safetensors"
    ckpt_io.export_model(run, f)
    assert ckpt_io.load_for_sampling(f).data == want
    line = f"             120 training images, SHA-256 {want['sha256'][:16]}..."
    for path in (run, f):
        assert main(["info", "--checkpoint", str(path)]) == 0
        assert line in capsys.readouterr().out.splitlines()
        assert main(["info", "--checkpoint", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["data_identity"] == want

    # a model file whose recorded data was edited fails its check
    from safetensors.torch import load_file, save_file

    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    edited = {**meta, "data": json.dumps({"n": 7, "sha256": "0" * 64}, sort_keys=True)}
    save_file(load_file(str(f)), str(tmp_path / "edited.safetensors"), metadata=edited)
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt_io.load_for_sampling(tmp_path / "edited.safetensors")
    # one exported before the identity was recorded: no "data", the old hash
    old = {k: v for k, v in meta.items() if k != "data"}
    tensors = load_file(str(f))
    old["sha256"] = ckpt_io._model_file_sha256(old["config"], tensors)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    assert ckpt_io.load_for_sampling(tmp_path / "old.safetensors").data is None
    assert main(["info", "--checkpoint", str(tmp_path / "old.safetensors")]) == 0
    assert "training images" not in capsys.readouterr().out
