"""What cfgdiff reads back from disk, parsed into typed records with ranges before anything is
built from it: a checkpoint's MANIFEST, config and training state, a model file's metadata, the
`latest` pointer and the rows of a run's CSV files.

Owns the one validation layer between bytes on disk and the code that uses them. JSON comes
through files.read_json / files.parse_json (bounded size and nesting); every field is checked
for its type and range here, before a tensor is allocated from it or (for the training state,
the one pickle: torch.load(weights_only=True)) before anything in it is used. A violation is
one CheckpointError line naming the file and the field (exit status 2). Nothing here writes.
docs/reliability.md lists what each parser refuses.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfgdiff.config import MAX_STEPS, RunConfig
from cfgdiff.errors import CfgDiffError, CheckpointError
from cfgdiff.files import parse_json, read_json

PREFIX = "step-"
MANIFEST = "MANIFEST.json"
# The files of a checkpoint, every one listed in its MANIFEST and no other.
CHECKPOINT_FILES = ("config.json", "ema.safetensors", "model.safetensors", "state.pt")
LATEST_MAX_BYTES = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_STEP_NAME = re.compile(r"step-(\d{7,8})")
# What a model file's metadata may hold, and the weights and storage types it may name.
MODEL_FILE_KEYS = {"format", "config", "weights", "dtype", "source", "sha256", "data"}
TRAINED_DEVICES = ("cpu", "cuda")
TRAINED_PRECISIONS = ("fp32", "bf16")


def _unquote(message: str) -> str:
    """A validation message without the backticks that mark API parameters: a field of a file
    is not a flag, so the CLI must not rewrite it into one."""
    return re.sub(r"`([^`]*)`", r"\1", message)


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name ("step-0000250" -> 250), None for any other name
    (a `latest` that says "../.." or "step-1/../x" names no checkpoint)."""
    m = _STEP_NAME.fullmatch(name)
    if m is None or name != f"{PREFIX}{int(m[1]):07d}":
        return None
    return int(m[1])


