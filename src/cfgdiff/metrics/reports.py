"""Evaluations and sweeps said in lines of text: the tables `cfgdiff eval` and `cfgdiff sweep`
print, from their records (eval.py, sweep.py), for each judge (judging.JUDGES). Nothing here
measures, writes or prints; the CLI prints these lines.
"""

from __future__ import annotations

from cfgdiff.metrics.adherence import HELD_OUT

# The rows of a class model's evaluation table: (record key, label, format).
METRIC_ROWS = [
    ("fid", "FID", "{:.3f}"),
    ("kid", "KID", "{:.5f}"),
    ("is", "IS (classifier)", "{:.3f}"),
    ("precision", "precision (k=3)", "{:.3f}"),
    ("recall", "recall (k=3)", "{:.3f}"),
    ("class_accuracy", "class accuracy", "{:.4f}"),
    ("memorisation", "memorised", "{:.4f}"),
]


def eval_lines(ev) -> list[str]:
    """An Evaluation (eval.py) in lines."""
    r = ev.record
    if ev.metric == "prompts":
        return _prompt_eval_lines(r)
    gen, real, n = r["generated"], r["real_floor"], r["n"]
    if "samples" in r:
        head = f"{n} samples from {r['samples']}"
    else:
        head = (
            f"{n} samples at s={r['scale']:g} (w={r['w']:g}), {_sampler(r)}, "
            f"{r['sampling_images_per_s']:.1f} images/s"
        )
    return [
        f"{head}; real floor: {n} held-out vs {n} training images",
        metrics_table({"generated": gen, "real floor": real}, r["features"]),
        "class accuracy per class: "
        + ", ".join(f"{ev.names[c]} {v:.3f}" for c, v in enumerate(gen["per_class_accuracy"])),
        _judge_line(r),
    ]


def sweep_lines(result) -> list[str]:
    """A Sweep (sweep.py) in lines."""
    r, out = result.record, result.out
    if result.metric == "prompts":
        return [
            f"{len(r['scales'])} scales x {r['n']} samples ({_samples_line(r)}; "
            f"{_sampler(r)}, {r['sampling_images_per_s']:.1f} images/s)",
            adherence_table(r["rows"], r.get("real_floor")),
            *_judge_notes(r),
            f"wrote {out}/sweep.csv, sweep.json, adherence_vs_scale (.png and .svg)",
        ]
    lines = [
        f"{len(r['scales'])} scales x {r['n']} samples ({_sampler(r)}, "
        f"{r['sampling_images_per_s']:.1f} images/s); {r['features']} features; real floor in "
        "the last row",
        f"{'s':>6s} {'w':>6s} {'FID':>9s} {'IS':>7s} {'acc':>7s} {'prec':>6s} {'recall':>6s}",
    ]
    for row in r["rows"] + [{"scale": "real", "w": "", **r["real_floor"]}]:
        s_, w_ = (
            f"{v:6g}" if isinstance(v, int | float) else f"{v:>6}" for v in (row["scale"], row["w"])
        )
        lines.append(
            f"{s_} {w_} {row['fid']:9.3f} {row['is']:7.3f} "
            f"{row['class_accuracy']:7.4f} {row['precision']:6.3f} {row['recall']:6.3f}"
        )
    lines.append(
        f"wrote {out}/sweep.csv, sweep.json, fid_vs_scale, accuracy_vs_scale, "
        "precision_recall_vs_scale and fid_vs_is (.png and .svg), strip.png"
    )
    return lines


def metrics_table(columns: dict[str, dict], features: str) -> str:
    head = f"{'metric (' + features + ' features)':34s}" + "".join(f"{c:>14s}" for c in columns)
    lines = [head]
    for key, label, fmt in METRIC_ROWS:
        lines.append(
            f"{label:34s}" + "".join(f"{fmt.format(v[key]):>14s}" for v in columns.values())
        )
    return "\n".join(lines)


