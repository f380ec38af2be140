"""Checkpoints as plain data, written atomically.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding
  model.safetensors  raw weights            ema.safetensors  EMA weights (used for sampling)
  config.json        RunConfig + format version + guidance convention and null label
  state.pt           optimizer, step, RNG states, data position (torch.load(weights_only=True))
  MANIFEST.json      SHA-256 of the four files above, checked before anything is loaded
It is built under a temporary name, every file fsynced, then renamed into place; the `latest`
pointer file is replaced atomically afterwards and old checkpoints are pruned last. Loading never
unpickles code: tensors come from safetensors, the rest from JSON and weights_only torch.load.

A model file (`cfgdiff export`) is the one file to ship for sampling: a .safetensors holding the
EMA weights (or the raw ones; fp32, fp16 or bf16), with the config JSON, the source RUN/step-N
and a SHA-256 of config and tensors in its metadata header. Any safetensors reader opens it;
load_for_sampling takes it wherever it takes a checkpoint and loads it as fp32.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

from cfgdiff.config import RunConfig
from cfgdiff.errors import CfgDiffError, CheckpointError, ConfigError, RuntimeFault
from cfgdiff.files import atomic_write_bytes, file_digest, fsync_dir, fsync_file
from cfgdiff.unet import UNet

PREFIX = "step-"
MANIFEST = "MANIFEST.json"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    cfg: RunConfig,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under ckpt_root atomically, point `latest` at it, prune to `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    try:
        _write(tmp, final, ckpt_root, name, cfg, model, ema, state)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RuntimeFault(
                f"disk full while writing checkpoint {name} in {ckpt_root}: free space or lower "
                "`keep` (the previous checkpoint is intact)"
            ) from None
        raise CheckpointError(
            f"cannot write checkpoint {name} in {ckpt_root}: {e.strerror or e}"
        ) from None
    atomic_write_bytes(ckpt_root / "latest", (name + "\n").encode())
    for old in list_checkpoints(ckpt_root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, final: Path, ckpt_root: Path, name: str, cfg, model, ema, state) -> None:
    """Build the checkpoint in `tmp`, fsync it, rename it to `final`; no trace left on failure."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in model.items()}
        save_file(cpu, str(tmp / "model.safetensors"))
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in ema.items()},
            str(tmp / "ema.safetensors"),
        )
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        torch.save(state, tmp / "state.pt")
        manifest = {f.name: file_digest(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (after a resume): replace it
            old = ckpt_root / f".old-{name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale(ckpt_root: Path) -> list[str]:
    """Remove half-written (.tmp-*) and half-replaced (.old-*) folders a killed process left.
    Only call this while holding the run lock."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    for p in ckpt_root.glob(".latest.*.tmp") if ckpt_root.is_dir() else []:
        p.unlink(missing_ok=True)
    return removed


def verify(ckpt: Path) -> None:
    """Check every file against MANIFEST.json (SHA-256): catches truncation and flipped bits."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except OSError:
        raise CheckpointError(
            f"{ckpt}: no {MANIFEST} (incomplete or not a cfgdiff checkpoint)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{ckpt / MANIFEST}: not valid JSON ({e})") from None
    for name, digest in manifest.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        if file_digest(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 does not match {MANIFEST} (corrupted file)")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    try:
        name = (ckpt_root / "latest").read_text().strip()
        cand = ckpt_root / name
        if name.startswith(PREFIX) and (cand / "config.json").is_file():
            return cand
    except OSError:
        pass
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def resolve(path: Path, arg: str = "`checkpoint`") -> Path:
    """Accept a checkpoint folder, a run folder or a checkpoints folder. arg: the parameter that
    named the path, for messages."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointError(f"{arg} {path}: no such file or directory")
    raise CheckpointError(
        f"{arg} {path}: no checkpoint found (expected a folder with config.json, "
        "or a run folder with checkpoints/)"
    )


def read_config(ckpt: Path) -> RunConfig:
    try:
        d = json.loads((ckpt / "config.json").read_text())
    except OSError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{ckpt / 'config.json'}: expected a JSON object")
    try:
        cfg = RunConfig.from_dict(d)
        cfg.validate()
    except CfgDiffError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: {e}") from None
    return cfg


def load_weights(ckpt: Path, name: str, net: torch.nn.Module) -> None:
    """Load `name`.safetensors into net strictly; CheckpointError on any mismatch."""
    path = ckpt / f"{name}.safetensors"
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not match the config ({first[-1].strip()})"
        ) from None


def load_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, missing file: all one message
        raise CheckpointError(f"{path}: cannot load training state ({type(e).__name__})") from None


def training_record(ckpt: Path) -> dict[str, Any]:
    """What the checkpoint's training state records of its run, read once: "data_identity",
    {"n", "sha256"} of the images it trained on, and "precision", the (device type, precision)
    it trained in; each None for checkpoints written before it was recorded, or without a
    training state."""
    if not (ckpt / "state.pt").is_file():
        return {"data_identity": None, "precision": None}
    state = load_state(ckpt)
    data, prec = state.get("data_identity"), state.get("precision")
    return {
        "data_identity": {"n": int(data["n"]), "sha256": str(data["sha256"])} if data else None,
        "precision": (str(prec["device"]), str(prec["precision"])) if prec else None,
    }


def recorded_data_identity(ckpt: Path) -> dict | None:
    """training_record's "data_identity"."""
    return training_record(ckpt)["data_identity"]


def recorded_precision(ckpt: Path) -> tuple[str, str] | None:
    """training_record's "precision"."""
    return training_record(ckpt)["precision"]


@dataclass
class Loaded:
    path: Path
    cfg: RunConfig
    net: UNet  # EMA weights unless asked otherwise, in eval mode
    data: dict | None = None  # a model file's training-data identity (recorded_data_identity)


MODEL_FILE_FORMAT = "cfgdiff-model-1"


def _model_file_sha256(
    config_json: str, tensors: dict[str, torch.Tensor], data_json: str | None = None
) -> str:
    """SHA-256 over the config JSON, the training-data identity when the file records one
    (files exported before it was recorded have none, and keep their hash), and every tensor's
    name, dtype, shape and bytes."""
    h = hashlib.sha256(config_json.encode())
    if data_json is not None:
        h.update(b"|data|" + data_json.encode())
    for name in sorted(tensors):
        v = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_model(path: Path, out: Path, *, ema: bool = True, dtype: str = "fp32") -> dict[str, str]:
    """Write the checkpoint at `path` (folder, run folder) as one model file `out` (atomically):
    its EMA weights (or the raw ones, ema=False), stored as `dtype` (fp16 or bf16 halve the file;
    loading casts them back to fp32), and the metadata load_for_sampling needs. Returns the
    metadata."""
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"`dtype` must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    ckpt = resolve(path)
    verify(ckpt)
    cfg = read_config(ckpt)
    which = "ema" if ema else "model"
    load_weights(ckpt, which, UNet(cfg.model))  # refuses weights that do not fit the config
    tensors = {
        k: v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v
        for k, v in load_file(str(ckpt / f"{which}.safetensors")).items()
    }
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    data = recorded_data_identity(ckpt)
    data_json = json.dumps(data, sort_keys=True) if data is not None else None
    metadata = {
        "format": MODEL_FILE_FORMAT,
        "config": config_json,
        "weights": which,
        "dtype": dtype,
        "source": f"{ckpt.parent.parent.name}/{ckpt.name}",  # RUN/step-N, no local path
        "sha256": _model_file_sha256(config_json, tensors, data_json),
    }
    if data_json is not None:
        metadata["data"] = data_json
    out = Path(out)
    try:
        atomic_write_bytes(out, save(tensors, metadata))
    except OSError as e:
        raise CheckpointError(f"`out` {out}: cannot write ({e.strerror or e})") from None
    return metadata


def _load_model_file(path: Path) -> tuple[RunConfig, UNet, dict | None]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    if meta.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(
            f"{path}: not a cfgdiff model file (no format {MODEL_FILE_FORMAT!r} in its metadata; "
            "make one with cfgdiff export)"
        )
    config_json = meta.get("config", "")
    if _model_file_sha256(config_json, tensors, meta.get("data")) != meta.get("sha256"):
        raise CheckpointError(f"{path}: SHA-256 of config and weights does not match (corrupted)")
    try:
        cfg = RunConfig.from_dict(json.loads(config_json))
        cfg.validate()
        data = json.loads(meta["data"]) if "data" in meta else None
    except (CfgDiffError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    net = UNet(cfg.model)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not match the config ({first[-1]})") from None
    return cfg, net, data


def load_for_sampling(
    path: Path, device: torch.device | str = "cpu", ema: bool = True, arg: str = "`checkpoint`"
) -> Loaded:
    """A checkpoint (folder, run folder) or a model file, verified, on `device` in eval mode.
    ema picks the weights of a checkpoint; a model file holds the ones it was exported with.
    arg: the parameter that named the path, for messages."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        cfg, net, data = _load_model_file(path)
        return Loaded(path, cfg, net.to(device).eval(), data)
    ckpt = resolve(path, arg)
    verify(ckpt)
    cfg = read_config(ckpt)
    net = UNet(cfg.model)
    load_weights(ckpt, "ema" if ema else "model", net)
    return Loaded(ckpt, cfg, net.to(device).eval())


def load_guide(path: Path, loaded: Loaded, device: torch.device | str = "cpu") -> Loaded:
    """Autoguidance's weaker network (a checkpoint or model file), checked to be of the same
    kind as `loaded`: the same images and classes, the same diffusion process."""
    guide = load_for_sampling(path, device, arg="`guide_checkpoint`")
    m, g = loaded.cfg, guide.cfg
    for section, names in (
        ("model", ("in_channels", "image_size", "num_classes")),
        ("diffusion", ("prediction", "schedule", "timesteps")),
    ):
        for name in names:
            mine, theirs = getattr(getattr(m, section), name), getattr(getattr(g, section), name)
            if mine != theirs:
                raise ConfigError(
                    f"`guide_checkpoint` {path}: {section}.{name}={theirs}, the checkpoint has "
                    f"{mine}"
                )
    return guide
