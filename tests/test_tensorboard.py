"""`cfgdiff train --tensorboard`: loss, learning rate, images/s, preview grids, the strip and
in-training evaluations as TensorBoard summaries; a one-line error without the package."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from cfgdiff.cli import main

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def _read(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_train_logs_scalars_and_images(tmp_path, folder_data, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(out),
            "--steps", "6", "--sample-every", "3", "--no-progress", "--precision", "fp32",
            "--tensorboard"]  # fmt: skip
    assert main(argv) == 0
    assert f"tensorboard --logdir {out / 'tensorboard'}" in capsys.readouterr().out
    acc = _read(out / "tensorboard")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s"} <= set(tags["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 6]  # every log interval (5) and the last step
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    assert [round(e.value, 5) for e in loss] == [round(float(r.split(",")[1]), 5) for r in rows]
    assert set(tags["images"]) == {"samples", "guidance_strip"}
    assert [e.step for e in acc.Images("samples")] == [3, 6]
    png = acc.Images("samples")[-1].encoded_image_string
    import io

    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    on_disk = np.asarray(Image.open(out / "samples" / "step-0000006.png").convert("RGB"))
    assert np.array_equal(shown, on_disk)


def test_eval_numbers_are_logged(tmp_path):
    from cfgdiff.train.tensorboard import TensorBoardEvents

    board = TensorBoardEvents(tmp_path / "tb", log_every=10)
    board("start", {"step": 0, "total": 20})
    board("eval", {"step": 10, "fid": 1.5, "class_accuracy": 0.9})
    board("step", {"step": 7, "loss": 0.5, "lr": 1e-3, "images_per_s": 100.0})  # not logged
    board.close()
    acc = _read(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == {"eval/fid", "eval/class_accuracy"}
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(10, 1.5)]


def test_without_the_package_it_is_one_line_before_any_work(tmp_path, folder_data, monkeypatch,
                                                            capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{folder_data}", "--preset", "tiny", "--out", str(out),
            "--steps", "2", "--tensorboard"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "cfgdiff: error: --tensorboard needs the tensorboard package: "
        "pip install 'cfgdiff[tensorboard]'\n"
    )
    assert not out.exists()
