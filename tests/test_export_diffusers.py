"""cfgdiff export --format diffusers: a folder that diffusers loads, whose DDIM and DPM-Solver++
schedulers sample the model as cfgdiff's ddim and dpmpp-2m do (docs/export.md)."""

from __future__ import annotations

import dataclasses
import errno
import json

import numpy as np
import pytest
import torch
from conftest import image_folder, tiny_config

from cfgdiff.cli import main
from cfgdiff.config import RunConfig
from cfgdiff.errors import ConfigError
from cfgdiff.sampling.samplers import SAMPLERS, PerSampleNoise, run_sampler
from cfgdiff.schedule import make_schedule, spaced_timesteps

diffusers = pytest.importorskip("diffusers")
from cfgdiff.export import diffusers as dx  # noqa: E402
from cfgdiff.export.diffusers_pipeline import CfgdiffPipeline, CfgdiffUNet  # noqa: E402

# Max |diffusers - cfgdiff| over pixels in [-1, 1], same model, labels and x_T: the schedulers
# hold alpha_bar in fp32 where cfgdiff holds it in fp64 (docs/export.md, "Agreement").
TOLERANCE = 1e-4
LABELS = [0, 1, 2, 2, 1, 0]


def _train(root, **diffusion):
    from cfgdiff.data import load_dataset
    from cfgdiff.presets import config_for_dataset
    from cfgdiff.train import TrainOptions, train

    name = f"folder:{image_folder(root / 'folder', 6)}"
    data = load_dataset(name)
    cfg = tiny_config(steps=4, sample_every=0, checkpoint_every=4)
    cfg = config_for_dataset(cfg, data, name)
    cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, **diffusion))
    train(cfg, root / "run", data, options=TrainOptions(final_strip=False))
    return root / "run"


# the defaults (linear betas, T = 1000, eps) and a v-model on T = 100, whose linear betas
# cfgdiff rescales (diffusers' "linear" would not: the folder carries the exact table)
RUNS = {"eps": {}, "v": {"prediction": "v", "timesteps": 100}}


@pytest.fixture(scope="module", params=list(RUNS))
def exported(request, tmp_path_factory):
    """(run, folder): a tiny trained run and its diffusers folder, written by the CLI."""
    root = tmp_path_factory.mktemp(f"diffusers-{request.param}")
    run = _train(root, **RUNS[request.param])
    out = root / "exported"
    assert (
        main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "diffusers"]) == 0
    )
    return run, out


def _x_T(cfg, n: int, seed: int = 0) -> torch.Tensor:
    """The x_T cfgdiff's generate starts sample i of `seed` from."""
    m = cfg.model
    return PerSampleNoise(seed, range(n)).randn((m.in_channels, m.image_size, m.image_size), "cpu")


