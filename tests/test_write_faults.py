"""A write that fails for want of space or permission, in any writer (safetensors, torch.save,
PNG, npz, a folder of PNGs, JSON, CSV, an appended row), is one line naming the file and exit
status 1, with nothing partial left: classed by its errno (files.write_error), not by the
exception type a serializer wraps it in.

Space runs out for real here: RLIMIT_FSIZE makes the kernel refuse a write past the limit
(EFBIG, in the same class as ENOSPC), whatever code does the writing; and, where this process
may mount one, on a 2 MiB tmpfs (ENOSPC itself)."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import cli, one_line, tiny_folder_run

from cfgdiff.errors import ConfigError, RuntimeFault, WriteFault
from cfgdiff.files import append_bytes, atomic_write_csv, atomic_write_json, write_error


@contextmanager
def file_size_limit(nbytes: int):
    """No file may grow past `nbytes` while inside (the kernel's EFBIG, like a full disk)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of atomic writes under `folder`."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".tmp-"))
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A module's finished run of the tiny preset on a folder."""
    return tiny_folder_run(tmp_path_factory.mktemp("writes"))


SAMPLE = ["--scale", "2", "--steps", "2", "--device", "cpu", "--per-class", "2"]


@pytest.mark.parametrize("out", ["grid.png", "arrays.npz", "folder"])
def test_sample_output_on_a_full_disk_is_exit_1_naming_the_file(made, tmp_path, capsys, out):
    """It used to exit 2 with no file named: `cfgdiff: error: : No space left on device`."""
    with file_size_limit(10):
        rc, err = cli(["sample", "--checkpoint", made[0], "--out", tmp_path / out, *SAMPLE], capsys)
    line = one_line(rc, err, status=(1,))
    named = tmp_path / out / "class0" / "00000.png" if out == "folder" else tmp_path / out
    assert f"cfgdiff: error: {named}: cannot write: File too large; free some space" == line
    assert not (tmp_path / out).exists() and leftovers(tmp_path) == []


def test_checkpoint_on_a_full_disk_is_exit_1_and_keeps_the_previous_one(made, tmp_path, capsys):
    """safetensors reports a full disk as SafetensorError, torch.save as RuntimeError: neither
    is an OSError, and a full disk used to end in a traceback."""
    run_dir, folder = made
    shutil.copytree(run_dir, tmp_path / "run")
    argv = ["train", "--dataset", f"folder:{folder}", "--out", tmp_path / "run", "--resume",
            "--steps", "4", "--no-progress", "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    with file_size_limit(150_000):  # room for pictures and logs, not for model.safetensors
        line = one_line(*cli(argv, capsys), status=(1,))
    root = tmp_path / "run" / "checkpoints"
    assert f"disk full while writing checkpoint step-0000004 in {root}" in line
    assert "model.safetensors" in line and "--keep" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]
    assert leftovers(tmp_path / "run") == []
    rc, err = cli(argv, capsys)  # with room again, the run goes on
    assert rc == 0, err


def test_export_on_a_full_disk_is_exit_1(made, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    with file_size_limit(1000):
        line = one_line(*cli(["export", "--checkpoint", made[0], "--out", out], capsys), (1,))
    assert line.startswith(f"cfgdiff: error: {out}: cannot write: File too large")
    assert not out.exists() and leftovers(tmp_path) == []


def test_json_and_csv_writers_leave_the_old_file_whole(tmp_path):
    for path, write in (
        (tmp_path / "r.json", lambda p: atomic_write_json(p, {"x": "y" * 5000})),
        (tmp_path / "r.csv", lambda p: atomic_write_csv(p, [{"a": "b" * 5000}], ["a"])),
    ):
        path.write_text("old")
        with file_size_limit(1000), pytest.raises(WriteFault, match=f"{path}: cannot write"):
            write(path)
        assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_an_append_that_fails_is_cut_back(tmp_path):
    """loss.csv grows by appended rows: a row the disk had no room for leaves no half row."""
    p = tmp_path / "loss.csv"
    p.write_bytes(b"step,loss\n1,0.5\n")
    with file_size_limit(20), pytest.raises(WriteFault, match="loss.csv: cannot write"):
        append_bytes(p, b"2,0.25\n3,0.125\n")
    assert p.read_bytes() == b"step,loss\n1,0.5\n"


@pytest.mark.parametrize(
    "code,fault",
    [
        (errno.ENOSPC, WriteFault),
        (errno.EDQUOT, WriteFault),
        (errno.EACCES, WriteFault),
        (errno.EROFS, WriteFault),
        (errno.ENOTDIR, ConfigError),
        (errno.ENAMETOOLONG, ConfigError),
    ],
)
def test_write_errors_are_classed_by_their_cause(code, fault):
    e = write_error(OSError(code, os.strerror(code)), Path("x/y.png"))
    assert type(e) is fault and str(e).startswith("x/y.png: cannot write: ")
    assert isinstance(e, RuntimeFault) == (fault is WriteFault)


def test_a_folder_without_permission_is_exit_1_naming_the_file(made, tmp_path, capsys, monkeypatch):
    """As root no folder is closed to writing, so the refusal is the stub here: the same
    errno a read-only or foreign folder gives."""

    def refused(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    out = tmp_path / "x.png"
    line = one_line(*cli(["sample", "--checkpoint", made[0], "--out", out, *SAMPLE], capsys), (1,))
    assert line == f"cfgdiff: error: {out}: cannot write: Permission denied"


def test_an_unnamed_os_error_is_said_without_an_empty_name(capsys, monkeypatch):
    import cfgdiff.cli

    def full(a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(cfgdiff.cli.COMMANDS, "info", full)
    line = one_line(*cli(["info", "--checkpoint", "x"], capsys), status=(1,))
    assert line == "cfgdiff: error: No space left on device"


# ----------------------------------------------------------------- a real full disk


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs, where this process may mount one (root, a kernel that allows it)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_loses_nothing(made, tmpfs, capsys):
    """Training on a 2 MiB tmpfs with a checkpoint every step: the third checkpoint does not
    fit. One line, exit status 1, the newest checkpoint whole; with space made, --resume goes
    on. Then a preview written to the full disk: one line naming it, exit status 1."""
    _, folder = made
    run_dir = tmpfs / "run"
    argv = ["train", "--dataset", f"folder:{folder}", "--preset", "tiny", "--out", run_dir,
            "--steps", "6", "--checkpoint-every", "1", "--keep", "5", "--sample-every", "0",
            "--no-progress", "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    line = one_line(*cli(argv, capsys), status=(1,))
    assert f"disk full while writing checkpoint step-0000003 in {run_dir / 'checkpoints'}" in line
    assert "No space left on device): free space or lower --keep" in line
    assert line.endswith("(the previous checkpoint step-0000002 is intact)")
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    assert leftovers(tmpfs) == []
    from cfgdiff.checkpoint import latest_checkpoint, load_for_sampling

    assert load_for_sampling(latest_checkpoint(root)).path.name == "step-0000002"
    out = tmpfs / "grid.png"
    try:  # whatever room is left, taken (creating the file may be refused already)
        with open(tmpfs / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError:
        pass
    sample = ["sample", "--checkpoint", run_dir, "--out", out, *SAMPLE]
    line = one_line(*cli(sample, capsys), status=(1,))
    assert line == f"cfgdiff: error: {out}: cannot write: No space left on device; free some space"
    assert not out.exists() and leftovers(tmpfs) == []
    (tmpfs / "filler").unlink(missing_ok=True)
    shutil.rmtree(root / "step-0000001")  # the space a user makes
    resume = ["train", "--dataset", f"folder:{folder}", "--out", run_dir, "--resume", "--keep",
              "1", "--no-progress", "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    rc, err = cli(resume, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000006"]
