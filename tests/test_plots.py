"""Plots (plots.py, matplotlib): the loss curve and the sweep's four plots as PNG and SVG, with
readable ticks, a legend, the real-vs-real floor and the frontier labelled by s and w."""

from __future__ import annotations

import re

from PIL import Image

from cfgdiff.pictures.plots import loss_plot, sweep_plots

SCALES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
ROWS = [
    {"fid": f, "is": i, "class_accuracy": a, "precision": p, "recall": r}
    for f, i, a, p, r in zip(
        [2.465, 2.089, 0.734, 0.547, 0.699, 1.114, 1.59, 2.873],
        [2.61, 3.1, 5.68, 7.25, 7.87, 8.26, 8.36, 8.39],
        [0.31, 0.5, 0.946, 0.99, 0.996, 1.0, 1.0, 1.0],
        [0.49, 0.52, 0.66, 0.76, 0.79, 0.76, 0.72, 0.61],
        [0.83, 0.92, 0.85, 0.77, 0.67, 0.51, 0.39, 0.23],
        strict=True,
    )
]
REAL = {"fid": 0.137, "is": 7.14, "class_accuracy": 0.994, "precision": 0.87, "recall": 0.85}


def _texts(svg: str) -> list[str]:
    """The texts of a matplotlib SVG (each drawn text is preceded by a comment holding it)."""
    return re.findall(r"<!-- (.*?) -->", svg)


def _numbers(texts: list[str]) -> list[str]:
    return [t for t in texts if re.fullmatch(r"[−-]?\d+(\.\d+)?%?", t)]


def test_sweep_plots_png_and_svg_with_floor_legend_and_frontier_labels(tmp_path):
    written = sweep_plots(SCALES, ROWS, REAL, "classifier", tmp_path)
    names = sorted(p.name for p in written)
    stems = ["accuracy_vs_scale", "fid_vs_is", "fid_vs_scale", "precision_recall_vs_scale"]
    assert names == sorted(f"{s}.{x}" for s in stems for x in ("png", "svg"))
    for p in written:
        if p.suffix == ".png":
            assert Image.open(p).size == (640, 420)
    fid = _texts((tmp_path / "fid_vs_scale.svg").read_text())
    assert "real vs real (floor)" in fid and "generated" in fid
    assert "guidance scale s" in fid and "paper's weight w = s - 1" in fid
    assert fid.count("FID (classifier features)") == 1  # no axis title said twice
    # ticks at round values, not at the data's extremes
    assert set(_numbers(fid)) >= {"0", "1", "2", "3", "4", "5", "6"}
    assert all(len(t.lstrip("−-")) <= 4 for t in _numbers(fid)), _numbers(fid)
    frontier = _texts((tmp_path / "fid_vs_is.svg").read_text())
    for s in SCALES:
        assert f"s={s:g} (w={s - 1:g})" in frontier
    assert "real vs real" in frontier
    acc = _texts((tmp_path / "accuracy_vs_scale.svg").read_text())
    assert any(t.endswith("%") for t in acc)
    pr = _texts((tmp_path / "precision_recall_vs_scale.svg").read_text())
    assert {"precision", "recall", "precision, real floor", "recall, real floor"} <= set(pr)


def test_plots_are_the_same_files_for_the_same_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d in (a, b):
        sweep_plots(SCALES, ROWS, REAL, "classifier", d)
        loss_plot(list(range(50, 1050, 50)), [0.6 / (1 + i) ** 0.6 for i in range(20)], d / "loss")
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_loss_plot_ticks_are_plain_numbers(tmp_path):
    steps = list(range(10, 2010, 10))
    losses = [0.09 + 0.5 / (1 + i / 5) for i in range(200)]
    loss_plot(steps, losses, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "loss.svg").is_file()
    texts = _texts((tmp_path / "loss.svg").read_text())
    numbers = _numbers(texts)
    assert {"0.1", "0.2", "0.3", "0.5"} <= set(numbers), numbers
    assert all(len(t) <= 4 for t in numbers), numbers
    assert "mean of 10" in texts  # the running mean over a twentieth of the run
