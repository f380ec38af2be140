"""Checkpoints as plain data, written atomically, and which checkpoint of a run a command uses.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding
  model.safetensors  raw weights            ema.safetensors  EMA weights (used for sampling)
  config.json        RunConfig + format version + guidance convention and null label
  state.pt           optimizer, step, RNG states, data position (torch.load(weights_only=True))
  MANIFEST.json      SHA-256 of the four files above
It is built under a temporary name, every file fsynced, then renamed into place; the `latest`
pointer file is replaced atomically afterwards and old checkpoints are pruned last. Only a folder
named step-N holding all five files is a checkpoint (list_checkpoints), and only such a name is
taken from `latest`. cfgdiff never removes or replaces what it did not write: a run that would
save over a step-N entry holding anything else (a user's notes, a link) is refused before it
trains (clear_to_save), and pruning such a folder removes only cfgdiff's files from it.

What each load reads (none unpickles code: tensors come from safetensors, the rest from JSON
and weights_only torch.load), every file checked before it is used, in this order:
  every load   MANIFEST.json first (exactly the four files, each a regular file, each SHA-256
               matching, state.pt's included), then config.json parsed into a typed record
               (records.py) and the network's size bounded, then the weights it uses (their
               names and shapes those of the config's network, every value finite)
  sampling     (load_for_sampling: sample, eval, sweep, serve, info) the EMA weights, or the raw
               ones; state.pt is hashed by the MANIFEST check but never opened, so whatever it
               holds runs nothing there
  info, export also state.pt, parsed (records.parse_state) for the data and precision it records
  resume       both weights and state.pt parsed (check_resumable), then restored from them
               (train.state.TrainState.load)

Which checkpoint a run folder means (choose): the one `latest` names, else the newest complete
one; one that fails the command's checks (a hash, a config, NaN weights) is passed over for the
one before it. Whatever is passed over on the way (a `latest` naming no checkpoint of this run,
an incomplete or broken folder) is a `Skipped` record the command returns, which the CLI says in
one line each. A checkpoint folder named explicitly is used or refused, never swapped for another.
A write that fails is one line naming the file: a WriteFault (exit status 1) when the disk is
full or not writable.

A model file (`cfgdiff export`) is the one file to ship for sampling: a .safetensors holding the
EMA weights (or the raw ones; fp32, fp16 or bf16), with the config JSON, the source RUN/step-N
and a SHA-256 of config and tensors in its metadata header. Any safetensors reader opens it;
load_for_sampling takes it wherever it takes a checkpoint and loads it as fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from cfgdiff import records
from cfgdiff.config import RunConfig
from cfgdiff.errors import CheckpointError, ConfigError, RuntimeFault, WriteFault
from cfgdiff.files import (
    atomic_write_bytes,
    check_output_file,
    file_digest,
    fsync_dir,
    fsync_file,
    refuse_overlap,
    writing,
)
from cfgdiff.records import CHECKPOINT_FILES, MANIFEST, PREFIX, is_regular_file
from cfgdiff.run_layout import CHECKPOINTS, run_inputs
from cfgdiff.runtime import is_out_of_memory
from cfgdiff.unet import UNet, count_parameters

# The largest network a config may describe (about 8 GB of fp32 weights; the largest preset has
# 38 M parameters): counted on the meta device before anything is allocated.
MAX_PARAMETERS = 2_000_000_000
LATEST = "latest"
# What a killed save leaves under checkpoints/ (_write's temporary and replaced folders).
_STALE = re.compile(r"\.(tmp|old)-step-\d{7,8}-\d+")


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    cfg: RunConfig,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` under ckpt_root atomically, point `latest` at it, prune to `keep`.
    A step-N entry already there is replaced only when it is cfgdiff's (a checkpoint this run
    saves again after a resume, or an incomplete one); anything else there is refused."""
    name = f"{PREFIX}{step:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if os.path.lexists(final):
        problem = _not_cfgdiffs(final)
        if problem is not None:  # clear_to_save refuses it before training; this is a race
            raise CheckpointError(
                f"cannot write checkpoint {name}: {final} {problem}; move it elsewhere, then "
                f"resume ({_previous(ckpt_root, final)})"
            )
    try:
        with writing(ckpt_root):
            ckpt_root.mkdir(parents=True, exist_ok=True)
        _write(tmp, final, ckpt_root, name, cfg, model, ema, state)
        try:
            atomic_write_bytes(ckpt_root / LATEST, (name + "\n").encode())
        except WriteFault:
            # the checkpoint is whole; a `latest` that still names the previous one would make a
            # resume go back to it, while without one the newest checkpoint is taken
            with contextlib.suppress(OSError):
                (ckpt_root / LATEST).unlink()
            raise
    except WriteFault as e:
        intact = _previous(ckpt_root, final)
        if e.cause == "space":
            raise RuntimeFault(
                f"disk full while writing checkpoint {name} in {ckpt_root} ({Path(e.path).name}: "
                f"{e.reason}): free space or lower `keep` ({intact})"
            ) from None
        raise WriteFault(
            f"cannot write checkpoint {name}: {e} ({intact})", e.path, e.cause
        ) from None
    except ConfigError as e:
        raise CheckpointError(f"cannot write checkpoint {name} in {ckpt_root}: {e}") from None
    for old in list_checkpoints(ckpt_root)[:-keep]:
        if old != final:
            _remove(old)
    return final


