"""One sampling request path: the CLI's sample, eval and sweep, the page and the Python API
build the same job from the same settings and make the same images, for a class model and a
text model; every declared sampling setting reaches what it sets; a model's own sampler is the
default everywhere."""

from __future__ import annotations

import base64
import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import folder_run
from PIL import Image

from cfgdiff.cli import main
from cfgdiff.sampling.conditions import Asks, Model
from cfgdiff.sampling.request import SampleRequest, prepare
from cfgdiff.sampling.settings import SamplingSettings

SETTINGS = SamplingSettings(sampler="ddim", steps=4, seed=3, precision="fp32")
FLAGS = ["--sampler", "ddim", "--steps", "4", "--seed", "3", "--precision", "fp32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint of a 3-class folder (class0..class2, 10 images each)."""
    return folder_run(tmp_path_factory.mktemp("request"), 10)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    pytest.importorskip("wordllama", reason="the text extra is not installed")
    from serving import train_text_run

    return train_text_run(tmp_path_factory.mktemp("request-text"))


def _npz_images(path) -> torch.Tensor:
    with np.load(path) as z:
        return torch.from_numpy(z["images"])


def _page_png(run, body: dict) -> tuple[bytes, dict]:
    """The final PNG the page's engine sends for a request body."""
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.serve.jobs import Engine, Limits

    engine = Engine(Model.of(load_for_sampling(run)), Limits(), "cpu", "fp32")
    got, done = [], threading.Event()

    def sink(event):
        got.append(event)
        if event["type"] in ("done", "cancelled", "error"):
            done.set()

    try:
        engine.submit(engine.parse(body), sink)
        assert done.wait(60)
    finally:
        engine.close()
    final = got[-1]
    assert final["type"] == "done", final
    return base64.b64decode(final["png"]), final


@pytest.mark.parametrize("kind", ["class", "text"])
def test_the_cli_the_page_and_the_api_make_the_same_images(kind, request, tmp_path):
    """The same request through `cfgdiff sample` (.npz and .png), the Python API and the page:
    the same images, and the page's PNG is the CLI's grid, byte for byte."""
    if kind == "class":
        run = request.getfixturevalue("run")
        rows, asks, body = ["--classes", "class1"], Asks(classes=("class1",)), {"class": 1}
    else:
        run = request.getfixturevalue("text_run")
        prompt = "a class2"
        rows, asks, body = [f"--prompt={prompt}"], Asks(prompts=(prompt,)), {"prompt": prompt}
    common = ["sample", "--checkpoint", str(run), "--scale", "2.5", "--per-class", "3", *rows]
    assert main([*common, *FLAGS, "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*common, *FLAGS, "--out", str(tmp_path / "a.png")]) == 0
    cli = _npz_images(tmp_path / "a.npz")

    req = SampleRequest(run, scale=2.5, asks=asks, per_class=3, settings=SETTINGS)
    api = prepare(req).run().images
    assert torch.equal(api, cli)

    page = {**body, "scale": 2.5, "n": 3, "sampler": "ddim", "steps": 4, "seed": 3}
    png, final = _page_png(run, page)
    assert png == (tmp_path / "a.png").read_bytes()
    assert final["settings"]["sampler"] == "ddim" and final["settings"]["steps"] == 4


def test_eval_and_sweep_sample_the_same_images_as_sample(run, tmp_path, monkeypatch):
    """eval's and sweep's sample i (of class i mod 3, noise stream i) is `cfgdiff sample`'s
    image of that class and stream, at one scale."""
    import cfgdiff.metrics.judging as judging

    made = []
    real = judging.generate

    def keep(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(judging, "generate", keep)
    dd = ["--data-dir", str(tmp_path / "data")]
    common = ["--checkpoint", str(run), *FLAGS, "--n", "12", *dd]
    assert main(["eval", *common, "--scale", "2.5"]) == 0
    assert main(["sweep", *common, "--scales", "2.5", "--out", str(tmp_path / "sw")]) == 0
    evaluated, swept = made
    assert torch.equal(evaluated, swept)
    for c in range(3):
        out = tmp_path / f"c{c}.npz"
        argv = ["sample", "--checkpoint", str(run), "--scale", "2.5", "--classes", f"class{c}"]
        assert main([*argv, "--per-class", "12", *FLAGS, "--out", str(out)]) == 0
        mine = list(range(c, 12, 3))  # eval's samples of class c: streams c, c + 3, ...
        assert torch.equal(evaluated[mine], _npz_images(out)[mine])


# Every SamplingSettings field with a flag: a value other than its default, and what it becomes
# once resolved. A field added without an entry here fails the test below.
GIVEN = {
    "sampler": ("ddim", "ddim"),
    "steps": ("3", 3),
    "spacing": ("quadratic", "quadratic"),
    "eta": ("0.5", 0.5),
    "seed": ("7", 7),
    "batch_size": ("5", 5),
    "device": ("cpu", "cpu"),
    "precision": ("fp32", "fp32"),
    "compile": ("off", "off"),
    "backend": ("onnxruntime", "onnxruntime"),
}


def test_every_declared_setting_reaches_what_it_sets(run, tmp_path, monkeypatch):
    """Each SamplingSettings flag, given to `cfgdiff sample`, arrives in the settings the
    batches are sampled with; the sampler options reach the sampler function itself; every
    option a sampler of the table takes is a declared setting."""
    import cfgdiff.sampling.generate as gen
    from cfgdiff.sampling.samplers import SAMPLERS

    flagged = [f.name for f in dataclasses.fields(SamplingSettings) if f.metadata.get("flag", 1)]
    assert sorted(flagged) == sorted(GIVEN), "a declared setting with no value in GIVEN"
    for entry in SAMPLERS.values():
        assert set(entry.options) <= set(flagged), entry
    seen: dict = {}
    real_batches, real_ddim = gen._generate, SAMPLERS["ddim"]

    def batches(*a, settings, batch_size, **k):
        seen.update(settings=settings, batch_size=batch_size)
        return real_batches(*a, settings=settings, batch_size=batch_size, **k)

    def ddim(denoise, x_T, schedule, steps, **k):
        seen.update(steps=steps, **{n: v for n, v in k.items() if n in ("spacing", "eta")})
        return real_ddim.fn(denoise, x_T, schedule, steps, **k)

    monkeypatch.setattr(gen, "_generate", batches)
    monkeypatch.setitem(SAMPLERS, "ddim", dataclasses.replace(real_ddim, fn=ddim))
    argv = ["sample", "--checkpoint", str(run), "--scale", "2", "--per-class", "2"]
    for name, (value, _) in GIVEN.items():
        argv += ["--" + name.replace("_", "-"), value]
    assert main([*argv, "--out", str(tmp_path / "s.npz")]) == 0
    resolved = seen["settings"]
    for name, (_, want) in GIVEN.items():
        assert getattr(resolved, name) == want, name
    assert seen["batch_size"] == 5
    assert (seen["steps"], seen["spacing"], seen["eta"]) == (3, "quadratic", 0.5)
    with np.load(tmp_path / "s.npz") as z:
        assert (str(z["sampler"]), int(z["steps"]), int(z["seed"])) == ("ddim", 3, 7)


def test_a_models_own_sampler_is_every_commands_default(run, tmp_path, capsys):
    """A checkpoint records the sampler its preset is judged with; sample, eval and the page
    take it when none is given and say so, and the CLI's flag overrides it."""
    import json

    from cfgdiff.checkpoint import load_for_sampling

    loaded = load_for_sampling(run)
    own = loaded.cfg.sampling
    assert (own.sampler, own.steps) == ("dpmpp-2m", 20)  # the tiny preset's: the default
    job = prepare(SampleRequest(run, scale=2, out=tmp_path / "x.png"))
    assert (job.settings.sampler, job.settings.steps) == (own.sampler, own.steps)
    assert main(["sample", "--checkpoint", str(run), "--scale", "2", "--out",
                 str(tmp_path / "a.png")]) == 0  # fmt: skip
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("sampling with dpmpp-2m 20 steps (the model's own), seed 0; torch ")
    js = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", str(run), "--scale", "2", "--n", "12", "--steps", "2"]
    assert main([*argv, "--data-dir", str(tmp_path / "d"), "--json", str(js)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "dpmpp-2m 2 steps (the model's own)" in first
    assert json.loads(js.read_text())["sampler_from"] == "model"
    _, final = _page_png(run, {"class": 0, "n": 1})
    assert (final["settings"]["sampler"], final["settings"]["steps"]) == ("dpmpp-2m", 20)


def test_the_demo_preset_records_ancestral_sampling():
    """The demo's evaluations use the sampler its preset records (`make demo` passes none)."""
    from cfgdiff.presets import PRESETS

    for name in ("cpu-demo", "cpu-demo-fp32"):
        s = PRESETS[name].sampling
        assert (s.sampler, s.steps) == ("ddpm", 20), name
    assert (PRESETS["mnist"].sampling.sampler, PRESETS["mnist"].sampling.steps) == (
        "dpmpp-2m",
        20,
    )


def test_an_old_config_without_a_sampling_record_loads_with_the_default():
    from cfgdiff.config import RunConfig, SamplingConfig

    d = RunConfig().to_dict()
    del d["sampling"]
    assert RunConfig.from_dict(d).sampling == SamplingConfig()


def test_a_grid_png_is_written_as_its_rows(run, tmp_path):
    """The grid's rows are the asked classes, per_class images each (pictures.images)."""
    asks = Asks(classes=("class2", "class0"))
    req = SampleRequest(run, scale=1, asks=asks, per_class=2, settings=SETTINGS, out=tmp_path)
    job = prepare(req)
    samples = job.run()
    assert samples.rows.labels.tolist() == [2, 2, 0, 0]
    samples.write(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size[0] > 0