def _cfgdiff_images(run, sampler: str, scale: float, steps: int):
    """cfgdiff's own samples: float x0 in [-1, 1] from the sampler (the guided denoiser's
    static threshold, as generate uses it) and generate's uint8 images."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.sampling.generate import generate
    from cfgdiff.sampling.guidance import Guidance, guided_denoiser
    from cfgdiff.sampling.settings import SamplingSettings

    loaded = load_for_sampling(run)
    cfg = loaded.cfg
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    y = torch.tensor(LABELS)
    denoise = guided_denoiser(
        loaded.net, y, schedule, null_label=cfg.model.num_classes,
        prediction=cfg.diffusion.prediction, guidance=Guidance(scale=scale),
    )  # fmt: skip
    with torch.inference_mode():
        x0 = run_sampler(sampler, denoise, _x_T(cfg, len(y)), schedule, steps, spacing="trailing")
    settings = SamplingSettings(
        sampler=sampler, steps=steps, spacing="trailing", eta=0.0, seed=0, device="cpu",
        precision="fp32", compile="off",
    )  # fmt: skip
    u8 = generate(loaded.net, cfg, y, settings=settings, guidance=Guidance(scale=scale))
    return cfg, x0, u8


@pytest.mark.parametrize(
    "scheduler, sampler, steps",
    [
        ("DDIMScheduler", "ddim", 10),
        ("DPMSolverMultistepScheduler", "dpmpp-2m", 10),
        # a count at which diffusers' own trailing timesteps are not cfgdiff's (numpy rounds
        # a tie the other way): the pipeline passes cfgdiff's
        ("DPMSolverMultistepScheduler", "dpmpp-2m", "tie"),
    ],
)
def test_diffusers_samples_as_cfgdiff_does(exported, scheduler, sampler, steps):
    run, out = exported
    pipe = CfgdiffPipeline.from_pretrained(out)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    T = pipe.unet.cfg.diffusion.timesteps
    # guided, the conditional half only, the null half only
    scales = (3.0, 1.0, 0.0) if steps != "tie" else (3.0,)
    if steps == "tie":
        steps = {1000: 48, 100: 24}[T]
        own = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
        own.set_timesteps(steps)
        schedule = make_schedule(pipe.unet.cfg.diffusion.schedule, T)
        assert own.timesteps.tolist() != spaced_timesteps(schedule, steps, "trailing")
    for scale in scales:
        cfg, x0, u8 = _cfgdiff_images(run, sampler, scale, steps)
        got = pipe(
            LABELS, guidance_scale=scale, num_inference_steps=steps,
            latents=_x_T(cfg, len(LABELS)), output_type="pt",
        ).images  # fmt: skip
        assert got.shape == (len(LABELS), 1, 8, 8)
        assert (got * 2 - 1 - x0).abs().max() < TOLERANCE, (scale, (got * 2 - 1 - x0).abs().max())
        ours = (got * 255).round().to(torch.uint8)
        assert (ours.int() - u8.int()).abs().max() <= 1  # rounding at a level's edge at most
    if cfg.diffusion.prediction == "v":  # most pixels unclamped: the test is not of the clamp
        assert (x0.abs() < 0.999).float().mean() > 0.5


def test_ddim_steps_where_the_count_divides_T(exported):
    """Why the DDIM check uses a count that divides T: diffusers' DDIM steps from t to
    t - T // steps, cfgdiff's to the next trailing timestep; with steps dividing T its
    timesteps are cfgdiff's and each step lands on the next (docs/export.md, "Timesteps")."""
    _, out = exported
    pipe = CfgdiffPipeline.from_pretrained(out)
    ddim = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    T = pipe.unet.cfg.diffusion.timesteps
    schedule = make_schedule("linear", T)
    for steps in [k for k in range(1, T + 1) if T % k == 0]:
        ddim.set_timesteps(steps)
        ts = spaced_timesteps(schedule, steps, "trailing")
        assert ddim.timesteps.tolist() == ts
        assert [t - T // steps for t in ts] == [*ts[1:], -1]


def test_the_folder_and_its_scheduler_config(exported):
    run, out = exported
    from cfgdiff.checkpoint import load_for_sampling

    cfg = load_for_sampling(run).cfg
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "CfgdiffPipeline"
    assert index["unet"] == ["cfgdiff.export.diffusers_pipeline", "CfgdiffUNet"]
    assert index["scheduler"] == ["diffusers", dx.SCHEDULERS[cfg.sampling.sampler]]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    recorded = json.loads((out / "unet" / "config.json").read_text())["run_config"]
    assert RunConfig.from_dict(recorded) == cfg
    sc = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    assert sc["trained_betas"] == schedule.betas.tolist()  # exact, as JSON floats
    assert (
        sc["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[cfg.diffusion.prediction]
    )
    assert sc["num_train_timesteps"] == cfg.diffusion.timesteps
    assert (sc["timestep_spacing"], sc["thresholding"], sc["sample_max_value"]) == (
        "trailing", True, 1.0,
    )  # fmt: skip
    readme = (out / "README.md").read_text()
    assert "CfgdiffPipeline.from_pretrained" in readme and "run/step-0000004" in readme
    # nothing left beside it, and the weights equal the checkpoint's EMA weights
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    unet = CfgdiffUNet.from_pretrained(out, subfolder="unet")
    ema = load_for_sampling(run).net.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in unet.net.state_dict().items())


def test_raw_weights(exported, tmp_path, capsys):
    from cfgdiff.checkpoint import load_for_sampling

    run, _ = exported
    out = tmp_path / "raw"
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--format", "diffusers"]
    assert main([*argv, "--raw"]) == 0
    assert "with the model weights of run/step-0000004 in fp32" in capsys.readouterr().out
    raw = load_for_sampling(run, ema=False).net.state_dict()
    got = CfgdiffUNet.from_pretrained(out, subfolder="unet").net.state_dict()
    assert all(torch.equal(v, raw[k]) for k, v in got.items())
    ema = load_for_sampling(run).net.state_dict()
    assert not all(torch.equal(v, ema[k]) for k, v in got.items())  # not the EMA weights


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 100, 37])
def test_every_scheduler_holds_cfgdiffs_alpha_bar(schedule, T):
    from cfgdiff.config import DiffusionConfig

    cfg = RunConfig(diffusion=DiffusionConfig(schedule=schedule, timesteps=T))
    want = make_schedule(schedule, T).alpha_bar
    for name in sorted(set(dx.SCHEDULERS.values())):
        got = dx.make_scheduler(cfg, name).alphas_cumprod.double()
        # fp32 cumulative products: 2.7e-7 relative at most for linear, 1.3e-5 for cosine
        # (its last alpha_bar is 2.4e-9 at T = 1000)
        assert ((got - want) / want).abs().max() < 1e-4


def test_every_sampler_has_a_scheduler():
    assert set(dx.SCHEDULERS) == set(SAMPLERS)


