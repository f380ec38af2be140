"""`cfgdiff export --format web`: a static page that samples the model in the browser.

Owns the folder and what goes in it: the page (index.html, page.js, sampler.js, style.css from
static/), model.onnx (onnx_net.onnx_model_bytes), model.json (onnx_net.sampler_record with what
the page adds: the timesteps of every number of steps it offers, its defaults, the source),
and ort/ (onnxruntime-web's files: runtime.py); the refusals made before any work; writing the
folder whole or not at all (a temporary sibling renamed into place). Also `seed_noise`, the
page's seeded initial noise in Python, which lets cfgdiff's own samplers start from the x_T the
page starts from. The sampling is sampler.js's, a port of sampling/samplers.py and
sampling/guidance.py (docs/DESIGN.md, "The static page").
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cfgdiff.checkpoint import MANIFEST, input_paths
from cfgdiff.errors import ConfigError
from cfgdiff.export.onnx import is_model_file, load_network
from cfgdiff.export.web.runtime import find_runtime
from cfgdiff.files import refuse_overlap, writing
from cfgdiff.onnx_net import convert, require, sampler_record
from cfgdiff.schedule import make_schedule, spaced_timesteps

# the page's files (static/), the samplers sampler.js implements, the largest number of steps
# its box takes (the timesteps of 1 .. this many are written to model.json), and the guidance
# scale it starts at (the serve page's)
PAGE_FILES = ("index.html", "page.js", "sampler.js", "style.css")
PAGE_SAMPLERS = ("dpmpp-2m", "ddim")
MAX_STEPS = 100
DEFAULT_SCALE = 3.0


def export_web(
    path: Path,
    out: Path,
    *,
    ema: bool = True,
    dtype: str = "fp32",
    log=None,
    ort: Path | None = None,
    cache: Path | None = None,
) -> dict[str, str]:
    """Write the page that samples the checkpoint or model file at `path` (its EMA weights, or
    the raw ones with ema=False) into the new folder `out`. onnxruntime-web comes from `ort` (a
    folder or npm tarball holding its files) or else from `cache`, fetched there with npm once
    (runtime.find_runtime). A text model's page offers the captions of its run's caption table
    (their embeddings are written; the text encoder does not run in the browser). Refused
    before any work: a `dtype` other than fp32 (the graph runs in fp32); an `out` that exists
    and is a file or a folder that is not empty, that lies in a checkpoint folder, or that is
    an input or one of its run's own files; raw weights of a model file. A text model without a
    caption table is refused once its checkpoint is read, before anything is written. Returns
    what was written; its "summary" is the CLI's line."""
    if dtype != "fp32":
        raise ConfigError(
            f"`dtype` must be fp32 for the web format (the page runs the graph in fp32), "
            f"got {dtype!r:.20}"
        )
    path, out = Path(path), Path(out)
    check_output_folder(out)
    model_file = is_model_file(path, ema)
    refuse_overlap(out, input_paths(path))
    require("onnx", "onnxruntime")
    runtime = find_runtime(ort, cache, log)
    loaded, captions = load_network(path, ema, log)
    cfg = loaded.cfg
    if cfg.model.condition == "text":
        if captions is None:
            raise ConfigError(
                f"`checkpoint` {path}: a text model whose run has no caption table; the page "
                "offers a text model's captions, embedded at export (the text encoder does not "
                "run in the browser)"
            )
    ckpt = loaded.path
    # a page is made to be published: no local path in it (a folder dataset by its name)
    source = ckpt.name if model_file else f"{ckpt.parent.parent.name}/{ckpt.name}"
    made = {"weights": "ema" if ema else "model", "source": source}
    # the graph is the one --format onnx writes, its record in its metadata
    converted = convert(loaded.net, cfg, sampler_record(cfg, captions) | made)
    record = page_record(cfg, captions) | made
    files = {name: _static(name) for name in PAGE_FILES}
    files["model.onnx"] = converted.model
    files["model.json"] = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    files |= {f"ort/{name}": data for name, data in runtime.files.items()}
    write_folder(out, files)
    size = sum(len(b) for b in files.values()) / 2**20
    return {
        "format": "web",
        "source": source,
        "weights": record["weights"],
        "onnxruntime_web": runtime.version,
        "summary": (
            f"a static page (index.html), {size:.1f} MiB: model.onnx ({converted.describe()}), "
            f"onnxruntime-web {runtime.version} in ort/; host the folder on any static file "
            f"server, e.g. python -m http.server -d {out}"
        ),
    }


