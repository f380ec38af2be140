"""The network f(x_t, t, c) as an ONNX graph, checked against PyTorch, and what a sampler needs
beside it.

Owns: the conversion (`onnx_model_bytes`: torch.onnx's TorchScript exporter, a dynamic batch,
then the graph run by ONNX Runtime on random inputs and compared with the network; a graph
that disagrees is refused), the record a sampler outside cfgdiff reads (`sampler_record`: the
noise schedule, the prediction type, the condition and its null, the guidance convention, the
model's own sampler), and `OnnxNetwork`, an ONNX Runtime session called like the network.
`cfgdiff export --format onnx` (export/onnx.py) writes the graph with the record in its
metadata; the sampling backend (sampling/backends.py) runs the graph in place of the network.
Knows nothing about samplers, guidance scales or files. `onnx` and `onnxruntime` are the `onnx`
extra (docs/DESIGN.md, "Sampling backends").
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cfgdiff.config import GUIDANCE_CONVENTION, RunConfig
from cfgdiff.errors import ConfigError
from cfgdiff.runtime import error_line
from cfgdiff.schedule import make_schedule, spaced_timesteps

# ONNX opset of the graph: 17 has LayerNormalization (the text models' context norm) and is
# read by every ONNX Runtime from 1.13 on, onnxruntime-web included.
OPSET = 17
RECORD_FORMAT = "cfgdiff-onnx-1"
RECORD_KEY = "cfgdiff"  # the metadata_props entry that holds sampler_record's JSON
INPUTS = ("x", "t", "c")
OUTPUT = "pred"
# Largest |ONNX Runtime - PyTorch| allowed on any output value of the verification batches
# (fp32 both; outputs are of order 1): far above the float rounding of a faithful graph and
# far below a wrong one (docs/DESIGN.md, "Sampling backends").
TOLERANCE = 1e-3
# The verification batches: one row, an odd batch, and a guided pair [c; null] of 4 rows each
# (the batch the guidance engine sends).
VERIFY_BATCHES = (1, 3, 8)
EXTRA_HINT = "pip install 'cfgdiff[onnx]'"


def require(*packages: str) -> None:
    """A ConfigError naming the extra to install unless each of `packages` imports."""
    import importlib.util

    for name in packages:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"ONNX needs the `{name}` package: {EXTRA_HINT}")


def _import_onnxruntime():
    require("onnxruntime")
    import onnxruntime

    return onnxruntime


class OnnxNetwork:
    """f(x, t, c) -> prediction through an ONNX Runtime session on the CPU, called as the
    network is (any `net` sampling.generate takes): torch tensors in, a float32 torch tensor
    out. `threads`: the session's intra-op threads (None: torch's)."""

    def __init__(self, model: bytes, threads: int | None = None):
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: it must not write to the terminal
        self.threads = options.intra_op_num_threads
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = c.detach().cpu()
        feeds = {
            "x": x.detach().cpu().float().contiguous().numpy(),
            "t": t.detach().cpu().long().contiguous().numpy(),
            "c": (c.float() if c.is_floating_point() else c.long()).contiguous().numpy(),
        }
        (out,) = self.session.run([OUTPUT], feeds)
        return torch.from_numpy(out).to(x.device)


@dataclass(frozen=True)
class Converted:
    """A verified graph: its bytes, and the largest |ONNX Runtime - PyTorch| over `rows` rows
    of random inputs (`batches` batches)."""

    model: bytes
    max_abs_diff: float
    batches: int
    rows: int

    def describe(self) -> str:
        return (
            f"ONNX opset {OPSET}, dynamic batch; verified against PyTorch on {self.batches} "
            f"random batches: max |difference| {self.max_abs_diff:.1e} (tolerance {TOLERANCE:g})"
        )


def example_inputs(cfg: RunConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random (x, t, c) the network takes, `batch` rows: x ~ N(0, 1), t uniform in [0, T), c
    labels of every class or caption embeddings; an even batch is a guided pair [c; null]."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, m.in_channels, m.image_size, m.image_size), generator=g)
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g)
    half = batch // 2 if batch % 2 == 0 else batch
    if m.condition == "class":
        c = torch.randint(0, m.num_classes + 1, (half,), generator=g)
        null = torch.full((batch - half,), m.num_classes)
    else:
        c = torch.randn((half, m.cond_dim), generator=g)
        if m.text_tokens:  # token rows laid end to end, zero rows after the last token
            tokens = c.reshape(half, m.text_tokens, m.text_dim)
            used = torch.randint(1, m.text_tokens + 1, (half, 1), generator=g)
            tokens = tokens * (torch.arange(m.text_tokens)[None] < used)[..., None]
            c = tokens.reshape(half, m.cond_dim)
        else:
            c = torch.nn.functional.normalize(c, dim=1)
        null = torch.zeros((batch - half, m.cond_dim))
    if half < batch:
        x, t = torch.cat([x[:half], x[:half]]), torch.cat([t[:half], t[:half]])
    return x, t, torch.cat([c, null])


def convert(net: torch.nn.Module, cfg: RunConfig, record: dict | None = None) -> Converted:
    """The network as an ONNX graph (opset OPSET; inputs x, t, c and output pred with a dynamic
    batch), run by ONNX Runtime on VERIFY_BATCHES and compared with `net` in fp32; `record`
    (sampler_record) goes into the graph's metadata_props as JSON under RECORD_KEY. A network
    ONNX cannot express, or a graph whose outputs differ from the network's by more than
    TOLERANCE, is a one-line ConfigError; nothing is returned then."""
    require("onnx", "onnxruntime")
    import onnx

    net = _cpu_fp32(net)
    buf = io.BytesIO()
    batch = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # the TorchScript exporter warns that it is deprecated and that Python-level checks
            # (a contiguity test) are traced as constants: both are known, neither changes
            # the graph of an eval-mode network
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, example_inputs(cfg, 2), buf, dynamo=False, opset_version=OPSET,
                input_names=list(INPUTS), output_names=[OUTPUT],
                dynamic_axes={name: batch for name in (*INPUTS, OUTPUT)},
            )  # fmt: skip
    except Exception as e:  # an unsupported operator, a model too large for one protobuf, ...
        raise ConfigError(f"the network cannot be expressed in ONNX ({error_line(e)})") from None
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "cfgdiff"
    if record is not None:
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = RECORD_KEY, json.dumps(record, sort_keys=True)
    model = proto.SerializeToString()
    _, worst, rows = load_verified(model, net, cfg)
    return Converted(model, worst, len(VERIFY_BATCHES), rows)


def load_verified(
    model: bytes, net: torch.nn.Module, cfg: RunConfig, threads: int | None = None
) -> tuple[OnnxNetwork, float, int]:
    """An ONNX Runtime session of the graph `model` (OnnxNetwork), checked against `net` as
    convert checks a new one (verify): the network, the largest |difference| and the rows
    compared. A graph ONNX Runtime cannot run, or one that disagrees, is a ConfigError."""
    try:
        graph = OnnxNetwork(model, threads)
    except Exception as e:  # an operator ONNX Runtime does not implement for these types
        why = error_line(e)
        raise ConfigError(f"ONNX Runtime cannot run the network's graph ({why})") from None
    worst, rows = verify(_cpu_fp32(net), cfg, graph)
    return graph, worst, rows


def graph_key(net: torch.nn.Module, cfg: RunConfig) -> str:
    """SHA-256 naming the graph of `net`: the record format, the opset, torch's version (its
    exporter), the network's config and every weight (name, dtype, shape, bytes)."""
    import hashlib

    h = hashlib.sha256(f"{RECORD_FORMAT}|{OPSET}|{torch.__version__}|".encode())
    h.update(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True).encode())
    for name, v in sorted(net.state_dict().items()):
        v = v.detach().to("cpu").contiguous()
        h.update(f"|{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify(net, cfg: RunConfig, graph) -> tuple[float, int]:
    """The largest |graph - net| over VERIFY_BATCHES of example_inputs, and the rows compared;
    a ConfigError above TOLERANCE (or for a non-finite output)."""
    worst, rows = 0.0, 0
    with torch.inference_mode():
        for i, b in enumerate(VERIFY_BATCHES):
            x, t, c = example_inputs(cfg, b, seed=1 + i)
            ref = net(x, t, c).float()
            try:
                out = graph(x, t, c).float()
            except Exception as e:  # a kernel that fails at run time (a shape it cannot take)
                why = error_line(e)
                raise ConfigError(f"ONNX Runtime cannot run the network's graph ({why})") from None
            if out.shape != ref.shape:
                raise ConfigError(
                    f"the ONNX graph gives shape {tuple(out.shape)} for a batch of {b}, PyTorch "
                    f"{tuple(ref.shape)}: not written"
                )
            diff = float((out - ref).abs().max()) if b else 0.0
            if not diff <= TOLERANCE:  # NaN too
                raise ConfigError(
                    f"the ONNX graph differs from PyTorch by up to {diff:.3g} on random inputs "
                    f"(tolerance {TOLERANCE:g}): not written"
                )
            worst, rows = max(worst, diff), rows + b
    return worst, rows


def onnx_model_bytes(net: torch.nn.Module, cfg: RunConfig, record: dict | None = None) -> bytes:
    """The verified ONNX graph of `net` (a UNet of `cfg`; convert says how it is checked).

    Inputs, each with a dynamic batch B (the guided batch stacks the conditional rows and the
    reference rows):
      x  float32 (B, C, H, W)  the noisy images x_t (C, H, W: cfg.model's channels and size)
      t  int64   (B,)         the timestep of each row, 0 .. T-1 (the network's own
                              sinusoidal embedding reads it; the sampler's integer t)
      c  int64   (B,)         class labels, num_classes being the null label; or, for a text
                              model, float32 (B, cond_dim) caption embeddings (a table row of
                              sampler_record's "captions"), an all-zero row being the null
    Output:
      pred  float32 (B, C, H, W): eps or v as sampler_record's "prediction" says.
    `record` (sampler_record) is stored in the graph's metadata_props under "cfgdiff"."""
    return convert(net, cfg, record).model


def _cpu_fp32(net: torch.nn.Module) -> torch.nn.Module:
    """The network on the CPU in fp32 and eval mode: itself where it is so, else a copy."""
    fp32_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())
    if fp32_cpu and not net.training:
        return net
    return copy.deepcopy(net).to("cpu", torch.float32).eval()


