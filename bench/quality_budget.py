"""Quality against training time: a table and a plot from `cfgdiff sweep` records.

    python bench/quality_budget.py --point MINUTES,LABEL,RUN/sweep/sweep.json [--point ...]
                                   [--plot docs/quality_budget.png]

Each point is one trained model: its training minutes (the wall time of `cfgdiff train`'s
training, as its SUMMARY.txt says), a label (the recipe and the machine), and the sweep.json of
`cfgdiff sweep --n 1000` over scales that include 1. The table gives, per point, the dataset,
the best FID over the swept scales (the judge's features) and its ratio to the real floor,
precision and recall there, and class accuracy at s = 1 and at the largest swept scale. The
plot (matplotlib) draws FID / floor at the best scale and at s = 1 against the minutes, one
pair of lines per dataset and label (recipe), each point marked with its best scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(path: Path) -> dict:
    r = json.loads(path.read_text())
    rows = r["rows"]
    floor = r["real_floor"]["fid"]
    best = min(rows, key=lambda x: x["fid"])
    at1 = next(x for x in rows if float(x["scale"]) == 1.0)
    top = max(rows, key=lambda x: float(x["scale"]))
    return {
        "n": r["n"], "floor": floor, "best_scale": float(best["scale"]), "best_fid": best["fid"],
        "ratio": best["fid"] / floor, "precision": best["precision"], "recall": best["recall"],
        "fid_s1": at1["fid"], "acc_s1": at1["class_accuracy"], "top_scale": float(top["scale"]),
        "acc_top": top["class_accuracy"], "sampler": f"{r['sampler']} {r['steps']}",
        "dataset": r["dataset"],
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--point", action="append", required=True, help="MINUTES,LABEL,SWEEP_JSON")
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args()
    points = []
    for spec in a.point:
        minutes, label, path = spec.split(",", 2)
        points.append({"minutes": float(minutes), "label": label, **summary(Path(path))})
    points.sort(key=lambda q: (q["dataset"], q["minutes"]))
    print("| dataset | training | recipe, machine | sampler | n | best s | FID (floor) | x floor "
          "| precision | recall | acc s = 1 (FID) | acc at top s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for q in points:
        top = f"{100 * q['acc_top']:.1f} % (s = {q['top_scale']:g})"
        print(f"| {q['dataset']} | {q['minutes']:g} min | {q['label']} | {q['sampler']} | "
              f"{q['n']} | {q['best_scale']:g} | {q['best_fid']:.3f} ({q['floor']:.3f}) | "
              f"{q['ratio']:.2f} | "
              f"{q['precision']:.3f} | {q['recall']:.3f} | {100 * q['acc_s1']:.1f} % "
              f"({q['fid_s1']:.3f}) | {top} |")  # fmt: skip
    if a.plot is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.2, 4.8), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        series = dict.fromkeys((q["dataset"], q["label"]) for q in points)
        for k, (name, label) in enumerate(series):
            mine = [q for q in points if (q["dataset"], q["label"]) == (name, label)]
            xs, colour = [q["minutes"] for q in mine], f"C{k}"
            ax.plot(xs, [q["ratio"] for q in mine], "o-", color=colour,
                    label=f"{name}, {label}: best scale")  # fmt: skip
            ax.plot(xs, [q["fid_s1"] / q["floor"] for q in mine], "x--", color=colour,
                    label=f"{name}, {label}: s = 1")  # fmt: skip
        for q in points:
            ax.annotate(f"s = {q['best_scale']:g}", (q["minutes"], q["ratio"]),
                        textcoords="offset points", xytext=(5, 3), fontsize=7)  # fmt: skip
        ax.set_xlim(left=0, right=max(q["minutes"] for q in points) * 1.1)
        ax.axhline(2.0, color="grey", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], 2.03, " 2x the real floor", color="grey", fontsize=8)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel("FID / real floor (judge features, n = 1000)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot)
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
