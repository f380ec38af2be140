"""A trained model taken out of cfgdiff: the formats `cfgdiff export --format F` writes.

    safetensors  one model file that cfgdiff samples (checkpoint.export_model; the default)
    diffusers    a folder that Hugging Face diffusers loads (export/diffusers.py; a class model)
    onnx         the network as one ONNX graph with its sampler record (export/onnx.py)
    web          a folder: a static page that samples the model in the browser with
                 onnxruntime-web (export/web/)

Each format is one function, named in FORMATS as "module:function" and imported when asked for
(a format may need an optional extra): export(path, out, *, ema, dtype, log) -> dict, where
`path` is a checkpoint or run folder, `out` the file or folder to write (refused before any
work when it is one of the inputs, or a run's own file), `ema` the weights (EMA or raw),
`dtype` their storage type where the format has a choice, `log` hears each checkpoint passed
over. The dict returned says what was written; its "summary" is the CLI's line about it. A
format may take keyword-only options of its own, with defaults, which the CLI passes to it alone
(web: `ort`, where onnxruntime-web's files come from).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from cfgdiff.errors import ConfigError

# format -> "module:function" (imported on use)
FORMATS: dict[str, str] = {
    "safetensors": "cfgdiff.checkpoint:export_model",
    "diffusers": "cfgdiff.export.diffusers:export_diffusers",
    "onnx": "cfgdiff.export.onnx:export_onnx",
    "web": "cfgdiff.export.web:export_web",
}


def exporter(fmt: str) -> Callable[..., dict]:
    """The export function of format `fmt`; a ConfigError naming the allowed ones otherwise."""
    if fmt not in FORMATS:
        raise ConfigError(f"`format` must be one of {', '.join(FORMATS)}, got {fmt!r:.40}")
    module, name = FORMATS[fmt].split(":")
    return getattr(importlib.import_module(module), name)


def export(path: Path, out: Path, fmt: str = "safetensors", **options) -> dict:
    """Write the model at `path` as format `fmt` to `out` (FORMATS)."""
    return exporter(fmt)(Path(path), Path(out), **options)
