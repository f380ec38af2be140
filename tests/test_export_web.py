"""cfgdiff export --format web: the folder it writes, its refusals, the page's seeded noise and
samplers against cfgdiff's own (under node), and the page itself in a real browser (Debian's
headless Chromium driven by Playwright, as tests/test_serve_browser.py), whose images are
compared pixel for pixel with cfgdiff's samplers started from the same noise.

The browser test needs onnxruntime-web: the export fetches it with npm into ~/.cache/cfgdiff
once (where npm or the registry cannot be had, the test skips and says why). It saves
web-export.png in tmp_path, and also in $CFGDIFF_SCREENSHOTS when that names a folder (that of
docs/walkthrough/ is made this way); $CFGDIFF_WEB_CHECKPOINT exports that checkpoint (a
trained MNIST model) instead of a tiny one trained here.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, one_line, tiny_config, tiny_folder_run

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")

from cfgdiff.export.web import PAGE_FILES, page_record, seed_noise  # noqa: E402
from cfgdiff.export.web.runtime import ORT_FILES, ORT_VERSION  # noqa: E402
from cfgdiff.sampling.guidance import guided_denoiser  # noqa: E402
from cfgdiff.sampling.samplers import run_sampler  # noqa: E402
from cfgdiff.schedule import make_schedule, spaced_timesteps  # noqa: E402

STATIC = Path(__file__).parents[1] / "src" / "cfgdiff" / "export" / "web" / "static"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (apt install nodejs)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_folder_run(tmp_path_factory.mktemp("web"))[0]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny text model of a 3-class folder (2 steps): its run holds a caption table."""
    from conftest import image_folder

    from cfgdiff.cli import main

    root = tmp_path_factory.mktemp("web-text")
    folder = image_folder(root / "folder", 6)
    argv = ["train", "--condition", "text", "--dataset", f"folder:{folder}", "--preset", "tiny",
            "--out", root / "run", "--steps", "2", "--sample-every", "0", "--no-progress",
            "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return root / "run"


@pytest.fixture
def fake_ort(tmp_path):
    """A folder holding files of onnxruntime-web's names (the unit tests only copy them)."""
    folder = tmp_path / "ort-files"
    folder.mkdir()
    for name in ORT_FILES:
        (folder / name).write_bytes(f"// {name}\n".encode())
    return folder


def _export(run, out, capsys, *extra):
    """cli() of `cfgdiff export --format web`: its status and the lines on stderr."""
    return cli(["export", "--format", "web", "--checkpoint", run, "--out", out, *extra], capsys)


def _export_said(run, out, capsys, *extra) -> str:
    """What a successful `cfgdiff export --format web` printed."""
    from cfgdiff.cli import main

    argv = ["export", "--format", "web", "--checkpoint", run, "--out", out, *extra]
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_the_folder_holds_the_page_the_graph_its_record_and_the_runtime(run, fake_ort, tmp_path,
                                                                        capsys):  # fmt: skip
    out = tmp_path / "site"
    out.mkdir()  # an empty folder is taken
    said = _export_said(run, out, capsys, "--ort", fake_ort)
    assert said.startswith(f"wrote {out}: a static page (index.html)") and "ort/" in said
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    want = [*PAGE_FILES, "model.json", "model.onnx", *(f"ort/{n}" for n in ORT_FILES)]
    assert files == sorted(want)
    for name in PAGE_FILES:  # the page as shipped in the package
        assert (out / name).read_bytes() == (STATIC / name).read_bytes()
    assert (out / "ort" / ORT_FILES[1]).read_bytes() == (fake_ort / ORT_FILES[1]).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    record = json.loads((out / "model.json").read_text())
    assert record["class_names"] == ["class0", "class1", "class2"]
    assert record["null_condition"] == 3 and record["shape"] == [1, 8, 8]
    assert record["source"] == "run/step-0000002" and record["weights"] == "ema"
    assert record["dataset"] == "folder:folder"  # no local path in a page to publish
    for name in ("model.json", "model.onnx"):  # the graph's metadata holds the record too
        assert str(tmp_path.parent).encode() not in (out / name).read_bytes()
    cfg = tiny_config()
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    assert record["max_steps"] == min(100, schedule.T) == len(record["timesteps"])
    for n in (1, 7, record["max_steps"]):
        assert record["timesteps"][str(n)] == spaced_timesteps(schedule, n, "trailing")
    assert record["alpha_bar"] == schedule.alpha_bar.tolist()
    assert record["defaults"]["sampler"] in record["page"]["samplers"]

    # the graph runs and is the network
    import onnxruntime

    from cfgdiff.checkpoint import load_for_sampling

    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    x = seed_noise(5, (1, 8, 8))[None].repeat(2, 0)
    t, c = np.array([999, 999]), np.array([1, 3])
    (pred,) = session.run(None, {"x": x, "t": t, "c": c})
    with torch.inference_mode():
        ref = load_for_sampling(run).net(*(torch.from_numpy(a) for a in (x, t, c)))
    assert np.abs(pred - ref.numpy()).max() < 1e-4


def test_a_text_models_page_offers_its_run_captions(text_run, fake_ort, tmp_path, capsys):
    """The captions of the run's table with their embeddings (float32 values, as written); a
    text model whose run has no table is refused in one line, nothing written."""
    from cfgdiff.text.embedding import TextConditions

    out = tmp_path / "site"
    _export_said(text_run, out, capsys, "--ort", fake_ort)
    record = json.loads((out / "model.json").read_text())
    table = TextConditions.load(text_run / "captions.safetensors")
    assert record["condition"] == "text" and record["inputs"]["c"] == "float32"
    assert [c["prompt"] for c in record["captions"]] == list(table.captions)
    got = np.array([c["embedding"] for c in record["captions"]], dtype=np.float32)
    assert np.array_equal(got, table.table.float().numpy())
    assert record["null_condition"] == [0.0] * record["cond_dim"]

    bare = tmp_path / "bare"
    shutil.copytree(text_run, bare)
    (bare / "captions.safetensors").unlink()
    rc, err = _export(bare, tmp_path / "site2", capsys, "--ort", fake_ort)
    assert "a text model whose run has no caption table" in one_line(rc, err)
    assert not (tmp_path / "site2").exists()


@pytest.mark.parametrize(
    "case,message",
    [
        ("file", "is a file; the web format writes a (new or empty) folder"),
        ("full", "is a folder that is not empty; give a new or empty one"),
        ("checkpoint", "inside a checkpoint folder"),
        ("run-file", "lies inside"),
        ("fp16", "--dtype must be fp32 for the web format"),
        ("missing-ort", "no such file or directory"),
        ("empty-ort", f"holds no {ORT_FILES[0]} and {ORT_FILES[1]} (nor in dist/)"),
        ("ort-for-onnx", "--ort is for --format web, not onnx"),
    ],
)
def test_refused_before_any_work(run, fake_ort, tmp_path, capsys, case, message):
    from cfgdiff.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    out, extra = tmp_path / "site", ["--ort", fake_ort]
    if case == "file":
        out.write_text("mine")
    elif case == "full":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "checkpoint":
        out = ckpt / "site"
    elif case == "run-file":
        out = run / "checkpoints" / "site"
    elif case == "fp16":
        extra += ["--dtype", "fp16"]
    elif case == "missing-ort":
        extra = ["--ort", tmp_path / "nowhere"]
    elif case == "empty-ort":
        extra = ["--ort", tmp_path]
    before = {p: sorted(q.name for q in p.iterdir()) for p in (out.parent, ckpt, run)}
    argv = ["export", "--format", "onnx" if case == "ort-for-onnx" else "web"]
    rc, err = cli([*argv, "--checkpoint", run, "--out", out, *extra], capsys)
    line = one_line(rc, err)
    assert message in line, line
    if case in ("file", "full"):
        assert str(out) in line
    assert {p: sorted(q.name for q in p.iterdir()) for p in before} == before
    if case == "file":
        assert out.read_text() == "mine"


def test_without_npm_it_says_how_to_give_the_runtime(run, tmp_path, capsys, monkeypatch):
    """No runtime cached and no npm: one line naming --ort, exit status 2, nothing written
    (neither the folder nor the cache)."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "site"
    line = one_line(*_export(run, out, capsys))
    assert f"onnxruntime-web {ORT_VERSION} is not cached and npm is not installed" in line
    assert "--ort (a folder holding" in line and f"npm pack onnxruntime-web@{ORT_VERSION}" in line
    assert not out.exists() and not (tmp_path / "home").exists()


def test_a_runtime_tarball_is_taken(run, fake_ort, tmp_path, capsys):
    """--ort an npm tarball (what `npm pack onnxruntime-web@VERSION` writes): its two files are
    copied, its version said."""
    tgz = tmp_path / "onnxruntime-web-9.9.9.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name in ORT_FILES:
            tar.add(fake_ort / name, f"package/dist/{name}")
        meta = json.dumps({"name": "onnxruntime-web", "version": "9.9.9"}).encode()
        info = tarfile.TarInfo("package/package.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    out = tmp_path / "site"
    assert "onnxruntime-web 9.9.9 in ort/" in _export_said(run, out, capsys, "--ort", tgz)
    assert (out / "ort" / ORT_FILES[0]).read_bytes() == (fake_ort / ORT_FILES[0]).read_bytes()


def test_a_failure_midway_leaves_nothing(run, fake_ort, tmp_path, monkeypatch):
    from cfgdiff.errors import WriteFault
    from cfgdiff.export import export

    out = tmp_path / "site"

    def full_disk(path, data):
        if path.name == "model.onnx":
            raise OSError(28, "No space left on device")
        path.write_bytes(data)

    monkeypatch.setattr("cfgdiff.export.web._write_file", full_disk)
    with pytest.raises(WriteFault, match="model.onnx: cannot write: No space left on device"):
        export(run, out, "web", ort=fake_ort)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ort-files"]


# --- the page's noise and samplers, run by node ----------------------------------------------


def _node(script: str) -> object:
    """Run an ES-module `script` with sampler.js importable as ./sampler.mjs; its JSON output."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(STATIC / "sampler.js", Path(tmp) / "sampler.mjs")
        (Path(tmp) / "main.mjs").write_text(script)
        done = subprocess.run(
            [NODE, "main.mjs"], cwd=tmp, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_node
def test_the_python_port_of_the_noise_draws_what_the_page_draws():
    shape = (3, 16, 16)
    seeds = [0, 1, 123456789, 2**32 - 1]
    got = _node(
        "import { seedNoise } from './sampler.mjs';\n"
        f"console.log(JSON.stringify({seeds}.map((s) => Array.from(seedNoise(s, 768)))));"
    )
    for seed, values in zip(seeds, got, strict=True):
        want = seed_noise(seed, shape)
        assert np.array_equal(np.array(values, dtype=np.float32).reshape(shape), want), seed
    many = seed_noise(7, (200_000,))
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1) < 0.01  # N(0, 1)
    assert not np.array_equal(seed_noise(8, shape), seed_noise(7, shape))
    with pytest.raises(Exception, match=r"`seed` must be in \[0, 4294967295\], got -1"):
        seed_noise(-1, shape)


# a network in closed form, written alike in JavaScript and Python: what the samplers do with
# its output is the same arithmetic in both
JS_NET = """
const net = async (x, t, conds) => {
  const n = x.length / conds.length;
  const out = new Float32Array(x.length);
  conds.forEach((c, i) => {
    for (let k = 0; k < n; k++) {
      out[i * n + k] = 0.5 * x[i * n + k] * Math.cos(t / 40) + 0.1 * (c - 1) + 0.01 * (k % 5);
    }
  });
  return out;
};
"""


def _py_net(x, t, c):
    k = torch.arange(x[0].numel()).reshape(x.shape[1:]) % 5
    tt = torch.cos(t.double() / 40)[:, None, None, None]
    return (0.5 * x.double() * tt + 0.1 * (c.double() - 1)[:, None, None, None] + 0.01 * k).float()


@needs_node
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_page_samples_as_cfgdiff_samples(prediction):
    """sampler.js's DDIM and DPM-Solver++(2M) with guidance at s = 0, 1 and 3 against
    run_sampler and guided_denoiser, from the same seeded noise, on a cosine schedule."""
    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg, diffusion=dataclasses.replace(cfg.diffusion, prediction=prediction, schedule="cosine")
    )
    record = page_record(cfg)
    schedule = make_schedule("cosine", cfg.diffusion.timesteps)
    cases = [(s, sampler, steps) for s in (0, 1, 3) for sampler in ("ddim", "dpmpp-2m")
             for steps in (1, 7)]  # fmt: skip
    script = (
        "import { sampleImage } from './sampler.mjs';\n" + JS_NET
        + f"const record = {json.dumps(record)};\nconst out = [];\n"
        + f"for (const [scale, sampler, steps] of {json.dumps(cases)}) {{\n"
        + "  const x = await sampleImage(net, record, { cond: 2, scale, sampler, steps, "
        + "seed: 11 });\n"
        + "  out.push(Array.from(x));\n}\nconsole.log(JSON.stringify(out));\n"
    )  # fmt: skip
    got = _node(script)
    x_T = torch.from_numpy(seed_noise(11, (1, 8, 8)))[None]
    for (scale, sampler, steps), values in zip(cases, got, strict=True):
        denoise = guided_denoiser(
            _py_net, torch.tensor([2]), schedule, null_label=3, prediction=prediction, scale=scale
        )
        want = run_sampler(sampler, denoise, x_T, schedule, steps, spacing="trailing")
        diff = np.abs(np.array(values).reshape(1, 1, 8, 8) - want.numpy()).max()
        assert diff < 1e-5, (scale, sampler, steps, diff)


