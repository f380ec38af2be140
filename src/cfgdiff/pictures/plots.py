"""Plots, drawn with matplotlib: the training loss curve, the guidance sweep's four plots
(FID, class accuracy, precision and recall against the guidance scale, and the FID-vs-IS
frontier) and a text model's adherence against the scale, each written as PNG and SVG side by
side.

Owns: what each plot shows (the real-vs-real floor as a reference line, s and w = s - 1 on the
scale axes, the frontier's points labelled by s and w) and how it is written. Figures are made
with matplotlib's object API on the Agg canvas, so the global backend (pyplot) is never touched.
Image grids are pictures/images.py's, with Pillow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from cfgdiff.files import atomic_write_bytes

FORMATS = ("png", "svg")
_SIZE = (6.4, 4.2)  # inches; at 100 dpi a 640 x 420 PNG
# real-vs-real floor and the generated series, in every plot
_GENERATED, _REAL = "#1f77b4", "#555555"


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def save_figure(fig, path: Path) -> list[Path]:
    """The figure as PATH.png and PATH.svg (whatever suffix `path` has), each written
    atomically and without a date in it, so the same data gives the same files."""
    import matplotlib

    path = Path(path)
    written = []
    for fmt in FORMATS:
        out = path.with_suffix(f".{fmt}")
        buf = io.BytesIO()
        meta = {"Date": None} if fmt == "svg" else {"Software": None}
        with matplotlib.rc_context({"svg.hashsalt": "cfgdiff"}):  # fixed ids, not random ones
            fig.savefig(buf, format=fmt, metadata=meta)
        atomic_write_bytes(out, buf.getvalue())
        written.append(out)
    return written


def _plain_numbers(axis) -> None:
    """Tick labels as plain short numbers (0.05, 0.1, 0.2) on a log axis, minor ticks too when
    the axis spans less than two decades, so a narrow range is still labelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_formatter(fmt)
    lo, hi = axis.get_view_interval()
    if lo > 0 and math.log10(hi / lo) < 2:
        axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        axis.set_minor_formatter(fmt)
    else:
        axis.set_minor_formatter(NullFormatter())


def loss_plot(steps: Sequence[int], losses: Sequence[float], path: Path) -> list[Path]:
    """The training loss by step on a log axis, with its running mean over about a twentieth of
    the run when there are enough points to smooth."""
    fig, ax = _figure()
    k = len(losses) // 20
    ax.plot(
        steps, losses, color=_GENERATED, alpha=0.45 if k >= 2 else 1.0, linewidth=1,
        label="mean loss of each log interval",
    )  # fmt: skip
    if k >= 2:
        mean = [sum(losses[i - k + 1 : i + 1]) / k for i in range(k - 1, len(losses))]
        ax.plot(steps[k - 1 :], mean, color=_GENERATED, linewidth=2, label=f"mean of {k}")
    if all(v > 0 for v in losses):
        ax.set_yscale("log")
        _plain_numbers(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right")
    return save_figure(fig, path)


def _scale_axes(ax, xlabel_extra: str = "") -> None:
    """s below, w = s - 1 on top: the two conventions of one guidance strength."""
    ax.set_xlabel(f"guidance scale s{xlabel_extra}")
    top = ax.secondary_xaxis("top", functions=(lambda s: s - 1, lambda w: w + 1))
    top.set_xlabel("paper's weight w = s - 1")


def sweep_plots(
    scales: Sequence[float],
    rows: Sequence[dict],
    real: dict,
    features: str,
    out: Path,
) -> list[Path]:
    """The sweep's four plots in `out`: fid_vs_scale, accuracy_vs_scale,
    precision_recall_vs_scale and fid_vs_is (each .png and .svg). `rows`: one dict of metrics
    per scale (fid, is, class_accuracy, precision, recall); `real`: the same for the
    real-vs-real floor; `features`: the feature space FID was measured in."""
    out = Path(out)
    col = {key: [r[key] for r in rows] for key in ("fid", "is", "class_accuracy")}
    col.update(precision=[r["precision"] for r in rows], recall=[r["recall"] for r in rows])
    written: list[Path] = []

    def vs_scale(key: str, ylabel: str, name: str, percent: bool = False) -> None:
        fig, ax = _figure()
        ax.plot(scales, col[key], "o-", color=_GENERATED, label="generated")
        ax.axhline(real[key], color=_REAL, linestyle="--", label="real vs real (floor)")
        _scale_axes(ax)
        ax.set_ylabel(ylabel)
        if percent:
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.legend()
        written.extend(save_figure(fig, out / name))

    vs_scale("fid", f"FID ({features} features)", "fid_vs_scale")
    vs_scale("class_accuracy", "class accuracy (judge)", "accuracy_vs_scale", percent=True)

    fig, ax = _figure()
    for key, color in (("precision", "#d62728"), ("recall", "#2ca02c")):
        ax.plot(scales, col[key], "o-", color=color, label=key)
        ax.axhline(real[key], color=color, linestyle="--", alpha=0.6, label=f"{key}, real floor")
    _scale_axes(ax)
    ax.set_ylabel("precision, recall (k = 3)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(ncols=2, fontsize="small")
    written.extend(save_figure(fig, out / "precision_recall_vs_scale"))

    # The frontier: one point per scale, joined in order of s, as in Ho & Salimans' Fig. 4.
    fig, ax = _figure()
    order = sorted(range(len(scales)), key=lambda i: scales[i])
    xs, ys = [col["is"][i] for i in order], [col["fid"][i] for i in order]
    ax.plot(xs, ys, "o-", color=_GENERATED, label="generated, one point per scale")
    for i in order:
        s = scales[i]
        ax.annotate(
            f"s={s:g} (w={s - 1:g})", (col["is"][i], col["fid"][i]), textcoords="offset points",
            xytext=(5, 4), fontsize="small",
        )  # fmt: skip
    ax.plot([real["is"]], [real["fid"]], "*", color=_REAL, markersize=11, label="real vs real")
    ax.set_xlabel("Inception score (judge's classes)")
    ax.set_ylabel(f"FID ({features} features)")
    ax.legend()
    ax.margins(x=0.12, y=0.1)
    written.extend(save_figure(fig, out / "fid_vs_is"))
    return written


def adherence_plot(rows: Sequence[dict], path: Path) -> list[Path]:
    """A text model's sweep: the judge's class accuracy on held-out prompts and the rank
    correlations of requested and measured thickness and slant, against the guidance scale.
    `rows`: one dict per scale (scale, class_accuracy, thickness_spearman, slant_spearman)."""
    fig, ax = _figure()
    rows = sorted(rows, key=lambda r: r["scale"])
    scales = [r["scale"] for r in rows]
    for key, label, color in (
        ("class_accuracy", "class accuracy (judge)", _GENERATED),
        ("thickness_spearman", "thickness: Spearman, requested vs measured", "#d62728"),
        ("slant_spearman", "slant: Spearman, requested vs measured", "#2ca02c"),
    ):
        if rows[0][key] is not None:  # (prompts of a file ask for no level)
            ax.plot(scales, [r[key] for r in rows], "o-", color=color, label=label)
    ax.axhline(0, color=_REAL, linewidth=0.8)
    _scale_axes(ax)
    ax.set_ylabel("accuracy; rank correlation")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize="small")
    return save_figure(fig, path)
