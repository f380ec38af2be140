"""Faults during training: non-finite losses, out of memory, a full disk, a second process."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import OUT_OF_MEMORY, tiny_config

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.errors import ConfigError, RuntimeFault
from cfgdiff.train import RunLock, TrainOptions, train

# the module whose TrainState.loss calls training_loss (cfgdiff.train is also a function)
train_mod = importlib.import_module("cfgdiff.train.state")


def _nan_at(monkeypatch, bad_steps: set[int]):
    """Make the training loss NaN at the given 1-based steps (counting every call)."""
    real = train_mod.training_loss
    calls = {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] in bad_steps else out

    monkeypatch.setattr(train_mod, "training_loss", loss)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    _nan_at(monkeypatch, {7})
    cfg = tiny_config(steps=20, checkpoint_every=4, log_every=5, sample_every=0)
    with pytest.raises(RuntimeFault, match="non-finite at step 7;.*step-0000004"):
        train(cfg, tmp_path / "r", data)
    names = [p.name for p in ckpt_io.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == ["step-0000004"]  # nothing saved after the bad step
    ckpt_io.load_for_sampling(tmp_path / "r")  # and it is intact


def test_skip_nonfinite_skips_bad_batches(tmp_path, data, monkeypatch):
    _nan_at(monkeypatch, {3, 9})
    events = []
    cfg = tiny_config(steps=12, skip_nonfinite=2, sample_every=0)
    res = train(
        cfg,
        tmp_path / "r",
        data,
        on_event=lambda n, i: events.append((n, i)),
        options=TrainOptions(final_strip=False),
    )
    assert res.step == 12
    assert [i["step"] for n, i in events if n == "skip"] == [3, 8]
    for p in ckpt_io.load_for_sampling(tmp_path / "r").net.parameters():
        assert torch.isfinite(p).all()


def test_too_many_nonfinite_batches(tmp_path, data, monkeypatch):
    _nan_at(monkeypatch, {2, 3, 4})
    with pytest.raises(RuntimeFault, match="more than `skip_nonfinite` 2"):
        train(tiny_config(steps=12, skip_nonfinite=2, sample_every=0), tmp_path / "r", data)


def test_out_of_memory_message(tmp_path, data, monkeypatch):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "training_loss", boom)
    with pytest.raises(
        RuntimeFault, match="out of memory at step 1 with `batch_size` 8.*lower `batch_size`"
    ):
        train(tiny_config(), tmp_path / "r", data)


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=type)
def test_out_of_memory_while_checking_the_compiled_step(tmp_path, data, monkeypatch, error):
    """Running out of memory in the compiled step's gradient check is not a compile failure to
    fall back from: it gets the same message as in the training loop."""

    def compile_that_runs_out(module, **kw):
        def f(*a):
            raise error

        return f

    monkeypatch.setattr(torch, "compile", compile_that_runs_out)
    with pytest.raises(RuntimeFault, match="out of memory at step 1 with `batch_size` 8"):
        train(tiny_config(), tmp_path / "r", data, options=TrainOptions(compile=True))


def test_disk_full_leaves_no_partial_files(tmp_path, data, monkeypatch):
    train(
        tiny_config(steps=4, checkpoint_every=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    from test_write_faults import file_size_limit  # the kernel refuses, as a full disk does

    with (
        file_size_limit(100_000),  # room for the logs, not for model.safetensors
        pytest.raises(
            RuntimeFault, match="disk full while writing checkpoint step-0000006.*`keep`"
        ),
    ):
        train(
            tiny_config(steps=8, checkpoint_every=2, sample_every=0),
            tmp_path / "r",
            data,
            options=TrainOptions(resume=True),
        )
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    assert ckpt_io.latest_checkpoint(root).name == "step-0000004"


def test_stale_temporary_folders_are_cleaned_on_resume(tmp_path, data):
    train(
        tiny_config(steps=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    root = tmp_path / "r" / "checkpoints"
    (root / ".tmp-step-0000003-999").mkdir()
    (root / ".tmp-step-0000003-999" / "model.safetensors").write_bytes(b"half")
    train(
        tiny_config(steps=3, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(resume=True, final_strip=False),
    )
    assert not list(root.glob(".tmp-*"))


def test_second_process_is_refused(tmp_path, data):
    run = tmp_path / "r"
    run.mkdir()
    with RunLock(run), pytest.raises(ConfigError, match="another cfgdiff process is training"):
        train(tiny_config(steps=2), run, data)
