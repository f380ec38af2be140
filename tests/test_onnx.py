"""The network as an ONNX graph: `cfgdiff export --format onnx` (a verified graph with its sampler
record), and ONNX Runtime as the sampling backend (`--backend onnxruntime|auto`): the same
samplers, guidance and noise, images within one uint8 level of PyTorch's."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, folder_run, one_line, tiny_config

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")

from cfgdiff import onnx_net  # noqa: E402
from cfgdiff.checkpoint import latest_checkpoint, load_for_sampling  # noqa: E402
from cfgdiff.config import GUIDANCE_CONVENTION  # noqa: E402
from cfgdiff.sampling import backends  # noqa: E402
from cfgdiff.schedule import make_schedule, spaced_timesteps  # noqa: E402
from cfgdiff.unet import UNet  # noqa: E402

HINT = "pip install 'cfgdiff[onnx]'"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint of a 3-class folder (class0..class2)."""
    return folder_run(tmp_path_factory.mktemp("onnx"), 6)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run exported by the CLI: (the .onnx file, its stdout)."""
    from cfgdiff.cli import main

    out = tmp_path_factory.mktemp("onnx-out") / "model.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    return out


def _random_weights(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (a fresh UNet's output layers are zero: the graph would be checked
    against a constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def test_the_exported_graph_runs_in_onnxruntime_as_the_network(run, exported):
    import onnxruntime as ort

    loaded = load_for_sampling(run)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("x", "tensor(float)"), ("t", "tensor(int64)"), ("c", "tensor(int64)"),
    ]  # fmt: skip
    assert [o.name for o in session.get_outputs()] == ["pred"]
    for batch in (1, 6):  # one graph, any batch: the guided batch stacks [c; null]
        x, t, c = onnx_net.example_inputs(loaded.cfg, batch, seed=batch)
        (out,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "c": c.numpy()})
        with torch.inference_mode():
            ref = loaded.net(x, t, c)
        assert out.shape == tuple(ref.shape)
        assert np.abs(out - ref.numpy()).max() <= onnx_net.TOLERANCE


def test_the_file_carries_what_a_sampler_needs(run, exported):
    loaded = load_for_sampling(run)
    cfg = loaded.cfg
    r = onnx_net.read_record(exported.read_bytes())
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    assert r["format"] == "cfgdiff-onnx-1"
    assert r["inputs"] == {"x": "float32", "t": "int64", "c": "int64"}
    assert (r["schedule"], r["T"]) == (cfg.diffusion.schedule, cfg.diffusion.timesteps)
    assert r["alpha_bar"] == schedule.alpha_bar.tolist()
    assert r["prediction"] == cfg.diffusion.prediction
    assert r["class_names"] == ["class0", "class1", "class2"]
    assert r["null_label"] == r["null_condition"] == 3
    assert r["guidance"]["convention"] == GUIDANCE_CONVENTION
    s = cfg.sampling
    assert r["sampler"] == {
        "sampler": s.sampler, "steps": s.steps, "spacing": s.spacing, "eta": s.eta,
        "timesteps": spaced_timesteps(schedule, s.steps, s.spacing),
    }  # fmt: skip
    assert (r["shape"], r["weights"]) == ([1, 8, 8], "ema")
    assert r["source"] == f"run/{latest_checkpoint(run / 'checkpoints').name}"  # no local path
    assert cfg.dataset.startswith("folder:/") and r["dataset"] == "folder:" + Path(cfg.dataset).name


@pytest.mark.parametrize("tokens", [0, 4])
def test_text_models_convert_with_their_caption_table(tokens):
    from cfgdiff.text.embedding import TextConditions

    base = tiny_config()
    m = dataclasses.replace(
        base.model, condition="text", text_encoder="x", text_encoder_sha256="0" * 64, text_dim=6,
        text_tokens=tokens,
    )  # fmt: skip
    cfg = dataclasses.replace(base, model=m)
    net = _random_weights(UNet(m))
    table = torch.randn(2, m.cond_dim)
    captions = TextConditions(("a one", "a two"), table, {"name": "x"})
    record = onnx_net.sampler_record(cfg, captions)
    graph = onnx_net.OnnxNetwork(onnx_net.onnx_model_bytes(net, cfg, record))
    x, t, c = onnx_net.example_inputs(cfg, 6, seed=5)  # three captions and three nulls
    assert bool((c[3:] == 0).all()) and not bool((c[:3] == 0).all())
    with torch.inference_mode():
        assert float((graph(x, t, c) - net(x, t, c)).abs().max()) <= onnx_net.TOLERANCE
    assert record["inputs"]["c"] == "float32" and record["cond_dim"] == m.cond_dim
    assert record["null_condition"] == [0.0] * m.cond_dim
    assert [e["prompt"] for e in record["captions"]] == ["a one", "a two"]
    assert torch.equal(torch.tensor([e["embedding"] for e in record["captions"]]), table)


def test_a_graph_that_disagrees_is_refused_and_nothing_is_written(run, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    real = onnx_net.OnnxNetwork.__call__

    def off(self, x, t, c):  # the session's output, off by 0.01
        return real(self, x, t, c) + 0.01

    monkeypatch.setattr(onnx_net.OnnxNetwork, "__call__", off)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    rc, err = cli(["export", "--checkpoint", run, "--format", "onnx", "--out", out], capsys)
    line = one_line(rc, err)
    assert "the ONNX graph differs from PyTorch by up to 0.01" in line
    assert f"(tolerance {onnx_net.TOLERANCE:g}): not written" in line
    assert out.read_bytes() == b"the user's file"
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left either


def test_a_network_onnx_cannot_express_is_one_line(run, tmp_path, monkeypatch, capsys):
    def unsupported(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    out = tmp_path / "model.onnx"
    rc, err = cli(["export", "--checkpoint", run, "--format", "onnx", "--out", out], capsys)
    assert "the network cannot be expressed in ONNX (RuntimeError: Exporting the operator" in (
        one_line(rc, err)
    )
    assert not out.exists()


def _bad_exports(run):
    ckpt = latest_checkpoint(run / "checkpoints")
    return {
        "unknown format": (["--format", "tflite", "--out", run.parent / "m.onnx"], None,
                           "invalid choice: 'tflite'"),
        "not .onnx": (["--format", "onnx", "--out", run / "SUMMARY.txt"], run / "SUMMARY.txt",
                      "--out must end in .onnx"),
        "in a checkpoint": (["--format", "onnx", "--out", ckpt / "ema.onnx"], ckpt / "ema.onnx",
                            "inside a checkpoint folder"),
        "a run's own folder": (["--format", "onnx", "--out", run / "samples" / "m.onnx"],
                               run / "samples" / "m.onnx",
                               "lies inside the run's preview grids"),
        "fp16": (["--format", "onnx", "--dtype", "fp16", "--out", run.parent / "h.onnx"],
                 run.parent / "h.onnx", "--dtype must be fp32 for the onnx format"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["unknown format", "not .onnx", "in a checkpoint", "a run's own folder", "fp16"]
)
def test_bad_export_input_is_one_line_and_overwrites_nothing(run, case, capsys):
    argv, target, message = _bad_exports(run)[case]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    planted = target is not None and not target.exists()
    if planted:  # a file already there is left as it was
        target.write_bytes(b"kept")
    try:
        rc, err = cli(["export", "--checkpoint", run, *argv], capsys)
        assert message in one_line(rc, err)
        if target is not None:
            assert target.read_bytes() == before.get(target, b"kept")
        assert {p: p.read_bytes() for p in before} == before
    finally:
        if planted:
            target.unlink()


def test_a_model_file_exports_and_its_raw_weights_are_refused(run, tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    assert cli(["export", "--checkpoint", run, "--out", f], capsys)[0] == 0
    rc, err = cli(["export", "--checkpoint", f, "--format", "onnx", "--out", tmp_path / "m.onnx",
                   "--raw"], capsys)  # fmt: skip
    assert "--raw: the model file" in one_line(rc, err)
    assert not (tmp_path / "m.onnx").exists()
    rc, _ = cli(["export", "--checkpoint", f, "--format", "onnx", "--out", tmp_path / "m.onnx"],
                capsys)  # fmt: skip
    assert rc == 0
    assert onnx_net.read_record((tmp_path / "m.onnx").read_bytes())["source"] == "m.safetensors"


def test_without_onnxruntime_each_use_names_the_extra(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    out = tmp_path / "m.onnx"
    rc, err = cli(["export", "--checkpoint", run, "--format", "onnx", "--out", out], capsys)
    assert HINT in one_line(rc, err) and not out.exists()
    argv = ["sample", "--checkpoint", run, "--scale", "3", "--per-class", "1", "--steps", "2"]
    argv += ["--precision", "fp32"]
    rc, err = cli([*argv, "--backend", "onnxruntime", "--out", tmp_path / "a.png"], capsys)
    assert HINT in one_line(rc, err) and not (tmp_path / "a.png").exists()
    monkeypatch.setattr(backends, "AUTO_MIN_IMAGE_STEPS", 0)  # auto would measure: torch
    from cfgdiff.cli import main

    assert main([str(a) for a in [*argv, "--backend", "auto", "--out", tmp_path / "b.png"]]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith(f"; torch fp32 (auto: onnxruntime is not installed ({HINT}))")


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddpm"])
def test_images_through_onnxruntime_are_pytorchs_within_one_level(run, tmp_path, sampler):
    from cfgdiff.cli import main

    def sample(backend: str):
        out = tmp_path / f"{backend}.npz"
        argv = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "8",
                "--precision", "fp32", "--seed", "5", "--sampler", sampler, "--steps", "6",
                "--backend", backend, "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        with np.load(out) as z:
            return z["images"].astype(int), json.loads(str(z["settings"]))

    ort_images, ort_record = sample("onnxruntime")
    torch_images, torch_record = sample("torch")
    assert (ort_record["backend"], ort_record["precision"]) == ("onnxruntime", "fp32")
    assert (torch_record["backend"], torch_record["precision"]) == ("torch", "fp32")
    assert ort_images.shape == torch_images.shape == (24, 1, 8, 8)
    assert np.mean(np.abs(ort_images - torch_images) <= 1) >= 0.999


def test_the_backend_is_said_first_and_recorded(run, tmp_path, capsys):
    from cfgdiff.cli import main

    out = tmp_path / "a.npz"
    argv = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "2", "--steps",
            "3", "--precision", "bf16", "--backend", "onnxruntime", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("seed 0; onnxruntime fp32 (as asked)")  # bf16 is not ONNX Runtime's
    with np.load(out) as z:
        record = json.loads(str(z["settings"]))
    assert (record["backend"], record["precision"]) == ("onnxruntime", "fp32")


@pytest.mark.parametrize("faster", ["onnxruntime", "torch"])
def test_auto_measures_a_long_job_and_takes_the_faster(run, tmp_path, monkeypatch, capsys,
                                                       faster):  # fmt: skip
    from cfgdiff.cli import main

    calls = []
    real = backends.measure

    def measured(net, graph, cfg, precision, rows):
        real(net, graph, cfg, precision, rows)  # both backends really run on the job's batch
        calls.append(rows)
        return (2.0, 1.0) if faster == "onnxruntime" else (1.0, 2.0)

    monkeypatch.setattr(backends, "measure", measured)
    monkeypatch.setattr(backends, "AUTO_MIN_IMAGE_STEPS", 30)  # 3 classes x 4 images x 3 steps
    out = tmp_path / "a.npz"
    argv = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "4", "--steps",
            "3", "--precision", "fp32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    other = "torch" if faster == "onnxruntime" else "onnxruntime"
    assert f"; {faster} fp32 (auto: 2.00x as fast as {other} here on a batch of 24 " in first
    assert calls == [24]  # 12 images, a guided pair each, in one batch of 64
    with np.load(out) as z:
        assert json.loads(str(z["settings"]))["backend"] == faster
    # a job under the threshold is not measured
    assert main([*argv[:-1], str(tmp_path / "b.npz"), "--per-class", "1"]) == 0
    assert (
        "; torch fp32 (auto: a short job (9 image-steps; measured from 30))"
        in (capsys.readouterr().out.splitlines()[0])
    )
    assert calls == [24]


def test_auto_on_the_real_measurement_takes_one_and_says_it(run, tmp_path, monkeypatch, capsys):
    from cfgdiff.cli import main

    monkeypatch.setattr(backends, "AUTO_MIN_IMAGE_STEPS", 0)
    out = tmp_path / "a.npz"
    argv = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "2", "--steps",
            "2", "--backend", "auto", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    with np.load(out) as z:
        backend = json.loads(str(z["settings"]))["backend"]
    assert backend in ("torch", "onnxruntime")
    assert f"; {backend} " in first and "(auto: " in first and "x as fast as" in first


def test_a_network_is_converted_once_and_again_when_its_weights_change(monkeypatch):
    cfg = tiny_config()
    net = _random_weights(UNet(cfg.model))
    made = []
    real = onnx_net.convert

    def counted(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(onnx_net, "convert", counted)
    x, t, c = onnx_net.example_inputs(cfg, 2)
    first = backends.runtime_network(net, cfg)
    assert backends.runtime_network(net, cfg) is first and len(made) == 1
    with torch.no_grad():
        net.conv_out.bias.add_(0.5)  # as an EMA update changes weights in place
    second = backends.runtime_network(net, cfg)
    assert second is not first and len(made) == 2
    with torch.inference_mode():
        assert float((second(x, t, c) - net(x, t, c)).abs().max()) <= onnx_net.TOLERANCE


def test_onnxruntime_runs_on_the_cpu_only(run):
    from cfgdiff.errors import ConfigError
    from cfgdiff.sampling.settings import SamplingSettings

    cfg = load_for_sampling(run).cfg
    with pytest.raises(ConfigError, match="`backend=onnxruntime` runs on the CPU"):
        SamplingSettings(backend="onnxruntime").resolve(cfg, "cuda")


def test_the_page_decides_auto_once_and_its_command_names_the_backend(run, monkeypatch):
    from cfgdiff.sampling.conditions import Model
    from cfgdiff.serve.jobs import Engine, Limits

    monkeypatch.setattr(backends, "measure", lambda *a: (2.0, 1.0))  # ONNX Runtime faster
    engine = Engine(Model.of(load_for_sampling(run)), Limits(), "cpu", "fp32", backend="auto")
    got, done = [], threading.Event()

    def sink(event):
        got.append(event)
        if event["type"] in ("done", "cancelled", "error"):
            done.set()

    try:
        engine.warm_up()
        assert (engine.backend, engine.info()["backend"]) == ("onnxruntime", "onnxruntime")
        assert engine.backend_words().startswith("onnxruntime fp32 (auto: 2.00x as fast as")
        engine.submit(engine.parse({"class": 1, "n": 2, "steps": 3}), sink)
        assert done.wait(60)
    finally:
        engine.close()
    final = got[-1]
    assert final["type"] == "done", final
    assert "--backend onnxruntime" in final["commands"][0]
    assert base64.b64decode(final["png"])[:4] == b"\x89PNG"


def test_the_graph_is_kept_on_disk_and_a_damaged_copy_is_only_a_miss(monkeypatch):
    from cfgdiff.data import default_data_dir

    cfg = tiny_config()
    net = _random_weights(UNet(cfg.model), seed=3)
    made = []
    real = onnx_net.convert

    def counted(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(onnx_net, "convert", counted)
    backends.runtime_network(net, cfg)
    (kept,) = (default_data_dir() / backends.GRAPH_CACHE).glob("*.onnx")
    assert kept.name == f"{onnx_net.graph_key(net, cfg)}.onnx" and len(made) == 1
    backends._sessions.clear()  # as another process would find it
    x, t, c = onnx_net.example_inputs(cfg, 3)
    graph = backends.runtime_network(net, cfg)
    assert len(made) == 1  # read back, not converted
    with torch.inference_mode():
        assert float((graph(x, t, c) - net(x, t, c)).abs().max()) <= onnx_net.TOLERANCE
    other = _random_weights(UNet(cfg.model), seed=4)  # another network's graph under this name
    kept.write_bytes(onnx_net.onnx_model_bytes(other, cfg))
    backends._sessions.clear()
    graph = backends.runtime_network(net, cfg)
    assert len(made) == 3  # refused by the verification, converted again (and the other's)
    with torch.inference_mode():
        assert float((graph(x, t, c) - net(x, t, c)).abs().max()) <= onnx_net.TOLERANCE
