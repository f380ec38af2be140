"""Checkpoints (checkpoint.py): pruning, damage refused with the file named, loaders that check
even without the manifest; which checkpoint of a run a command uses, and every one passed over
said (a `latest` naming nothing of the run, an incomplete or broken folder); folders cfgdiff did
not write never removed; what each load reads."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import cli, image_folder, remanifest, tiny_config

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.errors import CheckpointError, ConfigError, RuntimeFault
from cfgdiff.train import TrainOptions, train


def test_keep_prunes_old_checkpoints(tmp_path, data):
    train(
        tiny_config(steps=8, checkpoint_every=2, keep=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    names = [p.name for p in ckpt_io.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == ["step-0000006", "step-0000008"]


@pytest.mark.parametrize(
    "name", ["model.safetensors", "ema.safetensors", "state.pt", "config.json"]
)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoints_are_refused(tmp_path, data, name, damage):
    train(
        tiny_config(steps=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "r" / "checkpoints")
    p = ckpt / name
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        p.write_bytes(bytes(raw[: len(raw) // 2]))
    else:  # one flipped bit in the middle of the file
        raw[len(raw) // 2] ^= 0x10
        p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{name}: SHA-256 does not match MANIFEST.json"):
        ckpt_io.load_for_sampling(ckpt)
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        train(tiny_config(steps=4), tmp_path / "r", data, options=TrainOptions(resume=True))


def test_loaders_refuse_damage_even_without_the_manifest(tmp_path, data):
    train(
        tiny_config(steps=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "r" / "checkpoints")
    p = ckpt / "ema.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    from cfgdiff.unet import UNet

    with pytest.raises(CheckpointError, match="ema.safetensors: cannot load"):
        ckpt_io.load_weights(ckpt, "ema", UNet(tiny_config().model))
    s = ckpt / "state.pt"
    s.write_bytes(s.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.pt: cannot load training state"):
        ckpt_io.load_state(ckpt)
    c = json.loads((ckpt / "config.json").read_text())
    c["format_version"] = 99
    (ckpt / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="format_version must be 1, got 99"):
        ckpt_io.read_config(ckpt)
    (ckpt / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no MANIFEST.json"):
        ckpt_io.load_for_sampling(ckpt)


# ----------------------------------------------------------------- which checkpoint is used


def _two_checkpoints(run_dir, data):
    """A run with checkpoints step-2 and step-4 (the newest, `latest`); its checkpoints folder."""
    train(
        tiny_config(steps=4, checkpoint_every=2, sample_every=0),
        run_dir,
        data,
        options=TrainOptions(final_strip=False),
    )
    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt_io.list_checkpoints(root)] == ["step-0000002", "step-0000004"]
    return root


def _resume(run_dir, data, steps=6):
    """Resume the run to `steps`; the events it gave."""
    events = []
    train(
        tiny_config(steps=steps, checkpoint_every=2, sample_every=0),
        run_dir,
        data,
        options=TrainOptions(resume=True, final_strip=False),
        on_event=lambda name, info: events.append((name, info)),
    )
    return events


def _nan_ema(ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "ema.safetensors"))
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, str(ckpt / "ema.safetensors"))
    remanifest(ckpt)


def test_resume_past_a_checkpoint_without_its_state_says_so(tmp_path, data):
    """With state.pt deleted from the newest checkpoint, a resume went back to the one before
    without a word, and deleted the broken folder when it saved that step again."""
    root = _two_checkpoints(tmp_path / "r", data)
    (root / "step-0000004" / "state.pt").unlink()
    events = _resume(tmp_path / "r", data)
    said = [i["text"] for n, i in events if n == "checkpoint_skipped"]
    assert said == [
        f"skipped checkpoint {root / 'step-0000004'}: state.pt is missing; resuming from "
        "step-0000002 (it is left as it is; this run replaces it if it saves step 4)"
    ]
    (skipped,) = [i["skipped"] for n, i in events if n == "checkpoint_skipped"]
    assert skipped == ckpt_io.Skipped(
        root / "step-0000004", "state.pt is missing", root / "step-0000002"
    )
    assert [i["step"] for n, i in events if n == "start"] == [2]
    # cfgdiff wrote that folder: the run saved step 4 over it, whole again
    ckpt_io.verify(root / "step-0000004")


def test_resume_past_nan_in_the_newest_ema_goes_back_one_and_says_so(tmp_path, data):
    """NaN in the newest EMA stopped the resume (exit 2) without offering the checkpoint
    before; a user wants the run to go on from the last good one, told which and why."""
    root = _two_checkpoints(tmp_path / "r", data)
    _nan_ema(root / "step-0000004")
    events = _resume(tmp_path / "r", data)
    (text,) = [i["text"] for n, i in events if n == "checkpoint_skipped"]
    assert text.startswith(
        f"skipped checkpoint {root / 'step-0000004'}: ema.safetensors: tensor conv_out.bias "
        "holds NaN or infinite values (the weights are broken); resuming from step-0000002"
    ), text
    assert [i["step"] for n, i in events if n == "start"] == [2]
    for p in ckpt_io.load_for_sampling(tmp_path / "r").net.parameters():
        assert torch.isfinite(p).all()


def test_the_cli_says_each_skipped_checkpoint_in_one_line(tmp_path, capsys):
    folder, run = image_folder(tmp_path / "folder", 6), tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", run,
            "--steps", "4", "--checkpoint-every", "2", "--sample-every", "0", "--no-progress",
            "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    assert cli(argv, capsys)[0] == 0
    root = run / "checkpoints"
    (root / "step-0000004" / "state.pt").unlink()
    rc, err = cli(["info", "--checkpoint", run], capsys)
    assert rc == 0 and err == [
        f"cfgdiff: skipped checkpoint {root / 'step-0000004'}: state.pt is missing; using "
        "step-0000002"
    ], err
    argv[argv.index("--steps") + 1] = "6"
    rc, err = cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert (
        f"cfgdiff: skipped checkpoint {root / 'step-0000004'}: state.pt is missing; resuming "
        "from step-0000002 (it is left as it is; this run replaces it if it saves step 4)"
    ) in err, err


def test_sampling_a_run_folder_says_which_checkpoints_it_passed_over(tmp_path, data, capsys):
    root = _two_checkpoints(tmp_path / "r", data)
    _nan_ema(root / "step-0000004")
    loaded = ckpt_io.load_for_sampling(tmp_path / "r")
    assert loaded.path == root / "step-0000002"
    (skipped,) = loaded.skipped
    assert skipped.path == root / "step-0000004" and "holds NaN" in skipped.reason
    with pytest.raises(CheckpointError, match="holds NaN"):  # named, it is used or refused
        ckpt_io.load_for_sampling(root / "step-0000004")
    out = tmp_path / "x.npz"
    argv = ["sample", "--checkpoint", tmp_path / "r", "--scale", "1", "--steps", "1",
            "--per-class", "1", "--device", "cpu", "--out", out]  # fmt: skip
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    assert f"cfgdiff: skipped checkpoint {root / 'step-0000004'}: ema.safetensors" in err[0]
    assert err[0].endswith("; using step-0000002"), err
    record = json.loads(str(np.load(out)["settings"]))
    assert record["checkpoint"] == str(root / "step-0000002")
    assert record["skipped_checkpoints"][0]["path"] == str(root / "step-0000004")


def _fifo(path):
    os.mkfifo(path)


@pytest.mark.parametrize(
    "pointer,reason",
    [
        (lambda root: root.joinpath("latest").write_text("/tmp/step-0000002"),
         "it names '/tmp/step-0000002', not a checkpoint folder of this run"),
        (lambda root: root.joinpath("latest").write_text("../../elsewhere/step-0000002"),
         "it names '../../elsewhere/step-0000002', not a checkpoint folder of this run"),
        (lambda root: root.joinpath("latest").symlink_to(root / "step-0000002"),
         "it is a symbolic link, not a file holding a checkpoint's name"),
        (lambda root: _fifo(root / "latest"), "it is not a regular file"),
        (lambda root: root.joinpath("latest").write_text("step-0000090"),
         "it names step-0000090, which is not there"),
    ],
    ids=["absolute", "dotdot", "symlink", "fifo", "missing"],
)  # fmt: skip
def test_a_latest_naming_no_checkpoint_of_the_run_is_ignored_saying_so(
    tmp_path, data, pointer, reason
):
    root = _two_checkpoints(tmp_path / "r", data)
    (root / "latest").unlink()
    pointer(root)
    choice = ckpt_io.choose(root)
    assert choice.checkpoint == root / "step-0000004"
    (skipped,) = choice.skipped
    assert skipped.line() == (f"ignored {root / 'latest'}: {reason}; using step-0000004")
    events = _resume(tmp_path / "r", data)
    (text,) = [i["text"] for n, i in events if n == "checkpoint_skipped"]
    assert text.startswith(f"ignored {root / 'latest'}: ") and "resuming from step-0000004" in text


def test_a_step_folder_holding_a_users_files_is_never_deleted(tmp_path, data):
    """A stray checkpoints/step-N/ holding a user's notes.txt was deleted and replaced without a
    line when training reached step N: the run is now refused before it trains, naming it."""
    run_dir = tmp_path / "r"
    train(tiny_config(steps=2, checkpoint_every=2, sample_every=0), run_dir, data,
          options=TrainOptions(final_strip=False))  # fmt: skip
    root = run_dir / "checkpoints"
    stray = root / "step-0000004"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as e:
        _resume(run_dir, data)
    assert str(e.value) == (
        f"`run_dir`: {stray} holds notes.txt, which cfgdiff did not write; this run would save "
        "its step 4 checkpoint there: move it elsewhere, then run again"
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # a new run in a folder holding only such a folder is refused the same way
    mine = tmp_path / "new" / "checkpoints" / "step-0000004" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("x")
    with pytest.raises(ConfigError, match="step-0000004 holds notes.txt"):
        train(tiny_config(steps=4, sample_every=0), tmp_path / "new", data)
    assert mine.read_text() == "x"
    # and a save that finds one there (made while the run trained) refuses, not replaces
    cfg = tiny_config()
    tensors = {"w": torch.zeros(2)}
    with pytest.raises(
        CheckpointError, match="step-0000004 holds notes.txt, which cfgdiff did not"
    ):
        ckpt_io.save_checkpoint(root, 4, cfg, tensors, tensors, {"step": 4}, keep=5)
    assert (stray / "notes.txt").read_text() == "mine"


def test_pruning_leaves_what_cfgdiff_did_not_write(tmp_path):
    cfg, tensors = tiny_config(), {"w": torch.zeros(2)}
    root = tmp_path / "checkpoints"
    ckpt_io.save_checkpoint(root, 2, cfg, tensors, tensors, {"step": 2}, keep=1)
    (root / "step-0000002" / "notes.txt").write_text("mine")
    ckpt_io.save_checkpoint(root, 4, cfg, tensors, tensors, {"step": 4}, keep=1)
    assert sorted(p.name for p in (root / "step-0000002").iterdir()) == ["notes.txt"]
    assert [p.name for p in ckpt_io.list_checkpoints(root)] == ["step-0000004"]


def test_a_resume_with_no_usable_checkpoint_says_why_for_each(tmp_path, data):
    root = _two_checkpoints(tmp_path / "r", data)
    (root / "step-0000004" / "state.pt").unlink()
    _nan_ema(root / "step-0000002")
    with pytest.raises(CheckpointError) as e:
        _resume(tmp_path / "r", data)
    assert str(e.value).startswith(
        f"`resume=True`: no checkpoint in {root} can be used (step-0000004: state.pt is missing; "
        "step-0000002: ema.safetensors: tensor conv_out.bias holds NaN"
    ), e.value


# ----------------------------------------------------------------- what each load reads


def test_disk_full_at_the_first_checkpoint_claims_no_previous_one(tmp_path, data):
    """The message said "(the previous checkpoint is intact)" when there was none."""
    from test_write_faults import file_size_limit

    with file_size_limit(100_000), pytest.raises(RuntimeFault) as e:
        train(tiny_config(steps=2, sample_every=0), tmp_path / "r", data,
              options=TrainOptions(final_strip=False))  # fmt: skip
    assert "disk full while writing checkpoint step-0000002" in str(e.value)
    assert str(e.value).endswith("(this run has no earlier checkpoint)"), e.value
    # with one before, it is named
    shutil.rmtree(tmp_path / "r")
    train(tiny_config(steps=2, sample_every=0), tmp_path / "r", data,
          options=TrainOptions(final_strip=False))  # fmt: skip
    with file_size_limit(100_000), pytest.raises(RuntimeFault) as e:
        _resume(tmp_path / "r", data, steps=4)
    assert str(e.value).endswith("(the previous checkpoint step-0000002 is intact)"), e.value


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_sampling_never_opens_state_pt_and_the_other_loads_parse_it(tmp_path, data, monkeypatch):
    """checkpoint.py's docstring: every load checks the MANIFEST (state.pt's hash included);
    sampling reads config and weights and never opens state.pt, so a crafted one (its hash
    recomputed) runs nothing there; info and export parse it, a resume parses and uses it."""
    train(tiny_config(steps=2, sample_every=0), tmp_path / "r", data,
          options=TrainOptions(final_strip=False))  # fmt: skip
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "r" / "checkpoints")
    state = ckpt / "state.pt"
    # a pickle that would run a command if it were unpickled without weights_only
    state.write_bytes(b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c"
                      b"\x06system\x94\x93\x94\x8c\x05touch\x94\x85\x94R\x94.")  # fmt: skip
    remanifest(ckpt)
    opened = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real(*a, **k))
    ckpt_io.load_for_sampling(ckpt)
    ckpt_io.load_for_sampling(tmp_path / "r")
    assert opened == []
    with pytest.raises(CheckpointError, match="state.pt: cannot load training state"):
        ckpt_io.training_record(ckpt)  # info and export
    with pytest.raises(CheckpointError, match="state.pt: cannot load training state"):
        ckpt_io.export_model(tmp_path / "r", tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="step-0000002: state.pt: cannot load training"):
        _resume(tmp_path / "r", data, steps=4)
    # its bytes changed without the MANIFEST: every load refuses it, sampling too
    state.write_bytes(state.read_bytes() + b"x")
    with pytest.raises(CheckpointError, match="state.pt: SHA-256 does not match MANIFEST.json"):
        ckpt_io.load_for_sampling(ckpt)