# --- the page in a browser ---------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# The agreement asserted between the page's images (onnxruntime-web's WebAssembly kernels, fp32)
# and cfgdiff's (PyTorch, fp32) from the same noise: at most LEVELS uint8 levels apart on SHARE
# of the pixels, and WORST levels on any (docs/DESIGN.md, "The static page", gives what was
# measured; bench/web_export.py measures it).
LEVELS, SHARE, WORST = 1, 0.99, 4


class _Handler(http.server.SimpleHTTPRequestHandler):
    """A static file host: the page's files with the types browsers insist on."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".onnx": "application/octet-stream",
    }  # fmt: skip

    def log_message(self, *args):
        pass


def _serve(folder: Path):
    """A static file server of `folder` on 127.0.0.1 in a thread: (its URL, the server)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


@pytest.fixture(scope="module")
def runtime():
    """onnxruntime-web, fetched by npm into the cache once (the export's own fetch)."""
    from cfgdiff.errors import ConfigError
    from cfgdiff.export.web.runtime import find_runtime

    try:
        find_runtime()
    except ConfigError as e:
        pytest.skip(f"onnxruntime-web cannot be had: {e}")


@pytest.fixture(scope="module")
def site(runtime, tmp_path_factory):
    """The page of $CFGDIFF_WEB_CHECKPOINT or of a tiny run, served from 127.0.0.1:
    (url, checkpoint)."""
    from cfgdiff.export import export

    root = tmp_path_factory.mktemp("site")
    checkpoint = os.environ.get("CFGDIFF_WEB_CHECKPOINT") or tiny_folder_run(root)[0]
    export(checkpoint, root / "page", "web")
    url, server = _serve(root / "page")
    yield url, checkpoint
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def chromium():
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (make install-test installs it)"
    )
    if not CHROMIUM.is_file():
        pytest.skip(
            f"no browser at {CHROMIUM} (make install-test installs Debian's chromium as root)"
        )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


