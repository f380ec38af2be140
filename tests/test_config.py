"""Configs (config.py): presets, a run's config resolved from preset, dataset and overrides, the
training flags declared once (cli/options.CONFIG_FLAGS), and the registries a new sampler or
dataset is added to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cfgdiff.cli import build_parser, main
from cfgdiff.cli.options import CONFIG_FLAGS, flag_words, overrides
from cfgdiff.config import DiffusionConfig, RunConfig, replace_fields
from cfgdiff.errors import ConfigError
from cfgdiff.presets import PRESETS, config_for_dataset, get_preset, resolve_config


def _field(cfg: RunConfig, path: str):
    section, name = path.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("flag", CONFIG_FLAGS, ids=lambda f: f.flag)
def test_every_declared_flag_reaches_the_config(flag):
    """A flag declared in CONFIG_FLAGS, given a value no preset has, sets its field in the
    resolved config (through the same request the train command makes): a flag that is parsed
    but not applied fails here."""
    from cfgdiff.cli.train import request

    argv = ["train", "--out", "r", "--preset", "tiny"]
    if flag.field.startswith("diffusion.t_") and flag.field != "diffusion.t_sampling":
        argv += ["--t-sampling", "logit-normal"]  # the settings of that law
    argv += [flag.flag] if flag.example is None else [flag.flag, flag.example]
    args = build_parser().parse_args(argv)
    want = True if flag.example is None else getattr(args, flag.field)
    assert want is not None and want != _field(PRESETS["tiny"], flag.field)
    req = request(args)
    cfg = resolve_config(req.overrides, preset=req.preset, dataset=req.dataset).config
    assert _field(cfg, flag.field) == want


def test_config_flags_are_distinct_and_name_real_fields():
    fields = [f.field for f in CONFIG_FLAGS]
    assert len(set(fields)) == len(fields) and len({f.flag for f in CONFIG_FLAGS}) == len(fields)
    for path in fields:
        _field(RunConfig(), path)  # raises for a field that does not exist
    args = build_parser().parse_args(["train", "--out", "r"])
    assert overrides(args) == {}  # nothing given: nothing overridden


def test_resolve_config_takes_the_preset_dataset_changes_and_overrides():
    r = resolve_config({}, preset=None, dataset=None)
    assert r.config == PRESETS["cpu-demo"] and r.dataset == "mnist" and r.notes == ()
    fashion = resolve_config({}, dataset="fashion-mnist")
    assert fashion.config.diffusion.t_sampling == "uniform" and len(fashion.notes) == 1
    assert "`t_sampling` chooses" in fashion.notes[0]
    assert fashion.config == get_preset("cpu-demo", "fashion-mnist")
    # an override of a field the dataset changes: the preset's own law, with the override
    own = resolve_config({"diffusion.t_mean": 0.2}, dataset="fashion-mnist").config.diffusion
    assert (own.t_sampling, own.t_mean, own.t_uniform) == ("logit-normal", 0.2, 0.5)
    # uniform asked for on a new run: none of the preset's logit-normal settings recorded
    uni = resolve_config({"diffusion.t_sampling": "uniform"}).config.diffusion
    assert uni == dataclasses.replace(PRESETS["cpu-demo"].diffusion, **_uniform())
    with pytest.raises(ConfigError, match=r"`t_std=2`: applies to `t_sampling=logit-normal`"):
        resolve_config({"diffusion.t_sampling": "uniform", "diffusion.t_std": 2.0})
    with pytest.raises(ConfigError, match="no config field 'train.nope'"):
        resolve_config({"train.nope": 1})


def _uniform():
    unset = DiffusionConfig()
    return {"t_sampling": "uniform", "t_mean": unset.t_mean, "t_std": unset.t_std, "t_uniform": 0}


def test_resolve_config_of_a_resumed_run_keeps_its_config():
    run = replace_fields(PRESETS["tiny"], {"train.lr": 0.005})
    r = resolve_config({"train.steps": 40}, resumed=run)
    assert r.config == replace_fields(run, {"train.steps": 40}) and r.dataset == run.dataset
    with pytest.raises(ConfigError, match="`preset` mnist: the run was trained with preset tiny"):
        resolve_config({}, preset="mnist", resumed=run)


def test_flag_words_say_parameters_as_flags():
    known = {"--steps", "--resume", "--time", "--out", "--hflip", "--t-sampling", "--lr"}
    assert (
        flag_words("`steps` must be in [1, 9], got 0", known) == "--steps must be in [1, 9], got 0"
    )
    assert flag_words("`resume=True`: no checkpoint", known) == "--resume: no checkpoint"
    assert (
        flag_words("`time_budget=60` s: not with `steps`", known) == "--time 60 s: not with --steps"
    )
    assert flag_words("`run_dir` x: busy", known) == "--out x: busy"
    assert flag_words("`hflip=False`", known) == "--no-hflip"
    assert flag_words("`t_sampling=logit-normal` only", known) == "--t-sampling logit-normal only"
    # a parameter the CLI has no flag for keeps its name; other text is untouched
    assert (
        flag_words("`split` must be train, lower `lr`", known) == "split must be train, lower --lr"
    )
    assert flag_words("model.image_size=28 and `cfgdiff data fetch mnist`", known) == (
        "model.image_size=28 and `cfgdiff data fetch mnist`"
    )


def test_class_indices_take_names_or_indices():
    cfg = dataclasses.replace(PRESETS["tiny"], class_names=("cat", "dog", "7"))
    cfg = replace_fields(cfg, {"model.num_classes": 3})
    assert cfg.class_indices(["dog", "0", "7"]) == [1, 0, 2]  # a name wins over an index
    with pytest.raises(ConfigError, match=r"`classes` must be class names \(cat, dog, 7\)"):
        cfg.class_indices(["cow"])
    unnamed = dataclasses.replace(cfg, class_names=())
    with pytest.raises(ConfigError, match="records no class names"):
        unnamed.class_indices(["3"])


def test_a_new_sampler_is_one_function_and_one_entry(monkeypatch, tmp_path, folder_data):
    """Added to samplers.SAMPLERS, a sampler is a CLI choice, valid in a config and run by
    generate: here plain DDIM under another name, which gives DDIM's images."""
    from cfgdiff.sampling import samplers

    monkeypatch.setitem(samplers.SAMPLERS, "ddim-copy", samplers.SamplerEntry(samplers.sample_ddim))
    replace_fields(PRESETS["tiny"], {"train.preview_sampler": "ddim-copy"}).validate()
    run = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--steps", "2"]
    assert main([*argv, "--out", str(run), "--no-progress", "--sample-every", "0"]) == 0
    got = {}
    for name in ("ddim", "ddim-copy"):
        out = tmp_path / f"{name}.npz"
        args = ["sample", "--checkpoint", str(run), "--scale", "2", "--sampler", name]
        assert main([*args, "--steps", "3", "--per-class", "1", "--out", str(out)]) == 0
        with np.load(out) as z:
            got[name] = z["images"]
    assert np.array_equal(got["ddim"], got["ddim-copy"])