def _float9(v: float) -> float:
    """A float32 value as the shortest double that reads back as it (9 significant digits)."""
    return float(f"{v:.9g}")


def public_dataset(dataset: str) -> str:
    """`dataset` as an exported file records it: a folder dataset by its folder's name, since an
    exported model is made to be shared and carries no local path."""
    if dataset.startswith("folder:"):
        return "folder:" + Path(dataset[len("folder:") :]).name
    return dataset


def sampler_record(cfg: RunConfig, captions=None) -> dict[str, Any]:
    """What a sampler outside cfgdiff needs beside the graph (onnx_model_bytes), as plain JSON
    data: the graph's inputs, the image shape, the noise schedule (name, T and its alpha_bar
    table, t = 0 first), the prediction type, the condition (class names and the null label;
    a text model's embedding size, and with `captions`, a text.embedding.TextConditions, its
    caption table's prompts and their embeddings), the guidance convention and the model's own
    sampler with the timesteps it visits."""
    m, d, s = cfg.model, cfg.diffusion, cfg.sampling
    schedule = make_schedule(d.schedule, d.timesteps)
    text = m.condition == "text"
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "inputs": {"x": "float32", "t": "int64", "c": "float32" if text else "int64"},
        "output": OUTPUT,
        "shape": [m.in_channels, m.image_size, m.image_size],
        "channels": m.in_channels,
        "image_size": m.image_size,
        "schedule": d.schedule,
        "T": d.timesteps,
        "alpha_bar": [float(v) for v in schedule.alpha_bar.tolist()],
        "prediction": d.prediction,
        "condition": m.condition,
        "class_names": cfg.label_names(),
        "num_classes": m.num_classes,
        "guidance": {"convention": GUIDANCE_CONVENTION, "reference": "the null condition"},
        "sampler": {
            "sampler": s.sampler,
            "steps": s.steps,
            "spacing": s.spacing,
            "eta": s.eta,
            "timesteps": spaced_timesteps(schedule, s.steps, s.spacing),
        },  # fmt: skip
        "dataset": public_dataset(cfg.dataset),
    }
    if text:
        record |= {
            "cond_dim": m.cond_dim,
            "null_condition": [0.0] * m.cond_dim,
            "text": {
                "encoder": m.text_encoder,
                "encoder_sha256": m.text_encoder_sha256,
                "dim": m.text_dim,
                "tokens": m.text_tokens,
            },  # fmt: skip
            "captions": None,
        }
        if captions is not None:
            record["captions"] = [
                {"prompt": p, "embedding": [_float9(v) for v in row]}
                for p, row in zip(captions.captions, captions.table.float().tolist(), strict=True)
            ]
    else:
        record |= {"null_label": m.num_classes, "null_condition": m.num_classes}
    return record


def read_record(model: bytes) -> dict:
    """The sampler_record stored in an ONNX file's metadata (convert's `record`)."""
    require("onnx")
    import onnx

    proto = onnx.load_from_string(model)
    for entry in proto.metadata_props:
        if entry.key == RECORD_KEY:
            return json.loads(entry.value)
    raise ConfigError(f"no `{RECORD_KEY}` entry in the ONNX file's metadata")