def is_regular_file(path: Path) -> bool:
    """A regular file, not a symbolic link, FIFO or device (reading one of those could block or
    never end)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_latest(ckpt_root: Path) -> str | None:
    """The checkpoint name the `latest` pointer holds, or None when it is absent, not a small
    regular file or not a checkpoint name (parse_latest says why)."""
    return parse_latest(ckpt_root)[0]


def parse_latest(ckpt_root: Path) -> tuple[str | None, str | None]:
    """(the checkpoint name `latest` holds, None), or (None, why it names none: a phrase such
    as "is a symbolic link"); (None, None) when there is no `latest`. Never follows a link or
    opens anything but a regular file (a FIFO would block the read)."""
    path = ckpt_root / "latest"
    if not os.path.lexists(path):
        return None, None
    if os.path.islink(path):
        return None, "is a symbolic link, not a file holding a checkpoint's name"
    if not is_regular_file(path):
        return None, "is not a regular file"
    try:
        with open(path, "rb") as f:
            raw = f.read(LATEST_MAX_BYTES + 1)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if len(raw) > LATEST_MAX_BYTES:
        return None, f"is longer than {LATEST_MAX_BYTES} bytes"
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, "is not ASCII text"
    if checkpoint_step(name) is None:
        return None, f"names {name!r}, not a checkpoint folder of this run"
    return name, None


def read_json_file(path: Path) -> Any:
    """A JSON file of a checkpoint or run (files.read_json's bounds), or a CheckpointError
    naming it."""
    if not is_regular_file(path):
        what = "missing" if not os.path.lexists(path) else "not a regular file"
        raise CheckpointError(f"{path}: {what}")
    try:
        return read_json(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------- checkpoint files


def parse_manifest(obj: Any, path: Path) -> dict[str, str]:
    """MANIFEST.json: {file name: SHA-256 hex} for exactly the files of a checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must be a JSON object of file: SHA-256")
    names = sorted(obj)
    if names != sorted(CHECKPOINT_FILES):
        missing = sorted(set(CHECKPOINT_FILES) - set(obj))
        extra = sorted(set(obj) - set(CHECKPOINT_FILES))
        detail = "; ".join(
            part
            for part in (
                f"does not list {', '.join(missing)}" if missing else "",
                f"lists {', '.join(repr(n)[:60] for n in extra[:3])}, not checkpoint files"
                if extra
                else "",
            )
            if part
        )
        raise CheckpointError(f"{path}: {detail} (a checkpoint has {', '.join(CHECKPOINT_FILES)})")
    for name, digest in obj.items():
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise CheckpointError(f"{path}: {name} must map to a SHA-256 (64 hex digits)")
    return dict(obj)


def parse_config(obj: Any, path: Path) -> RunConfig:
    """config.json (or a model file's embedded config): a RunConfig, every field's type and
    range checked (config.RunConfig.from_dict and validate)."""
    try:
        cfg = RunConfig.from_dict(obj)
        cfg.validate()
    except CfgDiffError as e:
        raise CheckpointError(f"{path}: {_unquote(str(e))}") from None
    return cfg


def parse_data_identity(obj: Any, where: str) -> dict | None:
    """{"n", "sha256"} of the images a run trained on, or None (not recorded)."""
    if obj is None:
        return None
    if (
        not isinstance(obj, dict)
        or set(obj) != {"n", "sha256"}
        or not _is_int(obj["n"], 0, 10**12)
        or not isinstance(obj["sha256"], str)
        or not _HEX64.fullmatch(obj["sha256"])
    ):
        raise CheckpointError(f"{where}: data_identity must be {{n: count, sha256: hex}}")
    return {"n": int(obj["n"]), "sha256": obj["sha256"]}


@dataclass(frozen=True)
class TrainingRecord:
    """state.pt, typed. The optimizer's own state is checked by torch (load_state_dict) and
    against the network by the caller; everything else is checked here."""

    step: int
    ema_updates: int
    optimizer: dict
    generator: Any  # uint8 tensor: the training generator's state
    torch_rng: Any  # uint8 tensor: the global RNG's state
    cuda_rng: Any  # uint8 tensor or None
    epoch: int  # data position: epoch of the permutation
    offset: int  # data position: index into it, in [0, n) for n training images
    data_identity: dict | None
    loss_acc: float
    loss_acc_n: int
    precision: tuple[str, str] | None  # (device type, precision) it trained in


def parse_state(obj: Any, path: Path, step: int | None = None) -> TrainingRecord:
    """A loaded state.pt (a dict from torch.load(weights_only=True)) as a TrainingRecord;
    `step`: the step its checkpoint folder is named for, which the state must record."""
    import torch

    def bad(field: str, allowed: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} must be {allowed}")

    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must hold a dict of training state")
    required = ("step", "optimizer", "ema_updates", "generator", "torch_rng", "data")
    required += ("loss_acc", "loss_acc_n")
    for key in required:
        if key not in obj:
            raise CheckpointError(f"{path}: has no {key!r}")
    if not _is_int(obj["step"], 0, MAX_STEPS):
        raise bad("step", f"an integer in [0, {MAX_STEPS}]")
    if step is not None and obj["step"] != step:
        raise bad("step", f"{step}, the step its folder is named for (got {obj['step']})")
    if not _is_int(obj["ema_updates"], 0, MAX_STEPS):
        raise bad("ema_updates", f"an integer in [0, {MAX_STEPS}]")
    opt = obj["optimizer"]
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
        or not all(isinstance(g, dict) for g in opt["param_groups"])
    ):
        raise bad("optimizer", "an optimizer state dict (state, param_groups)")

    def rng(key: str, value: Any) -> Any:
        if not (
            isinstance(value, torch.Tensor)
            and value.dtype == torch.uint8
            and value.ndim == 1
            and 0 < value.numel() <= 1 << 20
        ):
            raise bad(key, "an RNG state (a 1-D uint8 tensor)")
        return value

    cuda_rng = obj.get("cuda_rng")
    data = obj["data"]
    if not isinstance(data, dict) or set(data) != {"epoch", "offset"}:
        raise bad("data", "{epoch, offset}")
    if not _is_int(data["epoch"], 0, 1 << 40):
        raise bad("data.epoch", "an integer >= 0")
    if not _is_int(data["offset"], 0, 1 << 40):
        raise bad("data.offset", "an integer >= 0")
    if not (isinstance(obj["loss_acc"], float | int) and math.isfinite(obj["loss_acc"])):
        raise bad("loss_acc", "a finite number")
    if isinstance(obj["loss_acc"], bool) or not _is_int(obj["loss_acc_n"], 0, MAX_STEPS):
        raise bad("loss_acc and loss_acc_n", "a number and an integer >= 0")
    prec = obj.get("precision")
    if prec is not None and not (
        isinstance(prec, dict)
        and set(prec) == {"device", "precision"}
        and prec["device"] in TRAINED_DEVICES
        and prec["precision"] in TRAINED_PRECISIONS
    ):
        raise bad(
            "precision",
            f"{{device: {'|'.join(TRAINED_DEVICES)}, precision: {'|'.join(TRAINED_PRECISIONS)}}}",
        )
    return TrainingRecord(
        step=obj["step"],
        ema_updates=obj["ema_updates"],
        optimizer=opt,
        generator=rng("generator", obj["generator"]),
        torch_rng=rng("torch_rng", obj["torch_rng"]),
        cuda_rng=None if cuda_rng is None else rng("cuda_rng", cuda_rng),
        epoch=data["epoch"],
        offset=data["offset"],
        data_identity=parse_data_identity(obj.get("data_identity"), str(path)),
        loss_acc=float(obj["loss_acc"]),
        loss_acc_n=obj["loss_acc_n"],
        precision=(prec["device"], prec["precision"]) if prec is not None else None,
    )


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


