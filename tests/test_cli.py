"""Every subcommand through main(argv), including exit status 2 and the message for bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import OUT_OF_MEMORY

from cfgdiff.cli import main


@pytest.fixture
def run(tmp_path, folder_data):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--dataset",
            f"folder:{folder_data}",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--steps",
            "10",
            "--device",
            "cpu",
            "--no-progress",
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    return out


def test_train_writes_run(run):
    from PIL import Image

    assert (run / "checkpoints" / "step-0000010").is_dir()
    assert (run / "samples" / "step-0000010.png").is_file()
    summary = (run / "SUMMARY.txt").read_text()
    assert "guidance strip" in summary and str(run / "loss.png") in summary
    assert str(run / "real.png") in summary
    # what it ran on, since its speed depends on it
    from cfgdiff.runtime import describe_machine

    assert f"machine:         cpu: {describe_machine(torch.device('cpu'))}" in summary
    # real images laid out as the previews are, to hold them against
    real = Image.open(run / "real.png")
    assert real.size == Image.open(run / "samples" / "step-0000010.png").size


def test_train_resume_extends(run, folder_data, capsys):
    rc = main(
        [
            "train",
            "--dataset",
            f"folder:{folder_data}",
            "--out",
            str(run),
            "--resume",
            "--steps",
            "12",
            "--no-progress",
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    assert (run / "checkpoints" / "step-0000012").is_dir()


def test_resume_takes_the_runs_dataset(run, folder_data):
    """`train --out RUN --resume` without --dataset continues on the run's own data (a folder
    here; the default for a new run is mnist)."""
    argv = ["train", "--out", str(run), "--resume", "--steps", "12", "--no-progress"]
    assert main([*argv, "--precision", "fp32"]) == 0
    assert (run / "checkpoints" / "step-0000012").is_dir()


def test_relative_and_home_folder_paths_are_recorded_absolute(tmp_path, folder_data, monkeypatch):
    """folder:images (relative) and folder:~/images are recorded as absolute paths, so the run
    resumes, samples and is evaluated from another directory; a run recorded with a relative
    path still resumes with the same folder given absolute."""
    from cfgdiff.checkpoint import latest_checkpoint, read_config

    monkeypatch.chdir(folder_data.parent)
    monkeypatch.setenv("HOME", str(folder_data.parent))
    argv = ["--preset", "tiny", "--steps", "2", "--no-progress", "--precision", "fp32"]
    for given, out in ((f"folder:{folder_data.name}", "a"), (f"folder:~/{folder_data.name}", "b")):
        assert main(["train", "--dataset", given, "--out", str(tmp_path / out), *argv]) == 0
        cfg = read_config(latest_checkpoint(tmp_path / out / "checkpoints"))
        assert cfg.dataset == f"folder:{folder_data}"
    monkeypatch.chdir(tmp_path.parent)
    argv = ["train", "--out", str(tmp_path / "a"), "--resume", "--steps", "3", "--no-progress"]
    assert main(argv) == 0
    info = ["data", "info", f"folder:~/{folder_data.name}"]
    assert main(info) == 0

    # an older run that recorded folder:RELATIVE, resumed from its directory with --dataset ABS
    import dataclasses

    from cfgdiff.train.state import check_resume_compatible

    old = dataclasses.replace(cfg, dataset=f"folder:{folder_data.name}")
    monkeypatch.chdir(folder_data.parent)
    check_resume_compatible(old, cfg)


def test_hflip_is_recorded_and_defaults_by_dataset(tmp_path, folder_data, capsys):
    """--hflip / --no-hflip are recorded in the checkpoint; unset, the dataset decides (off for a
    folder and MNIST, on for CIFAR-10) and the decision is recorded, so a resumed run keeps it."""
    import dataclasses

    from cfgdiff.checkpoint import latest_checkpoint, read_config
    from cfgdiff.data import Dataset
    from cfgdiff.presets import PRESETS, config_for_dataset

    argv = ["--preset", "tiny", "--steps", "2", "--no-progress", "--precision", "fp32"]
    base = ["train", "--dataset", f"folder:{folder_data}", *argv]
    for extra, want in (([], False), (["--hflip"], True)):
        out = tmp_path / f"run{want}"
        assert main([*base, "--out", str(out), *extra]) == 0
        assert read_config(latest_checkpoint(out / "checkpoints")).train.hflip is want
        capsys.readouterr()
        assert main(["info", "--checkpoint", str(out)]) == 0
        assert ("random horizontal flips" in capsys.readouterr().out) is want
    resumed = ["train", "--out", str(tmp_path / "runTrue"), "--resume", "--no-progress"]
    assert main([*resumed, "--steps", "3"]) == 0
    assert read_config(latest_checkpoint(tmp_path / "runTrue" / "checkpoints")).train.hflip
    assert main([*resumed, "--steps", "4", "--no-hflip"]) == 0
    assert not read_config(latest_checkpoint(tmp_path / "runTrue" / "checkpoints")).train.hflip

    data = Dataset("x", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.arange(2), ("a", "b"))
    cfg = PRESETS["tiny"]
    assert config_for_dataset(cfg, data, "cifar10").train.hflip is True
    assert config_for_dataset(cfg, data, "mnist").train.hflip is False
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, hflip=False))
    assert config_for_dataset(off, data, "cifar10").train.hflip is False


def test_timestep_sampling_is_recorded_and_kept_on_resume(tmp_path, folder_data, capsys):
    """--t-sampling / --t-mean / --t-std / --t-uniform reach the checkpoint's config; unset, the
    preset's (the uniform + logit-normal mixture for cpu-demo, uniform for the others); a resume
    that asks for another is refused, exit 2."""
    from cfgdiff.checkpoint import latest_checkpoint, read_config
    from cfgdiff.presets import PRESETS

    demo = PRESETS["cpu-demo"].diffusion
    assert (demo.t_sampling, demo.t_mean, demo.t_std, demo.t_uniform) == (
        "logit-normal",
        0.5,
        1.0,
        0.5,
    )
    # cpu-demo-fp32 and cpu-30m-fp32 are cpu-demo's recipe on other networks (test_config.py)
    others = [p.diffusion.t_sampling for n, p in PRESETS.items() if not n.startswith("cpu-")]
    assert set(others) == {"uniform"}
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--steps", "2"]
    argv += ["--no-progress", "--precision", "fp32", "--out", str(out)]
    ln = ["--t-sampling", "logit-normal", "--t-mean", "-0.3", "--t-std", "0.7"]
    assert main([*argv, *ln, "--t-uniform", "0.25"]) == 0
    d = read_config(latest_checkpoint(out / "checkpoints")).diffusion
    assert (d.t_sampling, d.t_mean, d.t_std, d.t_uniform) == ("logit-normal", -0.3, 0.7, 0.25)
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(out)]) == 0
    assert "timesteps logit-normal (-0.3, 0.7) with 0.25 uniform" in capsys.readouterr().out
    resumed = ["train", "--out", str(out), "--resume", "--no-progress", "--steps", "3"]
    assert main([*resumed, "--t-mean", "0.5"]) == 2
    assert "diffusion.t_mean=-0.3, this run asks for 0.5" in capsys.readouterr().err
    assert main([*resumed, "--t-uniform", "0.5"]) == 2
    assert "diffusion.t_uniform=0.25, this run asks for 0.5" in capsys.readouterr().err
    assert main(resumed) == 0  # unset: the checkpoint's own
    d = read_config(latest_checkpoint(out / "checkpoints")).diffusion
    assert (d.t_sampling, d.t_mean, d.t_std, d.t_uniform) == ("logit-normal", -0.3, 0.7, 0.25)


def test_uniform_timesteps_on_cpu_demo_record_the_old_preset(tmp_path, folder_data):
    """--t-sampling uniform on cpu-demo (whose timesteps are the mixture) gives the uniform
    preset it was before: no logit-normal settings left in the recorded config."""
    from cfgdiff.checkpoint import latest_checkpoint, read_config
    from cfgdiff.config import DiffusionConfig

    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "cpu-demo", "--steps", "1"]
    argv += ["--no-progress", "--precision", "fp32", "--sample-every", "0", "--out", str(out)]
    assert main([*argv, "--t-sampling", "uniform"]) == 0
    d = read_config(latest_checkpoint(out / "checkpoints")).diffusion
    assert d == DiffusionConfig(schedule="cosine", prediction="v")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--t-uniform", "0.5"], "--t-uniform 0.5: applies to --t-sampling logit-normal only"),
        (["--t-mean", "1"], "--t-mean 1: applies to --t-sampling logit-normal only"),
        (
            ["--t-sampling", "uniform", "--t-std", "2"],
            "--t-std 2: applies to --t-sampling logit-normal only",
        ),
        (["--t-sampling", "logit-normal", "--t-uniform", "1"], "--t-uniform: "),
    ],
)
def test_logit_normal_options_without_logit_normal_are_refused(
    tmp_path, folder_data, capsys, extra, message
):
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--steps", "2"]
    assert main([*argv, "--no-progress", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_resume_on_a_folder_that_gained_a_class_names_the_classes(run, folder_data, capsys):
    """Told in terms of the data (the classes), not the network field it implies."""
    import shutil

    shutil.copytree(folder_data / "class0", folder_data / "class3")
    argv = ["train", "--out", str(run), "--resume", "--steps", "12", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "--resume: checkpoint's classes are ['class0', 'class1', 'class2'], this data's are "
        "['class0', 'class1', 'class2', 'class3']" in err
    )
    assert err.count("\n") == 1


def test_resume_says_when_the_folder_changed(tmp_path, folder_data, capsys):
    """Images added to (or rewritten in) a folder between a run and its resume: the resume goes
    on with the folder as it is, and says that it cannot be exact; an unchanged folder says
    nothing."""
    from PIL import Image

    out = str(tmp_path / "run")
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", out]
    argv += ["--no-progress", "--precision", "fp32", "--sample-every", "0"]
    assert main([*argv, "--steps", "4"]) == 0
    assert main([*argv, "--resume", "--steps", "6"]) == 0
    assert "training data changed" not in capsys.readouterr().err
    Image.fromarray(np.full((8, 8), 9, np.uint8), mode="L").save(folder_data / "class1" / "n.png")
    assert main([*argv, "--resume", "--steps", "8"]) == 0
    err = capsys.readouterr().err
    assert (
        "--resume: the training data changed since the checkpoint (18 images then, 19 now)" in err
    )
    assert (tmp_path / "run" / "checkpoints" / "step-0000008").is_dir()
    Image.fromarray(np.full((8, 8), 200, np.uint8), mode="L").save(folder_data / "class1" / "n.png")
    assert main([*argv, "--resume", "--steps", "10"]) == 0  # same count, other pixels
    assert "(19 images then, 19 now)" in capsys.readouterr().err


@pytest.mark.parametrize("faithful", [True, False])
def test_train_reports_the_compiled_gradient_check(
    tmp_path, folder_data, capsys, monkeypatch, faithful
):
    def fake_compile(net, **kw):
        if faithful:
            return lambda x, t, y: net(x, t, y)
        return lambda x, t, y: torch.func.functional_call(
            net,
            {k: v.detach() if k.startswith("down") else v for k, v in net.named_parameters()},
            (x, t, y),
        )

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--steps", "2"]
    argv += ["--out", str(tmp_path / "r"), "--no-progress", "--compile", "on"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    if faithful:
        assert "cfgdiff: torch.compile: gradients match eager (0 of 129 parameters lost" in err
    else:
        assert (
            "cfgdiff: torch.compile not used, training eagerly: compiled gradients differ: " in err
        )
        assert "30 of 129 parameters lost their gradient; relative gradient difference" in err


def test_sample_to_a_folder_of_pngs(run, tmp_path, capsys):
    """--out FOLDER: one PNG per image in FOLDER/CLASS/NNNNN.png, the same pixels as the .npz of
    the same settings, plus settings.json; the folder reads back as folder:FOLDER. A folder that
    is not empty is refused and left as it was."""
    from PIL import Image

    from cfgdiff.data import load_dataset

    argv = ["sample", "--checkpoint", str(run), "--scale", "2", "--per-class", "3"]
    argv += ["--classes", "class2,class0", "--steps", "4"]
    out = tmp_path / "gen"
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--out", str(tmp_path / "same.npz")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["class0", "class2", "settings.json"]
    z = np.load(tmp_path / "same.npz")
    for i, label in enumerate(z["labels"]):
        png = out / f"class{label}" / f"{i % 3:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(png))[None], z["images"][i])
    meta = json.loads((out / "settings.json").read_text())
    assert (
        meta["scale"] == 2 and meta["steps"] == 4 and meta["counts"] == {"class2": 3, "class0": 3}
    )
    back = load_dataset(f"folder:{out}")
    assert back.class_names == ("class0", "class2") and back.images.shape == (6, 1, 8, 8)
    assert not list(tmp_path.glob(".gen.*"))  # no temporary folder left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*argv, "--out", str(empty)]) == 0 and (empty / "class0" / "00002.png").is_file()
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    assert "--out " + str(out) + ": folder is not empty" in capsys.readouterr().err
    assert json.loads((out / "settings.json").read_text()) == meta


def test_sample_png_and_npz(run, tmp_path, capsys):
    png = tmp_path / "g.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--scale",
                "3",
                "--per-class",
                "2",
                "--steps",
                "4",
                "--out",
                str(png),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npz = tmp_path / "s.npz"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--w",
                "1.5",
                "--classes",
                "0,2",
                "--per-class",
                "3",
                "--sampler",
                "ddpm",
                "--steps",
                "5",
                "--seed",
                "4",
                "--batch-size",
                "2",
                "--out",
                str(npz),
            ]
        )
        == 0
    )
    z = np.load(npz)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (6, 1, 8, 8)
    assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0, 0, 0, 2, 2, 2]
    assert float(z["scale"]) == 2.5 and float(z["w"]) == 1.5 and str(z["sampler"]) == "ddpm"
    assert (
        int(z["steps"]) == 5 and int(z["seed"]) == 4 and "s=1 conditional" in str(z["convention"])
    )


def test_data_fetch_and_info(idx_dir, capsys):
    assert main(["data", "fetch", "mnist", "--data-dir", str(idx_dir)]) == 0
    assert main(["data", "info", "mnist", "--data-dir", str(idx_dir)]) == 0
    out = capsys.readouterr().out
    assert "counts per class" in out and "sha256" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["frobnicate"], "invalid choice"),
        (
            ["sample", "--checkpoint", "x", "--scale", "1", "--w", "0", "--out", "a.png"],
            "not allowed with",
        ),
        (["train", "--out", "r", "--steps", "-3"], "--steps: must be in [1, 10000000], got -3"),
        (["train", "--out", "r", "--lr", "abc"], "--lr: expected a number, got 'abc'"),
        (["train", "--out", "r", "--dataset", "imagenet"], "--dataset must be one of"),
        (["train", "--out", "r", "--label-dropout", "1"], "--label-dropout: must be in [0, 1)"),
        (["train", "--out", "r", "--t-std", "0"], "--t-std: must be in (0, 5], got 0"),
        (["train", "--out", "r", "--t-sampling", "normal"], "--t-sampling: invalid choice"),
        (["sample", "--checkpoint", "nowhere", "--scale", "3", "--out", "a.png"], "no such file"),
        (
            ["sample", "--checkpoint", "x", "--scale", "3", "--out", "a.jpg"],
            "--out must end in .png (grid) or .npz (arrays), or name a new or empty folder",
        ),
        (
            ["sample", "--checkpoint", "x", "--scale", "3"],
            "one of the arguments --out --animate is required",
        ),
        (["data", "fetch", "imagenet"], "invalid choice"),
        (
            ["data", "info", "mnist", "--data-dir", "/nonexistent-dir"],
            "run `cfgdiff data fetch mnist`",
        ),
        (
            ["train", "--out", "r", "--data-dir", "/dev/null"],
            "argument --data-dir: not a directory: /dev/null",
        ),
        (
            ["eval", "--checkpoint", "x", "--scale", "3", "--data-dir", "/dev/null"],
            "argument --data-dir: not a directory: /dev/null",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("cfgdiff: error:")
    assert "Traceback" not in err


def test_network_commands_turn_on_cudnn_autotuning(run, monkeypatch):
    """cudnn.benchmark (no effect on the CPU) is set by every command that runs a network."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert main(["info", "--checkpoint", str(run)]) == 0
    assert torch.backends.cudnn.benchmark is True


