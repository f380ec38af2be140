"""`cfgdiff export --format onnx`: the network as one self-contained .onnx file.

Owns the file: what it is made from (a checkpoint, a run's, or a model file), the refusals made
before any work (the same as the model file's: checkpoint.export_model), and writing it whole or
not at all. The graph, its verification against PyTorch and the record in its metadata are
onnx_net's (docs/export.md, "ONNX").
"""

from __future__ import annotations

from pathlib import Path

from cfgdiff.checkpoint import LATEST, check_export_file, input_paths, load_for_sampling
from cfgdiff.errors import ConfigError
from cfgdiff.files import atomic_write_bytes, check_output_file, refuse_overlap
from cfgdiff.onnx_net import RECORD_KEY, convert, require, sampler_record


def is_model_file(path: Path, ema: bool) -> bool:
    """Whether `path` is a model file (not a checkpoint, run folder or `latest`); its raw
    weights (ema=False) are refused: it holds the weights it was exported with."""
    model_file = path.is_file() and path.name != LATEST
    if model_file and not ema:
        raise ConfigError(
            f"`raw`: the model file {path} holds the weights it was exported with; export the "
            "raw weights from its checkpoint"
        )
    return model_file


def load_network(path: Path, ema: bool, log=None):
    """The network a graph is made of, on the CPU (each checkpoint passed over said through
    `log`), and a text model's caption table (None for a class model, or a run without one)."""
    loaded = load_for_sampling(path, "cpu", ema=ema)
    for s in loaded.skipped:
        if log is not None:
            log(s.line())
    captions = None
    if loaded.cfg.model.condition == "text":
        from cfgdiff.text.embedding import run_caption_table

        captions = run_caption_table(loaded.path)
    return loaded, captions


def export_onnx(
    path: Path, out: Path, *, ema: bool = True, dtype: str = "fp32", log=None
) -> dict[str, str]:
    """Write the network of the checkpoint or model file at `path` (its EMA weights, or the raw
    ones with ema=False) as the ONNX graph `out` (onnx_net.onnx_model_bytes), its sampler
    record (onnx_net.sampler_record, with the run's caption table for a text model) in the
    file's metadata_props under "cfgdiff". The graph runs in fp32: `dtype` must be fp32.
    Refused before any work: an `out` that does not end in .onnx, is a folder, lies in a
    checkpoint folder, or is an input or one of its run's own files; raw weights of a model
    file (it holds those it was exported with). Returns what was written; `log` hears each
    checkpoint of the run passed over."""
    if dtype != "fp32":
        raise ConfigError(
            f"`dtype` must be fp32 for the onnx format (ONNX Runtime runs the graph in fp32), "
            f"got {dtype!r:.20}"
        )
    path, out = Path(path), check_export_file(out, ".onnx")
    model_file = is_model_file(path, ema)
    check_output_file(out)
    refuse_overlap(out, input_paths(path))  # before any work
    require("onnx", "onnxruntime")
    loaded, captions = load_network(path, ema, log)
    cfg = loaded.cfg
    record = sampler_record(cfg, captions)
    ckpt = loaded.path
    source = ckpt.name if model_file else f"{ckpt.parent.parent.name}/{ckpt.name}"
    record |= {"weights": "ema" if ema else "model", "source": source}  # no local path
    converted = convert(loaded.net, cfg, record)
    atomic_write_bytes(out, converted.model)  # WriteFault naming `out` on a full disk
    table = ""
    if captions is not None:
        table = f", {len(captions.captions)} caption embeddings"
    elif cfg.model.condition == "text":
        table = ", no caption table (the run has none: prompts need the text encoder)"
    return {
        "format": "onnx",
        "source": source,
        "weights": record["weights"],
        "max_abs_diff": f"{converted.max_abs_diff:.3g}",
        "summary": (
            f"{len(converted.model) / 2**20:.1f} MiB, {converted.describe()}; the sampler "
            f"record ({cfg.diffusion.schedule} schedule, T = {cfg.diffusion.timesteps}, "
            f"{cfg.diffusion.prediction}-prediction{table}) in its metadata under "
            f"{RECORD_KEY!r}"
        ),
    }