def test_a_new_dataset_is_one_spec_and_its_fetcher(monkeypatch, tmp_path, capsys):
    """Added to data.DATASETS, a dataset can be fetched, described, trained on (with its
    default flips) and judged, by name."""
    from cfgdiff.data import DATASETS, DatasetSpec, load_dataset

    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 2
        x = (rng.random((n, 1, 8, 8)) * 40).astype(np.uint8)
        x[y == 1, :, :, :4] = 255
        return x, y.astype(np.int64)

    def fetch(data_dir, log, timeout):
        return {"train": split(60), "test": split(40)}, "synthetic"

    spec = DatasetSpec("halves", ("left", "right"), fetch, hflip=True, judge={"epochs": 2})
    monkeypatch.setitem(DATASETS, "halves", spec)
    dd = tmp_path / "dd"
    assert main(["data", "fetch", "halves", "--data-dir", str(dd)]) == 0
    assert "source: synthetic" in capsys.readouterr().out
    data = load_dataset("halves", dd, split="test")
    assert data.class_names == ("left", "right") and data.images.shape == (40, 1, 8, 8)
    cfg = config_for_dataset(PRESETS["tiny"], data, "halves")
    assert cfg.train.hflip is True and cfg.model.num_classes == 2
    run = tmp_path / "run"
    argv = ["train", "--dataset", "halves", "--data-dir", str(dd), "--preset", "tiny"]
    assert main([*argv, "--steps", "2", "--out", str(run), "--no-progress"]) == 0
    argv = ["eval", "--checkpoint", str(run), "--scale", "2", "--n", "10", "--steps", "2"]
    assert main([*argv, "--data-dir", str(dd)]) == 0
    assert "judge: halves classifier" in capsys.readouterr().out