def test_out_that_is_a_file_is_refused_and_kept(run, folder_data, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(f)]
    assert main(argv) == 2
    argv = ["sweep", "--checkpoint", str(run), "--scales", "0,1", "--n", "10", "--out", str(f)]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err
        == 2 * f"cfgdiff: error: --out {f}: is a file; --out names a folder here\n"
    )
    assert f.read_text() == "mine"


def test_sample_class_out_of_range(run, tmp_path, capsys):
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--scale",
                "3",
                "--classes",
                "0,7",
                "--out",
                str(tmp_path / "a.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err == (
        "cfgdiff: error: --classes must be class names (class0, class1, class2) or indices in "
        "[0, 2] for this checkpoint, got ['7']\n"
    )


def test_sample_classes_by_name(run, tmp_path):
    """A folder's sub-folder names are recorded in the checkpoint: --classes takes them (or
    indices), and the .npz names every label."""
    cfg = json.loads(next((run / "checkpoints").glob("step-*/config.json")).read_text())
    assert cfg["class_names"] == ["class0", "class1", "class2"]
    out = tmp_path / "a.npz"
    argv = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "2", "--steps", "2"]
    assert main([*argv, "--classes", "class2,0", "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out) as z:
        assert z["labels"].tolist() == [2, 2, 0, 0]
        assert z["class_names"].tolist() == ["class0", "class1", "class2"]


def test_sample_classes_of_a_checkpoint_without_names(run, tmp_path, capsys):
    """Checkpoints written before class names were recorded take indices only."""
    from cfgdiff import checkpoint as ckpt_io

    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["class_names"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["config.json"] = ckpt_io.file_digest(ckpt / "config.json")
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    out = tmp_path / "a.npz"
    argv = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "1", "--steps", "2"]
    assert main([*argv, "--classes", "1", "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out) as z:
        assert z["class_names"].tolist() == ["0", "1", "2"]
    assert main([*argv, "--classes", "class1", "--out", str(out)]) == 2
    assert "indices in [0, 2] for this checkpoint (it records no class names)" in (
        capsys.readouterr().err
    )


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_sample_steps_above_T(run, tmp_path, capsys, monkeypatch):
    """Refused before anything is compiled (24 images x 5000 steps would compile on the CPU)."""

    def no_compile(*a, **k):
        raise AssertionError("torch.compile called before --steps was checked")

    monkeypatch.setattr(torch, "compile", no_compile)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--scale",
                "3",
                "--steps",
                "5000",
                "--out",
                str(tmp_path / "a.png"),
            ]
        )
        == 2
    )
    assert "--steps must be in [1, 1000], got 5000" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--guidance-interval", "0.5,20", "--spacing", "logsnr"],
        ["--rescale", "0.7", "--sampler", "ddim", "--eta", "0.5"],
        ["--negative-class", "1", "--spacing", "quadratic"],
        ["--threshold", "dynamic", "--threshold-percentile", "0.9"],
        ["--apg", "--apg-eta", "0", "--apg-norm-threshold", "5", "--apg-momentum", "-0.5"],
        ["--guide-checkpoint", "SELF"],
    ],
)
def test_sample_guidance_variants(run, tmp_path, extra):
    import json

    extra = [str(run) if e == "SELF" else e for e in extra]
    npz = tmp_path / "v.npz"
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(run),
            "--scale",
            "3",
            "--per-class",
            "2",
            "--steps",
            "4",
            "--out",
            str(npz),
            "--precision",
            "fp32",
            *extra,
        ]
    )
    assert rc == 0
    settings = json.loads(str(np.load(npz)["settings"]))
    if "--rescale" in extra:
        assert settings["rescale"] == 0.7 and settings["eta"] == 0.5
    if "--apg" in extra:
        assert settings["apg"] == {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}
    if "--guide-checkpoint" in extra:
        assert settings["guide_checkpoint"] == str(run)
    assert settings["convention"].startswith("scale:")