def _sampler(r: dict) -> str:
    """ "ddpm 20 steps (the model's own), onnxruntime fp32": the sampler, whether the model
    chose it, and what ran the network in which precision (where the record says)."""
    own = "the model's own" if r.get("sampler_from") == "model" else "as asked"
    ran = f", {r['backend']} {r['precision']}" if "backend" in r else ""
    return f"{r['sampler']} {r['steps']} steps ({own}){ran}"


def _judge_line(r: dict) -> str:
    return f"(judge: {r['dataset']} classifier, test accuracy {r['classifier_test_accuracy']:.4f})"


def _samples_line(r: dict) -> str:
    which = "held-out prompt" if r["prompts"] == HELD_OUT else "prompt"
    return f"{r['per_prompt']} per {which} x {r['num_prompts']}"


def _prompt_eval_lines(r: dict) -> list[str]:
    lines = [
        f"{r['n']} samples ({_samples_line(r)}) at s={r['scale']:g} (w={r['w']:g}), "
        f"{_sampler(r)}, {r['sampling_images_per_s']:.1f} images/s",
        adherence_table([r], r.get("real_floor")),
    ]
    if "prompt_rows" in r:
        lines.append(per_prompt_table(r["prompt_rows"]))
    return lines + _judge_notes(r)


def adherence_table(rows: list[dict], real: dict | None = None) -> str:
    """A text model's adherence rows (adherence.adherence_row) as a table ("-": a correlation
    not measured, prompts of a file ask for no level), with FID, IS, precision and recall
    against real images when they were measured, and `real` (the real-vs-real floor) last."""

    def num(v, width: int, digits: int = 3) -> str:
        return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"

    fidelity = rows[0].get("fid") is not None
    head = f"{'s':>6s} {'w':>6s} {'n':>7s} {'accuracy':>9s} {'thickness':>10s} {'slant':>7s}"
    lines = [head + (f" {'FID':>8s} {'IS':>6s} {'prec':>6s} {'recall':>6s}" if fidelity else "")]
    for r in rows:
        line = (
            f"{r['scale']:6g} {r['w']:6g} {r['n']:7d} {r['class_accuracy']:9.4f} "
            f"{num(r['thickness_spearman'], 10)} {num(r['slant_spearman'], 7)}"
        )
        if fidelity:
            line += f" {r['fid']:8.3f} {r['is']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f}"
        lines.append(line)
    if fidelity and real is not None:
        lines.append(
            f"{'real':>6s} {'':>6s} {'':>7s} {'':>9s} {'':>10s} {'':>7s} {real['fid']:8.3f} "
            f"{real['is']:6.3f} {real['precision']:6.3f} {real['recall']:6.3f}"
        )
    return "\n".join(lines)


def per_prompt_table(rows: list[dict]) -> str:
    """adherence's per-prompt rows: class, accuracy, mean thickness and slant, prompt."""
    lines = [f"{'class':>10s} {'accuracy':>9s} {'thickness':>10s} {'slant':>7s}  prompt"]
    for r in rows:
        attrs = (
            f"{r['thickness']:10.2f} {r['slant']:7.3f}"
            if "thickness" in r
            else f"{'-':>10s} {'-':>7s}"
        )
        lines.append(f"{r['class'][:10]:>10s} {r['class_accuracy']:9.4f} {attrs}  {r['prompt']}")
    return "\n".join(lines)


def _judge_notes(r: dict) -> list[str]:
    """What a text model's figures mean."""
    if not r["levels"]:  # prompts of a file, or held-out ones of class names
        which = "phrasings held out of training" if r["prompts"] == HELD_OUT else ""
        lines = [
            "(accuracy: the judge's, against the class each prompt asks for, on "
            f"{which or r['prompts']}; thickness in px and slant: the means measured on "
            "each prompt's samples, in sweep.json for a sweep)"
        ]
    else:
        lines = [
            "(accuracy: the judge's on prompts in phrasings held out of training; thickness, "
            "slant: Spearman's rank correlation of the requested and the measured level)"
        ]
    if "real_floor" in r:
        lines.append(
            f"(FID, IS, precision, recall: the samples against {r['reference_n']} real "
            f"images in the judge's features; real: {r['reference_n']} other real images "
            "against them, the floor)"
        )
    return [*lines, _judge_line(r)]