def _previous(ckpt_root: Path, final: Path) -> str:
    """What a failed save leaves to resume from, in words: the newest checkpoint other than
    `final`, or that there is none."""
    earlier = [p for p in list_checkpoints(ckpt_root) if p != final]
    if not earlier:
        return "this run has no earlier checkpoint"
    return f"the previous checkpoint {earlier[-1].name} is intact"


def _remove(ckpt: Path) -> None:
    """Delete a pruned checkpoint; from a folder that also holds what cfgdiff did not write,
    only cfgdiff's files (MANIFEST.json first, so it is no checkpoint from then on), leaving the
    folder and the rest where they are."""
    if _not_cfgdiffs(ckpt) is None:
        shutil.rmtree(ckpt, ignore_errors=True)
        return
    for f in (MANIFEST, *CHECKPOINT_FILES):
        if is_regular_file(ckpt / f):
            with contextlib.suppress(OSError):
                (ckpt / f).unlink()


def _not_cfgdiffs(path: Path) -> str | None:
    """None when the step-N entry `path` holds only what cfgdiff writes there (a checkpoint's
    files, as regular files; some may be missing), so cfgdiff may replace or remove it; else
    what is not cfgdiff's, as a phrase ("holds notes.txt, which cfgdiff did not write")."""
    if path.is_symlink():
        return "is a symbolic link, which cfgdiff did not make"
    if not path.is_dir():
        return "is not a folder (cfgdiff did not write it)"
    own = {*CHECKPOINT_FILES, MANIFEST}
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    other = [n for n in names if n not in own or not is_regular_file(path / n)]
    if not other:
        return None
    shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
    return f"holds {shown}, which cfgdiff did not write"