def test_guide_checkpoint_must_match(run, tmp_path, folder_data, capsys):
    other = tmp_path / "other"
    assert (
        main(
            [
                "train",
                "--dataset",
                f"folder:{folder_data}",
                "--preset",
                "tiny",
                "--out",
                str(other),
                "--steps",
                "2",
                "--image-size",
                "16",
                "--no-progress",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(run),
            "--scale",
            "3",
            "--guide-checkpoint",
            str(other),
            "--out",
            str(tmp_path / "a.png"),
        ]
    )
    assert rc == 2
    assert "model.image_size=16, the checkpoint has 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--guidance-interval", "3,1"], "expected 0 <= LO < HI"),
        (["--rescale", "2"], "--rescale: must be in [0, 1]"),
        (["--negative-class", "7"], "--negative-class must be in [0, 2]"),
        (["--apg", "--rescale", "0.5"], "cannot be combined"),
        (["--spacing", "cubic"], "invalid choice"),
        (["--guide-checkpoint", "/nonexistent"], "--guide-checkpoint /nonexistent: no such file"),
    ],
)
def test_bad_guidance_options(run, tmp_path, extra, message, capsys):
    rc = main(
        [
            "sample",
            "--checkpoint",
            str(run),
            "--scale",
            "3",
            "--out",
            str(tmp_path / "a.png"),
            *extra,
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def _sample_npz(run, path, *extra):
    args = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "2"]
    args += ["--steps", "4", "--out", str(path), "--precision", "fp32", "--device", "cpu"]
    assert main([*args, *extra]) == 0
    with np.load(path) as z:
        return z["images"]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=type)
