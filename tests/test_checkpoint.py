"""Checkpoints (checkpoint.py): pruning, damage refused with the file named, loaders that check
even without the manifest."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from cfgdiff import checkpoint as ckpt_io
from cfgdiff.errors import CheckpointError
from cfgdiff.train import TrainOptions, train


def test_keep_prunes_old_checkpoints(tmp_path, data):
    train(
        tiny_config(steps=8, checkpoint_every=2, keep=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    names = [p.name for p in ckpt_io.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == ["step-0000006", "step-0000008"]


@pytest.mark.parametrize(
    "name", ["model.safetensors", "ema.safetensors", "state.pt", "config.json"]
)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoints_are_refused(tmp_path, data, name, damage):
    train(
        tiny_config(steps=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "r" / "checkpoints")
    p = ckpt / name
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        p.write_bytes(bytes(raw[: len(raw) // 2]))
    else:  # one flipped bit in the middle of the file
        raw[len(raw) // 2] ^= 0x10
        p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{name}: SHA-256 does not match MANIFEST.json"):
        ckpt_io.load_for_sampling(ckpt)
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        train(tiny_config(steps=4), tmp_path / "r", data, options=TrainOptions(resume=True))


def test_loaders_refuse_damage_even_without_the_manifest(tmp_path, data):
    train(
        tiny_config(steps=2, sample_every=0),
        tmp_path / "r",
        data,
        options=TrainOptions(final_strip=False),
    )
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "r" / "checkpoints")
    p = ckpt / "ema.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    from cfgdiff.unet import UNet

    with pytest.raises(CheckpointError, match="ema.safetensors: cannot load"):
        ckpt_io.load_weights(ckpt, "ema", UNet(tiny_config().model))
    s = ckpt / "state.pt"
    s.write_bytes(s.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.pt: cannot load training state"):
        ckpt_io.load_state(ckpt)
    c = json.loads((ckpt / "config.json").read_text())
    c["format_version"] = 99
    (ckpt / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="format_version must be 1, got 99"):
        ckpt_io.read_config(ckpt)
    (ckpt / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no MANIFEST.json"):
        ckpt_io.load_for_sampling(ckpt)