def _cfgdiff_image(loaded, cond, scale: float, sampler: str, steps: int, seed: int):
    """cfgdiff's own sample from the page's noise of `seed`, as uint8 (C, H, W); `cond` a class
    label or a caption's embedding."""
    from cfgdiff.sampling.generate import to_uint8

    cfg = loaded.cfg
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    x_T = torch.from_numpy(seed_noise(seed, shape))[None]
    with torch.inference_mode():
        denoise = guided_denoiser(
            loaded.net, torch.as_tensor(cond)[None], schedule, null_label=cfg.model.num_classes,
            prediction=cfg.diffusion.prediction, scale=scale,
        )  # fmt: skip
        x0 = run_sampler(sampler, denoise, x_T, schedule, steps, spacing=cfg.sampling.spacing)
    return to_uint8(x0)[0].numpy()


def _canvas(page, cfg) -> np.ndarray:
    """The image the page shows, as uint8 (C, H, W), read from its canvas."""
    rgba = page.evaluate(
        "() => { const c = document.getElementById('image'); return Array.from("
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"
    )
    size = cfg.model.image_size
    got = np.array(rgba, dtype=np.uint8).reshape(size, size, 4)[..., :3].transpose(2, 0, 1)
    return got[:1] if cfg.model.in_channels == 1 else got