def test_sample_out_of_memory_is_one_line_and_exit_1(run, tmp_path, capsys, monkeypatch, error):
    import cfgdiff.sampling.generate

    def oom(*a, **k):
        raise error

    monkeypatch.setattr(cfgdiff.sampling.generate, "_generate", oom)
    out = tmp_path / "a.png"
    args = ["sample", "--checkpoint", str(run), "--scale", "3", "--out", str(out)]
    assert main([*args, "--batch-size", "7", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "out of memory sampling 7 images per batch on cpu: lower --batch-size" in err
    assert not out.exists()


def test_sample_chosen_batch_is_halved_until_it_fits(run, tmp_path, capsys, monkeypatch):
    """Without --batch-size (64 on the CPU), running out of memory halves the batch and retries;
    the images are those of a run that asked for the batch that fits."""
    import cfgdiff.sampling.generate

    real = cfgdiff.sampling.generate._generate  # generate's work at one batch size
    tried = []

    def fits_two(*a, batch_size, **k):
        tried.append(batch_size)
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, batch_size=batch_size, **k)

    expected = _sample_npz(run, tmp_path / "e.npz", "--batch-size", "2")
    monkeypatch.setattr(cfgdiff.sampling.generate, "_generate", fits_two)
    capsys.readouterr()
    assert np.array_equal(_sample_npz(run, tmp_path / "a.npz"), expected)
    assert tried == [64, 32, 16, 8, 4, 2]
    err = capsys.readouterr().err
    assert "out of memory at 64 images per batch; retrying with 32" in err
    assert "out of memory at 4 images per batch; retrying with 2" in err


def test_out_of_memory_anywhere_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    """An allocation failure outside the paths that name their batch size still becomes one line
    and exit 1; any other exception is a bug and keeps its traceback."""
    import cfgdiff.cli

    def failing(error):
        def cmd(a):
            raise error

        return cmd

    args = ["data", "info", "mnist", "--data-dir", str(tmp_path)]
    monkeypatch.setitem(cfgdiff.cli.COMMANDS, "data", failing(MemoryError()))
    assert main(args) == 1
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4 GB")
    monkeypatch.setitem(cfgdiff.cli.COMMANDS, "data", failing(cpu))
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "cfgdiff: error: out of memory (MemoryError: ); lower --batch-size",
        (
            "cfgdiff: error: out of memory (RuntimeError: DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 4 GB); lower --batch-size"
        ),
    ]
    monkeypatch.setitem(cfgdiff.cli.COMMANDS, "data", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(args)


def test_sample_compile_failure_samples_eagerly(run, tmp_path, capsys, monkeypatch):
    eager = _sample_npz(run, tmp_path / "e.npz", "--batch-size", "4")

    def broken_compile(module, **kw):
        def fail(*args):
            raise RuntimeError("inductor: no C++ compiler found (test)")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    compiled = _sample_npz(run, tmp_path / "c.npz", "--batch-size", "4", "--compile", "on")
    assert "torch.compile not used, sampled eagerly: RuntimeError: inductor" in (
        capsys.readouterr().err
    )
    assert np.array_equal(compiled, eager)


@pytest.mark.slow
def test_sample_compiled_matches_eager(run, tmp_path, capsys):
    """Real inductor compilation on the CPU; 6 images in batches of 4 (last one padded)."""
    torch._dynamo.reset()
    eager = _sample_npz(run, tmp_path / "e.npz", "--batch-size", "4")
    compiled = _sample_npz(run, tmp_path / "c.npz", "--batch-size", "4", "--compile", "on")
    assert "torch.compile not used" not in capsys.readouterr().err
    diff = np.abs(compiled.astype(int) - eager.astype(int))
    assert compiled.shape == eager.shape and diff.max() <= 2 and diff.mean() < 0.01


def test_train_time_sizes_the_run(tmp_path, folder_data, capsys):
    """--time: the schedule event fixes the step count, which the checkpoint records."""
    out = tmp_path / "t"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(out)]
    rc = main(
        argv + ["--time", "2s", "--sample-every", "0", "--no-progress", "--precision", "fp32"]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "step 0 -> sized to --time 2 s after 25 steps" in err
    total = int(err.split("--time 2 s: ")[1].split(" steps")[0])
    ckpt = ckpt_io_latest(out)
    assert ckpt.name == f"step-{total:07d}" and total >= 25
    assert json.loads((ckpt / "config.json").read_text())["train"]["steps"] == total


def ckpt_io_latest(out):
    from cfgdiff import checkpoint as ckpt_io

    return ckpt_io.latest_checkpoint(out / "checkpoints")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--time", "5x"],
            "--time: expected seconds or a duration such as 90s, 5m, 1.5h; got '5x'",
        ),
        (["--time", "0"], "--time: must be more than 0 s and at most 7 days, got 0"),
        (["--time", "8d"], "--time: expected seconds or a duration"),
        (["--time", "1m", "--steps", "5"], "--time 60 s: not with --steps"),
        (["--time", "90", "--resume"], "--time 90 s: not with --resume"),
    ],
)
def test_train_time_refusals(tmp_path, folder_data, capsys, extra, message):
    out = tmp_path / "t"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(out)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_duration_parser():
    from cfgdiff.cli.options import duration as _duration

    assert [_duration(s) for s in ("90", "90s", "5m", "1.5h", "0.5")] == [90, 90, 300, 5400, 0.5]


