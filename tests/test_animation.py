"""Denoising animations: generate's per-step callback, sampling.animation.denoising_animation and
`cfgdiff sample --animate FILE.gif|FILE.webp` (classes as rows, scales side by side, x0_hat or
x_t), and the checks on their flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import folder_run, sample_with, tiny_config
from PIL import Image, ImageSequence

from cfgdiff.cli import main


def test_generate_calls_back_every_step_of_every_batch(tiny_net):
    cfg = tiny_config()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    seen = []

    def callback(i, t, x_t, x0_hat):
        seen.append((i, int(t), x_t.shape[0], x0_hat.shape[0]))
        assert x_t.dtype == torch.float32 and torch.isfinite(x0_hat).all()

    kw = dict(scale=2.0, sampler="dpmpp-2m", steps=4, seed=1, batch_size=3)
    with_cb = sample_with(tiny_net, cfg, labels, static_batches=True, callback=callback, **kw)
    # batches of 3, 3 and 1 (padded to 3, the padding not shown); i counts each batch's steps
    assert [s[0] for s in seen] == [0, 1, 2, 3] * 3
    assert [s[2] for s in seen] == [3] * 8 + [1] * 4 and [s[3] for s in seen] == [
        s[2] for s in seen
    ]
    assert seen[0][1] == cfg.diffusion.timesteps - 1  # trailing spacing starts at T - 1
    assert torch.equal(with_cb, sample_with(tiny_net, cfg, labels, **kw))


def test_a_callback_that_raises_stops_the_job(tiny_net):
    class Stop(Exception):
        pass

    calls = []

    def callback(i, t, x_t, x0_hat):
        calls.append(i)
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        sample_with(tiny_net, tiny_config(), [0, 1], steps=10, batch_size=None, callback=callback)
    assert calls == [0, 1]


def test_animation_frames_and_images(tiny_net):
    from pathlib import Path

    from cfgdiff.sampling.animation import denoising_animation
    from cfgdiff.sampling.conditions import Asks, Model
    from cfgdiff.sampling.request import SampleRequest, job_for
    from cfgdiff.sampling.settings import SamplingSettings

    cfg = tiny_config()
    settings = SamplingSettings(sampler="dpmpp-2m", steps=7, seed=5)
    req = SampleRequest(Path("run"), per_class=2, settings=settings)
    job = job_for(Model(tiny_net, cfg, Path("run")), Asks(classes=("2", "0")), req, 1.0)
    anim = denoising_animation(job, [0.0, 1.0, 3.0], max_frames=3)
    # every 3rd step, the first and the last: steps 1, 3, 6, 7
    assert len(anim.frames) == 4
    assert anim.labels.tolist() == [2] * 6 + [0] * 6
    assert anim.scales == [0.0, 0.0, 1.0, 1.0, 3.0, 3.0] * 2
    assert {f.mode for f in anim.frames} == {"L"}  # one-channel model: grayscale frames
    # each scale's images are those of `generate` at that scale (noise stream r * 2 + j)
    for k, s in enumerate([0.0, 1.0, 3.0]):
        cols = [r * 6 + 2 * k + j for r in range(2) for j in range(2)]
        alone = sample_with(
            tiny_net, cfg, [2, 2, 0, 0], scale=s, sampler="dpmpp-2m", steps=7, seed=5
        )
        diff = (anim.images[cols].int() - alone.int()).abs().max()
        assert diff <= 1, (s, diff)  # several scales in one batch: equal to float rounding


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return folder_run(tmp_path_factory.mktemp("anim"), 6)


def _frames(path):
    with Image.open(path) as img:
        return [f.convert("RGB") for f in ImageSequence.Iterator(img)], img.format


def test_sample_animate_writes_the_trajectory_beside_the_grid(run, tmp_path, capsys):
    common = ["sample", "--checkpoint", str(run), "--scale", "3", "--per-class", "2",
              "--steps", "5", "--precision", "fp32"]  # fmt: skip
    gif, png = tmp_path / "a.gif", tmp_path / "a.png"
    assert main([*common, "--animate", str(gif), "--out", str(png)]) == 0
    assert f"wrote {gif}: 5 frames of 5 dpmpp-2m steps, predicted x0" in capsys.readouterr().out
    frames, fmt = _frames(gif)
    assert fmt == "GIF" and len(frames) == 5
    # the last frame is the grid --out holds, under the scale's label and over a caption
    grid = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(np.asarray(frames[-1])[16 : 16 + grid.shape[0]], grid)
    # --out is what `sample` writes without --animate
    assert main([*common, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes() == png.read_bytes()


def test_sample_animate_scales_and_x_t_as_webp(run, tmp_path, capsys):
    out = tmp_path / "s.webp"
    argv = ["sample", "--checkpoint", str(run), "--animate-scales", "0,1,4", "--per-class", "1",
            "--steps", "6", "--animate", str(out), "--animate-show", "xt", "--classes",
            "class2,class0"]  # fmt: skip
    assert main(argv) == 0
    assert "6 frames of 6 dpmpp-2m steps, x_t; rows = classes, columns = s 0,1,4 x 1" in (
        capsys.readouterr().out
    )
    frames, fmt = _frames(out)
    assert fmt == "WEBP" and len(frames) == 6
    w, h = frames[0].size
    assert w > 3 * 8 * 2 and h > 2 * 8 * 2  # three columns, two rows, cells of 8 x 2 pixels


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scale", "3"], "one of the arguments --out --animate is required"),
        (["--scale", "3", "--animate", "x.mp4"], "--animate must end in .gif or .webp"),
        (["--animate", "x.gif"], "one of the arguments --scale --w is required"),
        (["--scale", "3", "--out", "x.png", "--animate-show", "xt"], "go with --animate FILE"),
        (
            ["--animate-scales", "1,2", "--animate", "x.gif", "--out", "x.png"],
            "with --animate-scales, leave out --out",
        ),
        (["--animate-scales", "1,1", "--animate", "x.gif"], "expected distinct numbers"),
    ],
)
def test_sample_animate_flags_are_checked_before_any_work(run, tmp_path, capsys, extra, message):
    assert main(["sample", "--checkpoint", str(run), *[str(tmp_path / e) if e.startswith(
        "x.") else e for e in extra]]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
