"""Everything read back from disk goes through one validation layer (records.py): crafted or
damaged checkpoints, model files and run files are one line naming the file and the field,
exit status 2; never a traceback, a hang or an allocation without bound."""

from __future__ import annotations

import json
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import cli, image_folder, one_line, remanifest

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.errors import CheckpointError, ConfigError
from cfgdiff.train import RunLock


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A module's finished two-step run of the tiny preset on a folder (copied by `run`)."""
    from cfgdiff.cli import main

    root = tmp_path_factory.mktemp("records")
    folder = image_folder(root / "folder", 6)
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", root / "run",
            "--steps", "2", "--checkpoint-every", "2", "--sample-every", "0", "--no-progress",
            "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return root / "run", folder


@pytest.fixture
def run(made, tmp_path):
    src, folder = made
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run", folder


def ckpt_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step-0000002"


def resume_argv(run_dir: Path, folder: Path, steps: int = 3) -> list:
    return ["train", "--dataset", f"folder:{folder}", "--out", run_dir, "--resume", "--steps",
            steps, "--no-progress", "--precision", "fp32", "--device", "cpu"]  # fmt: skip


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: SIGALRM raises in the main thread after `seconds`."""

    class Hang(BaseException):  # not an Exception: no handler in the library may swallow it
        pass

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def edit_config(ckpt: Path, change) -> None:
    d = json.loads((ckpt / "config.json").read_text())
    change(d)
    (ckpt / "config.json").write_text(json.dumps(d))
    remanifest(ckpt)


# ----------------------------------------------------------------- config.json


def _set(section, name, value):
    def change(d):
        (d[section] if section else d)[name] = value

    return change


CONFIG_DAMAGE = [
    # (change, what the one line must say)
    (_set("model", "num_heads", "4"), "model.num_heads must be an integer, got '4'"),
    (_set("model", "num_heads", 0), "num_heads must be in [1, 64], got 0"),
    (_set("model", "num_heads", -2), "num_heads must be in [1, 64], got -2"),
    (_set("model", "channel_mult", [1, 2.5]), "model.channel_mult must be a list of integers"),
    (_set("model", "base_channels", 8.0), "model.base_channels must be an integer, got 8.0"),
    (_set("model", "num_classes", 10**9), "num_classes must be <= 100000"),
    (_set("model", "base_channels", 2**20), "base_channels must be <= 1024"),
    (_set("model", "image_size", True), "model.image_size must be an integer, got True"),
    (_set("model", "attn_levels", {"a": 1}), "model.attn_levels must be a list of integers"),
    (_set("train", "adam_betas", [0.9]), "train.adam_betas must be a list of 2 numbers"),
    (_set("train", "lr", None), "train.lr must be a finite number, got None"),
    (_set("train", "preview_per_class", 10**6), "preview_per_class must be in [1, 64]"),
    (_set("train", "seed", -1), "seed must be in [0, 4294967295], got -1"),
    (_set("diffusion", "timesteps", "1000"), "diffusion.timesteps must be an integer"),
    (_set(None, "class_names", [1, 2, 3]), "class_names must be a list of strings"),
    (_set(None, "model", [1, 2]), "model must be a JSON object, got list"),
    (_set(None, "dataset", 7), "dataset must be a string, got 7"),
]


@pytest.mark.parametrize("change,message", CONFIG_DAMAGE, ids=[m for _, m in CONFIG_DAMAGE])
def test_config_fields_are_typed_and_bounded(run, capsys, change, message):
    run_dir, _ = run
    ckpt = ckpt_of(run_dir)
    edit_config(ckpt, change)
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load_for_sampling(ckpt)
    assert str(e.value).startswith(f"{ckpt / 'config.json'}: ") and message in str(e.value)
    line = one_line(*cli(["info", "--checkpoint", ckpt], capsys))
    assert "config.json" in line and message in line and "--" not in line  # fields, not flags


def test_a_network_too_large_to_build_is_refused_before_any_allocation(run, capsys, monkeypatch):
    """Each field in range, the network they make too large: counted on the meta device, and
    the message is about the file, never about --batch-size."""
    ckpt = ckpt_of(run[0])
    edit_config(ckpt, lambda d: d["model"].update(base_channels=1024, channel_mult=[16, 16]))
    line = one_line(*cli(["info", "--checkpoint", ckpt], capsys))
    assert "config.json: describes a network of" in line and "batch" not in line


@pytest.mark.parametrize("where", ["config.json", "MANIFEST.json"])
def test_deeply_nested_json_is_one_line(run, capsys, where):
    ckpt = ckpt_of(run[0])
    (ckpt / where).write_text("[" * 100_000 + "]" * 100_000)
    if where != "MANIFEST.json":
        remanifest(ckpt)
    line = one_line(*cli(["info", "--checkpoint", ckpt], capsys))
    assert f"{where}: not valid JSON (nested deeper than 32 levels)" in line


def test_nan_and_infinity_are_not_json(run):
    ckpt = ckpt_of(run[0])
    text = (ckpt / "config.json").read_text().replace('"lr": 0.001', '"lr": NaN')
    (ckpt / "config.json").write_text(text)
    remanifest(ckpt)
    with pytest.raises(CheckpointError, match="NaN is not a JSON value"):
        ckpt_io.read_config(ckpt)


# ----------------------------------------------------------------- MANIFEST and folders


def test_manifest_must_list_exactly_the_checkpoint_files(run, capsys):
    ckpt = ckpt_of(run[0])
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    del manifest["state.pt"]  # listing fewer files used to "verify"
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="MANIFEST.json: does not list state.pt"):
        ckpt_io.verify(ckpt)
    remanifest(ckpt)
    (ckpt / "notes.txt").write_text("x")  # a file the MANIFEST does not list
    with pytest.raises(CheckpointError, match="notes.txt: not listed in MANIFEST.json"):
        ckpt_io.verify(ckpt)
    (ckpt / "notes.txt").unlink()
    (ckpt / "MANIFEST.json").write_text("[1, 2]")
    line = one_line(*cli(["info", "--checkpoint", ckpt], capsys))
    assert "MANIFEST.json: must be a JSON object" in line


def test_a_listed_file_that_is_a_fifo_is_refused_without_reading_it(run, capsys):
    """Reading a FIFO blocks until someone writes to it: a resume used to open state.pt (to
    learn its precision) before checking anything, and waited for ever."""
    import os

    run_dir, folder = run
    (ckpt_of(run_dir) / "state.pt").unlink()
    os.mkfifo(ckpt_of(run_dir) / "state.pt")
    with time_limit(120):
        line = one_line(*cli(resume_argv(run_dir, folder), capsys))
    assert "--resume: no checkpoint in" in line  # a folder without its files is not one
    line = one_line(*cli(["info", "--checkpoint", ckpt_of(run_dir)], capsys))
    assert "state.pt: not a regular file" in line


def test_resume_verifies_the_manifest_before_reading_the_training_state(run, capsys, monkeypatch):
    """state.pt is a pickle: nothing may read it before its SHA-256 is checked."""
    run_dir, folder = run
    p = ckpt_of(run_dir) / "state.pt"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    p.write_bytes(bytes(raw))
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    argv = resume_argv(run_dir, folder)
    argv[argv.index("fp32")] = "auto"  # auto reads which precision the run trained in
    line = one_line(*cli(argv, capsys))
    assert "state.pt: SHA-256 does not match MANIFEST.json" in line
    assert loads == []


def test_latest_names_a_checkpoint_of_this_run_or_nothing(run, tmp_path):
    run_dir, _ = run
    root = run_dir / "checkpoints"
    elsewhere = tmp_path / "elsewhere" / "checkpoints" / "step-0000002"
    shutil.copytree(ckpt_of(run_dir), elsewhere)
    (elsewhere / "config.json").write_text(
        (elsewhere / "config.json").read_text().replace('"lr": 0.001', '"lr": 0.002')
    )
    remanifest(elsewhere)
    rel = Path("step-0000002") / ".." / ".." / ".." / "elsewhere" / "checkpoints" / "step-0000002"
    for pointer in (str(rel), str(elsewhere), "../..", "step-2"):
        (root / "latest").write_text(pointer + "\n")
        assert ckpt_io.latest_checkpoint(root) == ckpt_of(run_dir), pointer
        assert ckpt_io.resolve(run_dir) == ckpt_of(run_dir)


def test_incomplete_folders_are_not_checkpoints(run, capsys):
    """A folder under checkpoints/ named like one but incomplete is neither resumed from nor
    counted towards --keep."""
    run_dir, folder = run
    root = run_dir / "checkpoints"
    junk = root / "step-0000009"
    junk.mkdir()
    (junk / "config.json").write_text((ckpt_of(run_dir) / "config.json").read_text())
    (root / "latest").unlink()  # left to choose, it must choose a complete one
    assert ckpt_io.latest_checkpoint(root) == ckpt_of(run_dir)
    assert ckpt_io.list_checkpoints(root) == [ckpt_of(run_dir)]
    rc, err = cli(
        [*resume_argv(run_dir, folder, 4), "--keep", "1", "--checkpoint-every", "1"], capsys
    )
    assert rc == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000009"]


def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_not_created(run, tmp_path):
    run_dir, _ = run
    target = tmp_path / "victim"
    (run_dir / ".lock").unlink()
    (run_dir / ".lock").symlink_to(target)
    with pytest.raises(ConfigError, match=r"\.lock is a symbolic link or not a file"):
        with RunLock(run_dir):
            pass
    assert not target.exists()


# ----------------------------------------------------------------- state.pt


def edit_state(ckpt: Path, change) -> None:
    state = torch.load(ckpt / "state.pt", weights_only=True)
    change(state)
    torch.save(state, ckpt / "state.pt")
    remanifest(ckpt)


def test_a_data_position_outside_the_data_is_refused_not_a_hang(run, capsys):
    """A negative offset made the batch iterator draw nothing, for ever, allocating."""
    run_dir, folder = run
    edit_state(ckpt_of(run_dir), lambda s: s["data"].update(offset=-5))
    with time_limit(120):
        line = one_line(*cli(resume_argv(run_dir, folder), capsys))
    assert "state.pt: data.offset must be an integer >= 0" in line
    edit_state(ckpt_of(run_dir), lambda s: s["data"].update(offset=10**6))
    with time_limit(120):
        line = one_line(*cli(resume_argv(run_dir, folder), capsys))
    assert "state.pt: data.offset must be in [0, 18) for 18 training images, got 1000000" in line


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.update(step="2"), "step must be an integer"),
        (lambda s: s.update(step=7), "step must be 2, the step its folder is named for"),
        (lambda s: s.update(loss_acc=float("nan")), "loss_acc must be a finite number"),
        (lambda s: s.update(generator=torch.zeros(3)), "generator must be an RNG state"),
        (lambda s: s.update(optimizer=[1]), "optimizer must be an optimizer state dict"),
        (lambda s: s.update(data_identity={"n": "x"}), "data_identity must be"),
        (lambda s: s.update(precision={"device": "tpu", "precision": "fp8"}), "precision must"),
        (lambda s: s.pop("torch_rng"), "has no 'torch_rng'"),
    ],
)
def test_training_state_fields_are_typed(run, capsys, change, message):
    run_dir, folder = run
    edit_state(ckpt_of(run_dir), change)
    line = one_line(*cli(resume_argv(run_dir, folder), capsys))
    assert "state.pt: " in line and message in line


def test_optimizer_moments_that_do_not_fit_their_parameters_are_refused(run, capsys):
    run_dir, folder = run

    def change(s):
        first = next(iter(s["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(3, 3, 3, 3, 3)

    edit_state(ckpt_of(run_dir), change)
    line = one_line(*cli(resume_argv(run_dir, folder), capsys))
    assert "state.pt: incompatible training state" in line


# ----------------------------------------------------------------- weights


def test_weights_that_are_not_finite_are_refused(run, capsys, tmp_path):
    """NaN weights used to sample black images with exit status 0."""
    from safetensors.torch import load_file, save_file

    ckpt = ckpt_of(run[0])
    tensors = load_file(str(ckpt / "ema.safetensors"))
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, str(ckpt / "ema.safetensors"))
    remanifest(ckpt)
    argv = ["sample", "--checkpoint", ckpt, "--scale", "1", "--out", tmp_path / "x.png",
            "--steps", "2", "--device", "cpu"]  # fmt: skip
    line = one_line(*cli(argv, capsys))
    assert "ema.safetensors: tensor conv_out.bias holds NaN or infinite values" in line
    assert not (tmp_path / "x.png").exists()


def test_sampling_that_turns_non_finite_is_exit_1(run, tmp_path, capsys, monkeypatch):
    """A network whose output is NaN (however it got so) stops sampling: exit status 1, nothing
    written, instead of black images."""
    from cfgdiff.unet import UNet

    real = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    argv = ["sample", "--checkpoint", run[0], "--scale", "1", "--out", tmp_path / "x.png",
            "--steps", "2", "--device", "cpu"]  # fmt: skip
    line = one_line(*cli(argv, capsys), status=(1,))
    assert "sampling gave NaN or infinite values" in line
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------- model files


def _rewrite_model_file(path: Path, change) -> None:
    """Change a model file's metadata and store the SHA-256 it then has, as an attacker would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    change(meta)
    data = meta.get("data")
    meta["sha256"] = ckpt_io._model_file_sha256(meta.get("config", ""), tensors, data)
    path.write_bytes(save(tensors, meta))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update(config="[" * 5000 + "]" * 5000), "nested deeper than 32 levels"),
        (
            lambda m: m.update(config=m["config"].replace('"num_heads": 2', '"num_heads": 0')),
            "num_heads must be in [1, 64], got 0",
        ),  # fmt: skip
        (lambda m: m.update(data='{"n": "x", "sha256": 3}'), "data_identity must be"),
        (lambda m: m.update(dtype="fp64"), "dtype one of fp32, fp16, bf16"),
        (lambda m: m.update(extra="1"), "unknown metadata 'extra'"),
    ],
)
def test_model_file_metadata_is_typed_before_the_tensors_are_read(
    run, tmp_path, capsys, change, message
):
    model = tmp_path / "m.safetensors"
    assert cli(["export", "--checkpoint", run[0], "--out", model], capsys)[0] == 0
    _rewrite_model_file(model, change)
    line = one_line(*cli(["info", "--checkpoint", model], capsys))
    assert str(model) in line and message in line


# ----------------------------------------------------------------- run files


def test_a_loss_csv_cut_short_by_a_crash_is_dropped_on_resume(run, capsys):
    """The last row of loss.csv is appended as a run goes: a crash or a full disk can cut it
    (here inside its step number), and the resume drops it with a line saying so."""
    run_dir, folder = run
    loss = run_dir / "loss.csv"
    whole = loss.read_text()
    loss.write_text(whole + "1")  # "15,0.0123,..." cut after its first character
    rc, err = cli(resume_argv(run_dir, folder), capsys)
    assert rc == 0, err
    assert any("loss.csv: line 3 cut short, as a crash or a full disk leaves it" in e for e in err)
    rows = loss.read_text().splitlines()
    assert rows[:2] == whole.splitlines() and [r.split(",")[0] for r in rows[1:]] == ["2", "3"]