def test_train_progress_bar_takes_the_time_budgets_count(
    tmp_path, folder_data, capsys, monkeypatch
):
    """On a terminal the bar starts without a total and gets the count when --time fixes it."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    out = tmp_path / "t"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(out)]
    assert main(argv + ["--time", "2", "--sample-every", "0", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    err = captured.err
    total = int(err.split("cfgdiff: --time 2 s: ")[1].split(" steps")[0])
    assert f"{total}/{total} [" in err  # tqdm's finished bar, with the total it was given
    assert "cfgdiff:" not in captured.out  # notes go above the bar on stderr, not to stdout
    # the done lines split the wall time into what the budget counts and what it does not
    assert " s training (--time 2 s), " in captured.out
    assert " s previews, checkpoints and evaluations, " in captured.out


def test_a_data_dir_from_the_environment_that_is_a_file_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("CFGDIFF_DATA_DIR", "/dev/null")
    assert main(["data", "info", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "cfgdiff: error: $CFGDIFF_DATA_DIR: not a directory: /dev/null (pass --data-dir DIR)\n"
    )


def test_resume_keeps_the_runs_precision(tmp_path, folder_data, capsys, monkeypatch):
    """--precision auto on --resume trains as the run did, even where auto now picks another
    (a newer policy or another CPU); an explicit --precision still switches."""
    import cfgdiff.runtime as rt
    from cfgdiff.checkpoint import latest_checkpoint, recorded_precision

    out = tmp_path / "r"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(out)]
    argv += ["--device", "cpu", "--no-progress", "--sample-every", "0", "--checkpoint-every", "2"]
    assert main([*argv, "--steps", "2", "--precision", "fp32"]) == 0
    assert recorded_precision(latest_checkpoint(out / "checkpoints")) == ("cpu", "fp32")
    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: True)  # auto would now pick bf16
    capsys.readouterr()
    assert main([*argv, "--steps", "4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--precision auto: fp32, as the run trained (auto would pick bf16 here" in err
    assert recorded_precision(latest_checkpoint(out / "checkpoints")) == ("cpu", "fp32")
    assert main([*argv, "--steps", "6", "--resume", "--precision", "bf16"]) == 0
    assert "as the run trained" not in capsys.readouterr().err
    assert recorded_precision(latest_checkpoint(out / "checkpoints")) == ("cpu", "bf16")
    assert recorded_precision(tmp_path) is None  # no training state (or one from before)


def test_cpu_demo_on_fashion_mnist_takes_uniform_timesteps(tmp_path, monkeypatch, capsys):
    """cpu-demo's timestep mixture was tuned on MNIST and measured worse on Fashion-MNIST, so a
    new Fashion-MNIST run of it draws t uniformly (said in one line) unless the user chooses the
    law, which then starts from the preset's own, as on MNIST."""
    from conftest import fake_digits, fashion_system_dir

    from cfgdiff.checkpoint import latest_checkpoint, read_config
    from cfgdiff.presets import PRESETS, get_preset

    demo = PRESETS["cpu-demo"].diffusion
    assert get_preset("cpu-demo", "mnist") == PRESETS["cpu-demo"] == get_preset("cpu-demo")
    fashion = get_preset("cpu-demo", "fashion-mnist").diffusion
    assert (fashion.t_sampling, fashion.t_uniform) == ("uniform", 0.0) != (demo.t_sampling, 0.0)
    assert (
        dataclasses.replace(
            fashion, t_sampling=demo.t_sampling, t_mean=demo.t_mean, t_uniform=demo.t_uniform
        )
        == demo
    )  # nothing else differs
    assert get_preset("mnist", "fashion-mnist") == PRESETS["mnist"]

    fashion_system_dir(tmp_path / "sys", monkeypatch, fake_digits(64, 0), fake_digits(16, 1))
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data")]
    argv += ["--steps", "1", "--sample-every", "0", "--precision", "fp32", "--no-progress"]

    def law(out):
        d = read_config(latest_checkpoint(out / "checkpoints")).diffusion
        return d.t_sampling, d.t_mean, d.t_uniform

    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert law(tmp_path / "a") == ("uniform", 0.0, 0.0)
    err = capsys.readouterr().err
    assert "cpu-demo on fashion-mnist: uniform timesteps, measured better there" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--t-sampling", "logit-normal"]) == 0
    assert law(tmp_path / "b") == (demo.t_sampling, demo.t_mean, demo.t_uniform)
    assert "measured better there" not in capsys.readouterr().err