# ----------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFileMeta:
    """A model file's metadata header (checkpoint.export_model writes it), typed."""

    config: RunConfig
    config_json: str  # as stored: its SHA-256 covers these exact characters
    weights: str  # "ema" | "model"
    dtype: str  # a checkpoint.EXPORT_DTYPES name
    source: str  # RUN/step-N it was exported from
    sha256: str
    data: dict | None  # data_identity, as parse_data_identity
    data_json: str | None


def parse_model_meta(
    meta: dict[str, str], path: Path, file_format: str, dtypes: tuple[str, ...]
) -> ModelFileMeta:
    """The metadata of model file `path`: its `file_format`, a config that parses, the weights
    and storage type (`dtypes`) it names, its SHA-256, and the training data's identity."""
    if meta.get("format") != file_format:
        raise CheckpointError(
            f"{path}: not a cfgdiff model file (no format {file_format!r} in its metadata; "
            "make one with cfgdiff export)"
        )
    unknown = sorted(set(meta) - MODEL_FILE_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown metadata {', '.join(map(repr, unknown[:5]))}")
    for key in ("config", "sha256"):
        if key not in meta:
            raise CheckpointError(f"{path}: its metadata has no {key!r}")
    if not _HEX64.fullmatch(meta["sha256"]):
        raise CheckpointError(f"{path}: metadata sha256 must be 64 hex digits")
    weights, dtype = meta.get("weights", "ema"), meta.get("dtype", "fp32")
    if weights not in ("ema", "model") or dtype not in dtypes:
        raise CheckpointError(
            f"{path}: metadata weights must be ema or model and dtype one of "
            f"{', '.join(dtypes)}, got {weights[:20]!r}, {dtype[:20]!r}"
        )

    def json_field(key: str) -> Any:
        try:
            return parse_json(meta[key])
        except ValueError as e:
            raise CheckpointError(f"{path}: metadata {key} is not valid JSON ({e})") from None

    config = parse_config(json_field("config"), Path(f"{path} (its config)"))
    data = parse_data_identity(json_field("data"), f"{path} metadata") if "data" in meta else None
    return ModelFileMeta(
        config, meta["config"], weights, dtype, meta.get("source", "")[:200], meta["sha256"],
        data, meta.get("data"),
    )  # fmt: skip


# ----------------------------------------------------------------- run files


def read_step_rows(
    path: Path,
    upto_step: int,
    note: Callable[[str], None] | None = None,
    fields: list[str] | None = None,
) -> list[dict[str, str]]:
    """The rows of a run's per-step CSV (loss.csv, eval.csv) up to and including `upto_step`,
    as text (the loss keeps every digit); `fields`: the columns to keep, which the header must
    name. Rows are appended as a run goes, so a crash or a full disk can cut the last one
    short: a row that does not parse (cut short, a cell that is not a number) is dropped and
    `note` is told which, so that nothing a crash leaves behind blocks a resume."""
    import csv
    import io

    if not os.path.lexists(path):
        return []
    if not is_regular_file(path):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    reader = csv.reader(io.StringIO(lines[0]))
    header = next(reader, [])
    if "step" not in header or (fields is not None and not set(fields) <= set(header)):
        raise CheckpointError(f"{path}: its header must name {', '.join(fields or ['step'])}")
    rows, dropped = [], []
    for number, line in enumerate(lines[1:], start=2):
        cells = next(csv.reader(io.StringIO(line)), [])
        row = dict(zip(header, cells, strict=False))
        try:
            if not line.endswith(("\n", "\r")) or len(cells) != len(header):
                raise ValueError("cut short")
            step = int(row["step"])
            for key in header:
                float(row[key])
        except ValueError:
            dropped.append(number)
            continue
        if step <= upto_step:
            rows.append(row if fields is None else {k: row[k] for k in fields})
    if dropped and note is not None:
        where = f"line {dropped[0]}" if len(dropped) == 1 else f"lines {dropped[:5]}"
        last = dropped == [len(lines)]
        why = "cut short, as a crash or a full disk leaves it" if last else "unreadable"
        note(f"{path}: {where} {why}; dropped")
    return rows