def _assert_agrees(got: np.ndarray, want: np.ndarray, case) -> None:
    diff = np.abs(got.astype(int) - want.astype(int))
    share = float((diff <= LEVELS).mean())
    assert share >= SHARE and diff.max() <= WORST, (case, share, diff.max())


@pytest.mark.slow
def test_the_page_draws_what_cfgdiff_samples(chromium, site, tmp_path):
    from cfgdiff.checkpoint import load_for_sampling

    url, checkpoint = site
    loaded = load_for_sampling(checkpoint)
    page = chromium.new_page(viewport={"width": 1000, "height": 720})
    errors, urls = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: urls.append(r.url))
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready]", timeout=60_000)
    names = page.locator("#classes button").all_inner_texts()
    assert names == loaded.cfg.label_names()

    cases = [  # (class, scale, sampler, steps, seed): the last one is the screenshot's
        (1, 0.0, "ddim", 5, 4294967295),
        (0, 1.0, "dpmpp-2m", 8, 123456789),
        (min(3, len(names) - 1), 3.0, "dpmpp-2m", 20, 0),
    ]
    for label, scale, sampler, steps, seed in cases:
        page.evaluate(
            "(s) => { const e = document.getElementById('scale'); e.value = s; "
            "e.dispatchEvent(new Event('input')); }",
            scale,
        )
        page.select_option("#sampler", sampler)
        page.fill("#steps", str(steps))
        page.fill("#seed", str(seed))
        page.click(f"#classes button[data-class='{label}']")
        page.wait_for_selector("#status[data-state=done]", timeout=120_000)
        assert page.locator("#steps-strip canvas").count() == steps  # one picture a step
        assert page.inner_text("#w-label") == f"w = s − 1 = {scale - 1:.1f}"
        want = _cfgdiff_image(loaded, label, scale, sampler, steps, seed)
        _assert_agrees(_canvas(page, loaded.cfg), want, (label, scale, sampler))
    page.screenshot(path=str(tmp_path / "web-export.png"), full_page=True)
    if os.environ.get("CFGDIFF_SCREENSHOTS"):
        shutil.copyfile(
            tmp_path / "web-export.png", Path(os.environ["CFGDIFF_SCREENSHOTS"]) / "web-export.png"
        )
    assert all(u.startswith(url) or u.startswith("data:") for u in urls), urls  # nothing else
    assert errors == []
    page.close()


