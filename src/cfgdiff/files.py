"""Files written whole or not at all, and their digests: the bottom of the package.

Owns: atomic writes (a temporary file in the same folder, fsynced, renamed over the target),
appends that are cut back when they fail, directory fsyncs, SHA-256/md5 digests of files, CSV and
JSON bodies written that way, and JSON read back with a bound on its size and nesting. A failed
write is classed by its cause, not by the writer's exception type (write_error): no space or no
permission is a WriteFault naming the file (exit status 1), anything else a ConfigError naming
it. Also the check that an output path is not one of a command's inputs. Knows nothing about what
the bytes mean; checkpoints, caches, plots and run files all write through it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from cfgdiff.errors import CfgDiffError, ConfigError, WriteFault

# The causes of a failed write that lie with the machine, not with the path: no space (a full
# disk, a quota, a file-size limit) and no permission (a read-only or foreign folder).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)

# JSON that cfgdiff reads back (configs, manifests, metadata, caches) is small and shallow; these
# bound what a crafted file can make the parser do (json's own limit is the interpreter's
# recursion limit, which it reports as RecursionError, not as a decoding error).
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 64 << 20


def write_error(e: OSError, path: Path) -> CfgDiffError:
    """The one-line error for a failed write of `path`: a WriteFault (exit status 1) when the
    disk is full or the folder is not writable, a ConfigError naming the path otherwise (a path
    through a file, a name too long)."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in NO_SPACE:
        return WriteFault(f"{path}: cannot write: {reason}; free some space", path, "space", reason)
    if e.errno in NO_PERMISSION or e.errno == errno.EIO:
        return WriteFault(f"{path}: cannot write: {reason}", path, "permission", reason)
    return ConfigError(f"{path}: cannot write: {reason}")


@contextlib.contextmanager
def writing(path: Path):
    """Any OSError raised inside becomes write_error(e, path)."""
    try:
        yield
    except OSError as e:
        raise write_error(e, Path(path)) from None


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """atomic_write_bytes for content too large to hold twice: `write(f)` writes it to the
    temporary file (np.save(f, array) streams an array without a copy). A failure leaves
    `path` as it was and raises write_error's class."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append_bytes(path: Path, data: bytes) -> None:
    """Append `data` to `path` whole or not at all: a failed write (a full disk) cuts the file
    back to its old length before raising write_error's class. (A process killed mid-write can
    still leave a cut last line; readers of appended files drop it.) Unbuffered, so that
    nothing is left to flush after the failure."""
    path = Path(path)
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def csv_text(rows: Iterable[Mapping[str, Any]], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def atomic_write_csv(path: Path, rows: Iterable[Mapping[str, Any]], fields: list[str]) -> None:
    """A whole CSV (header and rows), written atomically."""
    atomic_write_bytes(path, csv_text(rows, fields).encode())


def parse_json(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads, but nesting deeper than `max_depth` is a ValueError like any other malformed
    JSON (json reports deep nesting as RecursionError), and so are NaN and Infinity, which are
    not JSON."""

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON value")

    try:
        obj = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    stack = [(obj, 1)]
    while stack:  # iterative: the check must not recurse either
        o, depth = stack.pop()
        if isinstance(o, dict | list):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in (o.values() if isinstance(o, dict) else o))
    return obj


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """parse_json of a file of at most `max_bytes`. Raises OSError (unreadable) or ValueError
    (too large, malformed, too deep)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes >> 20} MiB")
    return parse_json(data, max_depth=max_depth)


def refuse_overlap(
    out: Path, inputs: Iterable[tuple[str, Path] | tuple[str, Path, str]], arg: str = "`out`"
) -> None:
    """A ConfigError when `out` is, or lies inside, one of `inputs`, compared with symbolic links
    resolved. Each input is (what, path) such as ("the checkpoint", folder), an input of this
    command, or (what, path, why) saying why else it must be left alone (a run folder's own
    files: run_layout.run_inputs); None paths are skipped. For output paths, checked before any
    work."""
    target = Path(out).resolve()
    for what, p, *why in inputs:
        if p is None:
            continue
        src = Path(p).resolve()
        reason = why[0] if why else "an input of this command"
        if target == src:
            shown = "" if Path(out) == Path(p) else f" {p}"  # a path not as the user wrote it
            raise ConfigError(f"{arg} {out}: is {what}{shown}, {reason}; write it elsewhere")
        if target.is_relative_to(src):
            raise ConfigError(f"{arg} {out}: lies inside {what} {p}, {reason}; write it elsewhere")


def check_output_file(out: Path, arg: str = "`out`") -> None:
    """A ConfigError unless `out` can be written as a file: not a folder, and its nearest
    existing parent a folder. For output paths, checked before any work."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{arg} {out}: is a folder; {arg} names a file here")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{arg} {out}: {parent} is not a folder")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