@pytest.mark.parametrize(
    "device,precision,chosen",
    [("cpu", "fp32", "cpu-demo-fp32"), ("cpu", "bf16", "cpu-demo"), ("cuda", "bf16", "cpu-demo")],
)
def test_demo_is_the_preset_of_what_the_machine_trains_in(device, precision, chosen):
    from cfgdiff.presets import machine_preset

    name, note = machine_preset("demo", device, precision)
    assert name == chosen and note.startswith(f"preset demo: {chosen} (")
    assert machine_preset("cpu-demo", device, precision) == ("cpu-demo", None)


@pytest.mark.parametrize("precision,chosen", [("fp32", "cpu-demo-fp32"), ("bf16", "cpu-demo")])
def test_a_demo_run_records_the_preset_chosen_and_resumes_with_it(
    folder_data, tmp_path, precision, chosen
):
    from cfgdiff.train.run import RunRequest, prepare

    said = []
    req = RunRequest(tmp_path / "run", dataset=f"folder:{folder_data}", preset="demo",
                     device="cpu", precision=precision)  # fmt: skip
    p = prepare(req, said.append)
    assert p.cfg.preset == chosen and p.cfg.model == dataclasses.replace(
        PRESETS[chosen].model,
        in_channels=p.cfg.model.in_channels,
        image_size=p.cfg.model.image_size,
        num_classes=p.cfg.model.num_classes,
    )
    assert any(s.startswith(f"preset demo: {chosen}") for s in said)


def test_the_fp32_demo_is_a_cheaper_network_of_the_same_recipe():
    from cfgdiff.unet import UNet

    fast, slow = PRESETS["cpu-demo-fp32"], PRESETS["cpu-demo"]
    assert fast.diffusion == slow.diffusion and fast.train.batch_size == slow.train.batch_size
    x = torch.zeros(1, 1, 28, 28)
    for cfg in (fast, slow):  # both build and map 28x28 to 28x28
        net = UNet(dataclasses.replace(cfg.model, image_size=28))
        assert (
            net(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).shape
            == x.shape
        )


@pytest.mark.parametrize(
    "seconds,device,precision,chosen",
    [(180, "cpu", "fp32", "cpu-demo-fp32"), (600, "cpu", "fp32", "cpu-demo-fp32"),
     (1800, "cpu", "fp32", "cpu-demo-fp32"), (3600, "cpu", "fp32", "cpu-demo-fp32"),
     (1800, "cpu", "bf16", "cpu-demo"), (1800, "cuda", "bf16", "cpu-demo")],
)  # fmt: skip
def test_a_time_budget_picks_the_recipe_measured_for_it(seconds, device, precision, chosen):
    from cfgdiff.presets import BUDGET_RECIPES, budget_preset

    name, note = budget_preset(seconds, device, precision)
    assert name == chosen and chosen in PRESETS
    assert note.startswith(f"--time {seconds // 60} min: preset {chosen}") and "\n" not in note
    measured = {(r.device, r.precision) for r in BUDGET_RECIPES}
    assert ("no budget recipe is measured" in note) == ((device, precision) not in measured)
    for r in BUDGET_RECIPES:  # every row names a preset that builds
        r.preset in PRESETS or pytest.fail(r.preset)


def test_a_budgeted_run_records_its_recipe_and_a_preset_or_resume_keeps_its_own(
    folder_data, tmp_path
):
    from cfgdiff.train.run import RunRequest, prepare

    said = []
    base = dict(dataset=f"folder:{folder_data}", device="cpu", precision="fp32")
    p = prepare(RunRequest(tmp_path / "a", time_budget=1800, **base), said.append)
    assert p.cfg.preset == "cpu-demo-fp32" and p.cfg.model.base_channels == 32
    assert said[0].startswith("--time 30 min: preset cpu-demo-fp32 (the demo's recipe, measured")
    said.clear()
    p = prepare(RunRequest(tmp_path / "b", time_budget=1800, preset="tiny", **base), said.append)
    assert p.cfg.preset == "tiny" and not any(s.startswith("--time") for s in said)
    p = prepare(RunRequest(tmp_path / "c", time_budget=120, **base), said.append)
    assert p.cfg.preset == "cpu-demo-fp32"