def page_record(cfg, captions=None) -> dict:
    """model.json: onnx_net.sampler_record and what the page adds: the timesteps it visits for
    each number of steps 1 .. max_steps (schedule.spaced_timesteps with the model's spacing),
    its samplers and its defaults (the model's own sampler where the page has it, its steps,
    scale DEFAULT_SCALE, seed 0), the name of its seeded noise."""
    record = sampler_record(cfg, captions)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    s = cfg.sampling
    max_steps = min(MAX_STEPS, schedule.T)
    sampler = s.sampler if s.sampler in PAGE_SAMPLERS else PAGE_SAMPLERS[0]
    return record | {
        "max_steps": max_steps,
        "timesteps": {
            str(n): spaced_timesteps(schedule, n, s.spacing) for n in range(1, max_steps + 1)
        },
        "page": {"samplers": list(PAGE_SAMPLERS), "eta": 0.0, "noise": NOISE},
        "defaults": {
            "sampler": sampler,
            "steps": min(s.steps, max_steps),
            "scale": DEFAULT_SCALE,
            "seed": 0,
        },
    }


def check_output_folder(out: Path) -> None:
    """A ConfigError unless `out` can become the page's folder: new or empty, and not inside a
    checkpoint folder (whose files it could overwrite)."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"`out` {out}: is a file; the web format writes a (new or empty) folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"`out` {out}: is a folder that is not empty; give a new or empty one")
    in_checkpoint = any((folder / MANIFEST).is_file() for folder in out.parents)
    if in_checkpoint or (out.parent / "config.json").is_file():
        raise ConfigError(
            f"`out` {out}: inside a checkpoint folder, whose files it could overwrite; write it "
            "elsewhere"
        )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"`out` {out}: {parent} is not a folder")


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """The folder `out` holding `files` (relative path -> content), written under a temporary
    name beside it and renamed into place: a failure leaves nothing half-written. `out` must
    not exist or be an empty folder."""
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for rel, data in files.items():
            with writing(out / rel):  # a full disk names the file (files.write_error)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _write_file(tmp / rel, data)
        with writing(out):
            for folder in (tmp, *{(tmp / rel).parent for rel in files}):
                os.chmod(folder, 0o755)
            if out.is_dir():
                out.rmdir()  # empty (checked before any work; rmdir refuses otherwise)
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _static(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


# The page's seeded noise (sampler.js seedNoise): element k of the initial noise of seed s is
#   z_k = sqrt(-2 ln u1) cos(2 pi u2),  u1 = (h(s, 2k) + 1) / 2^32,  u2 = h(s, 2k + 1) / 2^32,
# rounded to float32, where h(s, j) = mix(mix(j) ^ mix(s + 0x9e3779b9)) and mix is Wellons'
# lowbias32 integer hash, all arithmetic mod 2^32. Counter-based: any element from (s, k) alone.
NOISE = "lowbias32 counter hash + Box-Muller, float32 (cfgdiff.export.web.seed_noise)"
MAX_SEED = 2**32 - 1


def _mix32(x: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 on uint32 values (products wrap mod 2^32, as Math.imul's do)."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def seed_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The page's initial noise x_T of `seed` (0 .. 2^32 - 1) for one image of `shape`
    (C, H, W), float32, element for element what sampler.js's seedNoise draws."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"`seed` must be in [0, {MAX_SEED}], got {seed}")
    n = int(np.prod(shape))
    key = _mix32(np.array([(int(seed) + 0x9E3779B9) % 2**32], dtype=np.uint64))[0]
    h = _mix32(_mix32(np.arange(2 * n, dtype=np.uint64)) ^ key)
    u1 = (h[0::2].astype(np.float64) + 1) / 2**32
    u2 = h[1::2].astype(np.float64) / 2**32
    z = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    return z.astype(np.float32).reshape(shape)