def test_the_models_own_scheduler_and_the_pipelines_options(exported):
    """The folder's scheduler is the counterpart of the model's own sampler (the tiny preset's
    dpmpp-2m); DDPM (the demo presets' own) gives images of the right shape; labels by name;
    PIL and numpy outputs; bad arguments are one line each."""
    run, out = exported
    pipe = CfgdiffPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images = pipe(["class0", "class2"], generator=torch.Generator().manual_seed(0)).images
    assert [(im.mode, im.size) for im in images] == [("L", (8, 8))] * 2
    again = pipe(torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0)).images
    assert [np.asarray(im).tolist() for im in again] == [np.asarray(im).tolist() for im in images]
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(1)
    arr = pipe([0, 1], num_inference_steps=5, generator=g, output_type="np").images
    assert arr.shape == (2, 8, 8, 1) and np.isfinite(arr).all() and 0 <= arr.min() <= arr.max() <= 1
    for kwargs, message in [
        ({"class_labels": [3]}, r"`class_labels` must be indices in \[0, 2\] or class names"),
        ({"class_labels": ["dog"]}, "class0, class1, class2"),
        ({"class_labels": []}, "`class_labels` is empty"),
        ({"class_labels": 0, "num_inference_steps": 0}, "`num_inference_steps` must be"),
        (
            {"class_labels": 0, "guidance_scale": float("nan")},
            "`guidance_scale` must be a finite number",
        ),
        ({"class_labels": 0, "output_type": "gif"}, "`output_type` must be one of pil, np, pt"),
        ({"class_labels": 0, "latents": torch.zeros(2, 1, 8, 8)}, r"`latents` must have shape"),
        ({"class_labels": 0, "eta": 0.5}, "`eta` 0.5 is for schedulers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pipe(**kwargs)


def test_half_precision_storage_loads_as_fp32(exported, tmp_path):
    run, full = exported
    half = tmp_path / "half"
    argv = ["export", "--checkpoint", str(run), "--out", str(half), "--format", "diffusers"]
    assert main([*argv, "--dtype", "fp16"]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (half / weights).stat().st_size < 0.6 * (full / weights).stat().st_size
    a, b = CfgdiffPipeline.from_pretrained(half), CfgdiffPipeline.from_pretrained(full)
    assert a.unet.dtype == torch.float32
    x_T = _x_T(a.unet.cfg, 3)
    ia = a([0, 1, 2], latents=x_T, output_type="pt").images
    ib = b([0, 1, 2], latents=x_T, output_type="pt").images
    assert (ia - ib).abs().max() * 255 < 2  # weights rounded to fp16, not changed
    # and a network asked for in half precision runs under autocast
    c = CfgdiffPipeline.from_pretrained(full, dtype=torch.bfloat16)
    assert c([0, 1, 2], latents=x_T, output_type="pt").images.isfinite().all()


# ----------------------------------------------------------------- refusals


def _refused(argv, capsys, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_outputs_that_are_refused(exported, tmp_path, capsys):
    run, _ = exported
    argv = ["export", "--checkpoint", str(run), "--format", "diffusers", "--out"]
    full = tmp_path / "full"
    (full / "keep").mkdir(parents=True)
    (full / "keep" / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_bytes(b"not a folder")
    from cfgdiff.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    before = _snapshot(tmp_path), _snapshot(run)
    cases = [
        (full, "is a folder that holds files; name a new or empty one"),
        (a_file, "is a file; --format diffusers writes a folder"),
        (a_file / "x", f"{a_file} is not a folder"),
        (ckpt / "diffusers", "inside a checkpoint folder"),
        (run / "tensorboard", "is the run's TensorBoard events"),
        (run / "checkpoints" / "d", "lies inside the run's checkpoints"),
    ]
    for out, message in cases:
        _refused([*argv, str(out)], capsys, f"--out {out}: {message}")
    assert (_snapshot(tmp_path), _snapshot(run)) == before


def test_an_empty_folder_is_filled(exported, tmp_path):
    run, _ = exported
    out = tmp_path / "empty"
    out.mkdir()
    assert (
        main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "diffusers"]) == 0
    )
    assert (out / "model_index.json").is_file()


def test_a_failed_write_leaves_nothing(exported, tmp_path, monkeypatch, capsys):
    """Written under a temporary sibling and renamed: a full disk half way leaves neither the
    folder nor the temporary one (exit status 1, one line)."""
    run, _ = exported

    def full_disk(self, folder, **kwargs):
        (folder / "model_index.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CfgdiffPipeline, "save_pretrained", full_disk)
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--format", "diffusers"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_text_model_is_refused(tmp_path, capsys):
    pytest.importorskip("wordllama")
    from serving import train_text_run

    run = train_text_run(tmp_path)
    capsys.readouterr()  # training's lines
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--format", "diffusers"]
    _refused(argv, capsys, "--format diffusers exports class models; this one reads prompts")
    assert not out.exists()


def test_without_diffusers_the_command_says_how_to_install_it(
    exported, tmp_path, monkeypatch, capsys
):
    run, _ = exported
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # import fails
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(run), "--out", str(out), "--format", "diffusers"]
    _refused(argv, capsys, "needs the diffusers package: pip install 'cfgdiff[diffusers]'")
    assert not out.exists()