@pytest.mark.slow
def test_a_text_models_page_samples_a_caption_as_cfgdiff_does(chromium, runtime, text_run,
                                                              tmp_path):  # fmt: skip
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.export import export
    from cfgdiff.text.embedding import TextConditions

    export(text_run, tmp_path / "page", "web")
    url, server = _serve(tmp_path / "page")
    loaded = load_for_sampling(text_run)
    table = TextConditions.load(text_run / "captions.safetensors")
    page = chromium.new_page(viewport={"width": 1000, "height": 720})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url)
        page.wait_for_selector("#status[data-state=ready]", timeout=60_000)
        options = page.eval_on_selector_all("#prompt option", "os => os.map(o => o.text)")
        assert options == list(table.captions) and page.locator("#classes button").count() == 0
        k = len(options) - 1
        page.select_option("#prompt", str(k))
        page.select_option("#sampler", "dpmpp-2m")
        page.fill("#steps", "6")
        page.fill("#seed", "9")
        page.click("#go")
        page.wait_for_selector("#status[data-state=done]", timeout=120_000)
        assert page.inner_text("#caption").startswith(f"{table.captions[k]}, s = 3 ")
        want = _cfgdiff_image(loaded, table.table[k].float(), 3.0, "dpmpp-2m", 6, 9)
        _assert_agrees(_canvas(page, loaded.cfg), want, table.captions[k])
        assert errors == []
    finally:
        page.close()
        server.shutdown()
        server.server_close()