def _write(tmp: Path, final: Path, ckpt_root: Path, name: str, cfg, model, ema, state) -> None:
    """Build the checkpoint in `tmp`, fsync it, rename it to `final`; no trace left on failure.
    Every file's bytes are made in memory and written by one write through files.writing, so a
    full disk is told by its errno whatever the serializer (safetensors and torch.save report
    it in exception types of their own)."""

    def put(file: str, data) -> None:
        with writing(tmp / file), open(tmp / file, "wb") as f:
            f.write(data)

    with writing(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    try:
        put(
            "model.safetensors",
            save({k: v.detach().to("cpu").contiguous() for k, v in model.items()}),
        )
        put("ema.safetensors", save({k: v.detach().to("cpu").contiguous() for k, v in ema.items()}))
        put("config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        buf = io.BytesIO()
        torch.save(state, buf)
        put("state.pt", buf.getbuffer())
        del buf
        manifest = {f: file_digest(tmp / f) for f in CHECKPOINT_FILES}
        put(MANIFEST, json.dumps(manifest, indent=1).encode())
        with writing(final):
            for f in tmp.iterdir():
                fsync_file(f)
            fsync_dir(tmp)
            if final.exists():  # cfgdiff's own (save_checkpoint checked): replace it
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
    """Remove half-written (.tmp-step-N-PID) and half-replaced (.old-step-N-PID) folders a
    killed process left, and `latest`'s temporary files; nothing else. Only call this while
    holding the run lock."""
    removed = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if _STALE.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    for p in ckpt_root.glob(f".{LATEST}.*.tmp") if ckpt_root.is_dir() else []:
        p.unlink(missing_ok=True)
    return removed


def verify(ckpt: Path) -> None:
    """Check the checkpoint against its MANIFEST.json before anything else is read: the
    MANIFEST lists exactly the checkpoint's files, the folder holds those and no others, each a
    regular file whose SHA-256 matches (catches truncation, flipped bits, a file added, removed
    or swapped for a link, FIFO or device)."""
    if not os.path.lexists(ckpt / MANIFEST):
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete or not a cfgdiff checkpoint)")
    manifest = records.parse_manifest(records.read_json_file(ckpt / MANIFEST), ckpt / MANIFEST)
    try:
        present = set(os.listdir(ckpt)) - {MANIFEST}
    except OSError as e:
        raise CheckpointError(f"{ckpt}: cannot read ({e.strerror or e})") from None
    for name in sorted(present - set(manifest)):
        raise CheckpointError(f"{ckpt / name}: not listed in {MANIFEST} (not a checkpoint file)")
    for name, digest in manifest.items():
        path = ckpt / name
        if not os.path.lexists(path):
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        if not is_regular_file(path):
            raise CheckpointError(f"{path}: not a regular file")
        if file_digest(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 does not match {MANIFEST} (corrupted file)")


def is_complete(path: Path) -> bool:
    """A checkpoint folder renamed into place: named step-N, a real folder (not a link), its
    five files present as regular files. Whether they are intact is verify's question."""
    return (
        records.checkpoint_step(path.name) is not None
        and path.is_dir()
        and not path.is_symlink()
        and all(is_regular_file(path / f) for f in (*CHECKPOINT_FILES, MANIFEST))
    )


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Anything else under `ckpt_root` (a folder a killed
    process left, one made by hand) is not a checkpoint: never resumed from, never counted
    towards or pruned by `keep`."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if is_complete(p))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names if that is a complete checkpoint of this folder, else the
    newest complete one (`latest` holds a name, never a path: "../.." names nothing). What
    choose passes over on the way is not said here: commands call choose."""
    return choose(ckpt_root).checkpoint


@dataclass(frozen=True)
class Skipped:
    """A checkpoint folder passed over, or a `latest` pointer ignored, by a command choosing a
    run's checkpoint (choose): `reason` says why ("state.pt is missing"), `instead` is the
    checkpoint used (None: none was). Commands return these; the CLI says each in one line."""

    path: Path
    reason: str
    instead: Path | None = None

    def line(self, using: str = "using") -> str:
        """One line: skipped checkpoint RUN/checkpoints/step-0000040: state.pt is missing;
        using step-0000030 (`using`: the command's words for it, "resuming from")."""
        what = "ignored" if self.path.name == LATEST else "skipped checkpoint"
        then = f"{using} {self.instead.name}" if self.instead is not None else "none used"
        return f"{what} {self.path}: {self.reason}; {then}"

    def record(self) -> dict[str, str]:
        """As output files record it (a sampling job's record)."""
        return {"path": str(self.path), "reason": self.reason}


@dataclass(frozen=True)
class Choice:
    """The checkpoint a command uses (None: none could be), what its check returned for it
    (`value`), and what was passed over on the way, newest first."""

    checkpoint: Path | None
    value: Any = None
    skipped: tuple[Skipped, ...] = ()

    def require(self, where: str, root: Path) -> Path:
        """The checkpoint, or a CheckpointError saying there is none in `root` (`where`: the
        parameter that asked, "`resume=True`") and why each entry was passed over."""
        if self.checkpoint is not None:
            return self.checkpoint
        if not self.skipped:
            raise CheckpointError(f"{where}: no checkpoint in {root}")
        why = "; ".join(f"{s.path.name}: {s.reason}" for s in self.skipped)
        raise CheckpointError(f"{where}: no checkpoint in {root} can be used ({why})")


def incomplete(path: Path) -> str | None:
    """Why a step-N entry is not a complete checkpoint ("state.pt is missing"), None when it
    is one (is_complete)."""
    if path.is_symlink():
        return "it is a symbolic link, not a checkpoint folder"
    if not path.is_dir():
        return "it is not a folder"
    names = (*CHECKPOINT_FILES, MANIFEST)
    missing = [f for f in names if not os.path.lexists(path / f)]
    if len(missing) == len(names):
        return "it holds none of a checkpoint's files"
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    odd = [f for f in names if not is_regular_file(path / f)]
    if odd:
        verb = "is not a regular file" if len(odd) == 1 else "are not regular files"
        return f"{', '.join(odd)} {verb}"
    return None


def _step_entries(ckpt_root: Path) -> list[Path]:
    """Every entry of `ckpt_root` named like a checkpoint (step-NNNNNNN), whatever it is,
    newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if records.checkpoint_step(p.name) is not None]
    return sorted(found, key=lambda p: records.checkpoint_step(p.name), reverse=True)


def choose(ckpt_root: Path, check: Callable[[Path], Any] | None = None) -> Choice:
    """The checkpoint of `ckpt_root` a command uses: the one `latest` names when that is a
    complete checkpoint, else the newest complete one; with `check` (a function that raises
    CheckpointError for a checkpoint the command cannot use, and returns what it read), the
    first that passes, trying each older one in turn. Everything passed over on the way is a
    Skipped record: a `latest` that names no checkpoint of this folder (a path, `..`, a link, a
    FIFO, a folder that is not there; no `latest` at all is nothing to say), a step-N entry
    newer than the one used that is incomplete, fails the check, or is newer than the one
    `latest` names."""
    entries = _step_entries(ckpt_root)
    latest = ckpt_root / LATEST
    skipped: list[Skipped] = []
    name, problem = records.parse_latest(ckpt_root)
    order = entries
    if name is not None and is_complete(ckpt_root / name):
        named = records.checkpoint_step(name)
        for p in entries:
            if records.checkpoint_step(p.name) > named:
                why = incomplete(p) or f"it is newer than {name}, which {LATEST} names"
                skipped.append(Skipped(p, why))
        order = [ckpt_root / name] + [p for p in entries if records.checkpoint_step(p.name) < named]
    elif name is not None and not os.path.lexists(ckpt_root / name):
        skipped.append(Skipped(latest, f"it names {name}, which is not there"))
    elif problem is not None:
        skipped.append(Skipped(latest, f"it {problem}"))
    for p in order:
        why, value = incomplete(p), None
        if why is None and check is not None:
            try:
                value = check(p)
            except CheckpointError as e:
                why = _reason(e, p)
        if why is None:
            return Choice(p, value, tuple(replace(s, instead=p) for s in skipped))
        skipped.append(Skipped(p, why))
    return Choice(None, None, tuple(skipped))


def _reason(e: Exception, ckpt: Path) -> str:
    """An error about a file of `ckpt` as a reason to pass it over, its folder not repeated:
    "ema.safetensors: tensor x holds NaN ..."."""
    return str(e).replace(f"{ckpt}/", "").replace(f"{ckpt}: ", "")


def choose_for(
    path: Path, arg: str = "`checkpoint`", check: Callable[[Path], Any] | None = None
) -> Choice:
    """The checkpoint `path` names: a checkpoint folder itself (checked; no other is tried in
    its place), or the one a run folder, its checkpoints folder or its `latest` file means
    (choose). A CheckpointError when there is none; arg: the parameter that named the path."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        path = path.parent
    if (path / "config.json").is_file():
        return Choice(path, check(path) if check is not None else None)
    for root in (path / CHECKPOINTS, path):
        choice = choose(root, check)
        if choice.checkpoint is not None or choice.skipped:
            choice.require(f"{arg} {path}", root)
            return choice
    if not path.exists():
        raise CheckpointError(f"{arg} {path}: no such file or directory")
    raise CheckpointError(
        f"{arg} {path}: no checkpoint found (expected a folder with config.json, "
        "or a run folder with checkpoints/)"
    )


def resolve(path: Path, arg: str = "`checkpoint`") -> Path:
    """Accept a checkpoint folder, a run folder, a checkpoints folder or its `latest` file: the
    checkpoint (choose_for, unchecked). arg: the parameter that named the path, for messages."""
    return choose_for(path, arg).checkpoint


def run_folder_of(ckpt: Path) -> Path | None:
    """RUN for a checkpoint RUN/checkpoints/step-N; None for one outside a run folder."""
    ckpt = Path(ckpt)
    if records.checkpoint_step(ckpt.name) is not None and ckpt.parent.name == CHECKPOINTS:
        return ckpt.parent.parent
    return None


def clear_to_save(ckpt_root: Path, after: int, where: str = "`run_dir`") -> list[Path]:
    """Refuse, before a run trains, a step-N entry past step `after` that cfgdiff did not write
    (a folder holding a user's notes, a link, a file): the run may save step N's checkpoint
    there (at its interval, on a stop request or at its end, so at any step), which would
    replace it. Refusing is the safer of the two ways out: a checkpoint saved beside it under
    another name would be none that resume, `latest` or `keep` know, while this way the user's
    files stay where they were put and nothing is trained in vain. Returns the entries past
    `after` that are cfgdiff's (incomplete or broken checkpoints): the run replaces one of them
    if it saves its step."""
    own = []
    for p in _step_entries(ckpt_root):
        step = records.checkpoint_step(p.name)
        if step <= after:
            break
        problem = _not_cfgdiffs(p)
        if problem is not None:
            raise ConfigError(
                f"{where}: {p} {problem}; this run would save its step {step} checkpoint there: "
                "move it elsewhere, then run again"
            )
        own.append(p)
    return own


def check_resumable(ckpt: Path) -> RunConfig:
    """What a resume reads of a checkpoint, checked before it is used: the MANIFEST, config.json,
    both weights (fitting the config, finite) and state.pt parsed. A CheckpointError says what
    is broken (choose then tries the checkpoint before it); returns the config."""
    verify(ckpt)
    cfg = read_config(ckpt)
    net = build_network(cfg, ckpt)
    for which in ("model", "ema"):
        load_weights(ckpt, which, net)
    load_state(ckpt)
    return cfg


def read_config(ckpt: Path) -> RunConfig:
    """config.json, every field's type and range checked (records.parse_config), and the
    network it describes no larger than MAX_PARAMETERS."""
    path = ckpt / "config.json"
    cfg = records.parse_config(records.read_json_file(path), path)
    check_network_size(cfg, path)
    return cfg


def check_network_size(cfg: RunConfig, where: Path) -> int:
    """The parameter count of the network `cfg` describes, counted on the meta device (nothing
    allocated); a CheckpointError naming `where` above MAX_PARAMETERS."""
    with torch.device("meta"):
        n = count_parameters(UNet(cfg.model))
    if n > MAX_PARAMETERS:
        raise CheckpointError(
            f"{where}: describes a network of {n / 1e6:,.0f} M parameters, more than the "
            f"{MAX_PARAMETERS / 1e6:,.0f} M cfgdiff loads"
        )
    return n


def build_network(cfg: RunConfig, where: Path) -> UNet:
    """The network of `cfg` (read from `where`), built on the CPU; running out of memory is a
    RuntimeFault about the network's size, not about a batch size."""
    try:
        return UNet(cfg.model)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        n = check_network_size(cfg, where)
        raise RuntimeFault(
            f"out of memory building the network of {where} ({n / 1e6:,.0f} M parameters)"
        ) from None


def load_weights(ckpt: Path, name: str, net: torch.nn.Module) -> None:
    """Load `name`.safetensors into net strictly; CheckpointError on any mismatch or on a
    tensor holding NaN or infinite values."""
    path = ckpt / f"{name}.safetensors"
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    _load_into(net, tensors, path)


def _load_into(net: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not match the config ({first[-1].strip()})"
        ) from None
    for key, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(
                f"{path}: tensor {key} holds NaN or infinite values (the weights are broken)"
            )


def load_state(ckpt: Path) -> records.TrainingRecord:
    """state.pt as a typed record (records.parse_state). Call verify first: this is the one
    pickle of a checkpoint, read with torch.load(weights_only=True)."""
    path = ckpt / "state.pt"
    if not is_regular_file(path):
        raise CheckpointError(f"{path}: missing or not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, missing file: all one message
        raise CheckpointError(f"{path}: cannot load training state ({type(e).__name__})") from None
    return records.parse_state(state, path, records.checkpoint_step(ckpt.name))


def training_record(ckpt: Path) -> dict[str, Any]:
    """What the checkpoint's training state records of its run, read once: "data_identity",
    {"n", "sha256"} of the images it trained on, and "precision", the (device type, precision)
    it trained in; each None for checkpoints written before it was recorded, or without a
    training state."""
    if not os.path.lexists(ckpt / "state.pt"):
        return {"data_identity": None, "precision": None}
    state = load_state(ckpt)
    return {"data_identity": state.data_identity, "precision": state.precision}


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
    skipped: tuple[Skipped, ...] = ()  # the run's checkpoints passed over for this one (choose)


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


def check_export_file(out: Path, suffix: str) -> Path:
    """An export's output file, refused before any work unless it ends in `suffix`, is not a
    folder and does not lie in a checkpoint folder (whose files it could overwrite)."""
    out = Path(out)
    if out.suffix != suffix:
        raise ConfigError(f"`out` must end in {suffix}, got {out}")
    if out.is_dir():
        raise ConfigError(f"`out` {out}: is a directory")
    if (out.parent / MANIFEST).is_file() or (out.parent / "config.json").is_file():
        raise ConfigError(
            f"`out` {out}: inside a checkpoint folder, whose files it could overwrite; write "
            "it elsewhere (e.g. the run folder)"
        )
    return out


def export_model(
    path: Path, out: Path, *, ema: bool = True, dtype: str = "fp32", log=None
) -> dict[str, str]:
    """Write the checkpoint at `path` (folder, run folder) as one model file `out` (atomically):
    its EMA weights (or the raw ones, ema=False), stored as `dtype` (fp16 or bf16 halve the file;
    loading casts them back to fp32), and the metadata load_for_sampling needs. Returns the
    metadata; `log` hears each checkpoint of the run passed over (Skipped.line). Refused before
    any work: a `path` that is a file (a model file is exported already), an `out` that does not
    end in .safetensors, is a folder, or lies in a checkpoint folder (whose files it could
    overwrite), in the checkpoint read or on one of its run's own files (run_layout)."""
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"`dtype` must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out = check_export_file(out, ".safetensors")
    if Path(path).is_file() and Path(path).name != LATEST:
        raise ConfigError(f"`checkpoint` {path}: expected a checkpoint or run folder")
    check_output_file(out)
    refuse_overlap(out, input_paths(path))  # before any work
    which = "ema" if ema else "model"
    choice = choose_for(path, check=_loader(which))
    ckpt, (cfg, _) = choice.checkpoint, choice.value
    for s in choice.skipped:
        if log is not None:
            log(s.line())
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
    atomic_write_bytes(out, save(tensors, metadata))  # WriteFault naming `out` on a full disk
    return metadata


def input_paths(path: Path) -> list[tuple[str, Path] | tuple[str, Path, str]]:
    """What a command that reads checkpoint or model file `path` (a checkpoint, run or
    checkpoints folder, its `latest`, or a model file) must not write into: the model file, or
    the checkpoint folder and, for one of a run's checkpoints, every file and folder of the
    run's own (run_layout.RUN_FILES: its checkpoints folder with `latest`, its training log,
    previews, summary...). For files.refuse_overlap."""
    path = Path(path)
    if path.is_file() and path.name != LATEST:
        return [("the model file", path)]
    try:
        ckpt = resolve(path)
    except CheckpointError:  # not a checkpoint: loading it will say so
        return [("the checkpoint", path)]
    found: list = [("the checkpoint", ckpt)]
    run = run_folder_of(ckpt)
    if run is not None:  # its checkpoints folder among them
        found += run_inputs(run)
    return found


def _loader(which: str) -> Callable[[Path], tuple[RunConfig, UNet]]:
    """The check a sampling load makes of a checkpoint, as choose takes it: the MANIFEST, the
    config, and `which` weights ("ema" or "model") in the config's network, which it returns."""

    def load(ckpt: Path) -> tuple[RunConfig, UNet]:
        verify(ckpt)
        cfg = read_config(ckpt)
        net = build_network(cfg, ckpt)
        load_weights(ckpt, which, net)
        return cfg, net

    return load


def _load_model_file(path: Path) -> tuple[RunConfig, UNet, dict | None]:
    """A model file: its metadata parsed and checked first (records.parse_model_meta: the
    format, a config that validates, a network of bounded size), then the tensors, checked
    against the SHA-256 and for finite values."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    info = records.parse_model_meta(meta, path, MODEL_FILE_FORMAT, tuple(EXPORT_DTYPES))
    check_network_size(info.config, path)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    if _model_file_sha256(info.config_json, tensors, info.data_json) != info.sha256:
        raise CheckpointError(f"{path}: SHA-256 of config and weights does not match (corrupted)")
    net = build_network(info.config, path)
    _load_into(net, tensors, path)
    return info.config, net, info.data


def load_for_sampling(
    path: Path, device: torch.device | str = "cpu", ema: bool = True, arg: str = "`checkpoint`"
) -> Loaded:
    """A checkpoint (folder, run folder) or a model file, verified, on `device` in eval mode.
    ema picks the weights of a checkpoint; a model file holds the ones it was exported with.
    A run folder gives its newest checkpoint that loads (choose_for); the ones passed over are
    the Loaded's `skipped`. arg: the parameter that named the path, for messages."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        cfg, net, data = _load_model_file(path)
        return Loaded(path, cfg, net.to(device).eval(), data)
    choice = choose_for(path, arg, check=_loader("ema" if ema else "model"))
    cfg, net = choice.value
    return Loaded(choice.checkpoint, cfg, net.to(device).eval(), skipped=choice.skipped)


def load_guide(path: Path, loaded: Loaded, device: torch.device | str = "cpu") -> Loaded:
    """Autoguidance's weaker network (a checkpoint or model file), checked to be of the same
    kind as `loaded`: the same images and classes, the same condition (a text model's guide
    reads the same embeddings), the same diffusion process."""
    guide = load_for_sampling(path, device, arg="`guide_checkpoint`")
    m, g = loaded.cfg, guide.cfg
    text = ("condition", "text_dim", "text_tokens", "text_encoder_sha256")
    for section, names in (
        ("model", ("in_channels", "image_size", "num_classes", *text)),
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
