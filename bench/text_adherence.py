"""Prompt and attribute adherence of a text model against the guidance scale, on prompts in
held-out phrasings; a class model's judged accuracy beside it; a negative prompt's effect on
the measured attributes. Prints markdown tables and writes the rows as JSON. (`cfgdiff eval`
and `cfgdiff sweep` measure the adherence alone, with the same library function.)

    python bench/text_adherence.py --checkpoint RUN [--class-checkpoint RUN2]
        [--scales 1,2,3,5] [--per-prompt 1] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cfgdiff.checkpoint import load_for_sampling
from cfgdiff.metrics.evaluate import judge_for as judge_and_meta
from cfgdiff.metrics.text_adherence import adherence, class_model_accuracy, negative_prompt_effect
from cfgdiff.runtime import describe_machine
from cfgdiff.text import run_caption_table


def judge_for(cfg, data_dir):
    """The classifier that judges the checkpoint's samples (the one `cfgdiff eval` uses)."""
    return judge_and_meta(cfg, data_dir=data_dir)[0]


def phrasing_accuracy(loaded, table, judge, scales, steps: int) -> list[dict]:
    """The judge's accuracy per phrasing (each training template and each held-out one), one
    prompt per (digit, thickness, slant) group, 90 samples per phrasing and scale (the same
    noise for every phrasing and scale): which phrasings the digit is obeyed in."""
    from cfgdiff.data.captions import caption_set
    from cfgdiff.sample import generate
    from cfgdiff.text import embed_prompts

    cfg = loaded.cfg
    edges = {k: tuple(v) for k, v in table.caption_record["edges"].items()}
    cs = caption_set(cfg.label_names(), edges)
    labels = torch.arange(cs.rows.shape[0]) // 9
    rows = []
    for held_out, templates, table_rows in (
        (False, cs.templates, cs.rows),
        (True, cs.held_out_templates, cs.held_out_rows),
    ):
        for j, template in enumerate(templates):
            prompts = [cs.captions[int(r)] for r in table_rows[:, j]]
            cond = embed_prompts(prompts, cfg.model, table)
            acc = []
            for scale in scales:
                images = generate(loaded.net, cfg, cond, scale=scale, steps=steps, seed=0)
                acc.append(float((judge(images)[1].argmax(1) == labels).float().mean()))
            rows.append({"phrasing": template, "held_out": held_out, "class_accuracy": acc})
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--class-checkpoint", type=Path)
    p.add_argument("--scales", default="1,2,3,5")
    p.add_argument("--per-prompt", type=int, default=1)
    p.add_argument("--per-class-negative", type=int, default=10)
    p.add_argument("--class-per-class", type=int, default=18)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--negative-scale", type=float, default=3.0)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    scales = [float(s) for s in a.scales.split(",")]
    t0 = time.perf_counter()
    loaded = load_for_sampling(a.checkpoint)
    table = run_caption_table(loaded.path)
    judge = judge_for(loaded.cfg, a.data_dir)
    out = {
        "machine": describe_machine(torch.device("cpu")),
        "checkpoint": str(loaded.path),
        "steps": a.steps,
    }
    out["text"] = adherence(
        loaded.net, loaded.cfg, table, judge, scales, per_prompt=a.per_prompt, steps=a.steps
    )
    print("| s | n | class accuracy | thickness Spearman | slant Spearman |")
    print("|---|---|---|---|---|")
    for r in out["text"]:
        print(
            f"| {r['scale']:g} | {r['n']} | {r['class_accuracy']:.3f} | "
            f"{r['thickness_spearman']:.3f} | {r['slant_spearman']:.3f} |"
        )
    out["phrasings"] = phrasing_accuracy(loaded, table, judge, scales, a.steps)
    print("\n| phrasing | " + " | ".join(f"s = {s:g}" for s in scales) + " |")
    print("|---" * (len(scales) + 1) + "|")
    for r in out["phrasings"]:
        cells = " | ".join(f"{acc:.3f}" for acc in r["class_accuracy"])
        print(f"| {r['phrasing']}{' (held out)' if r['held_out'] else ''} | {cells} |")
    out["negative"] = negative_prompt_effect(
        loaded.net, loaded.cfg, table, a.negative_scale, per_class=a.per_class_negative,
        steps=a.steps,
    )  # fmt: skip
    print(f"\n| negative prompt (s={a.negative_scale:g}) | n | mean thickness | mean slant |")
    print("|---|---|---|---|")
    for r in out["negative"]:
        neg = repr(r["negative_prompt"]) if r["negative_prompt"] else "(none: null)"
        print(f"| {neg} | {r['n']} | {r['thickness']:.3f} | {r['slant']:.3f} |")
    if a.class_checkpoint is not None:
        cl = load_for_sampling(a.class_checkpoint)
        out["class_checkpoint"] = str(cl.path)
        out["class"] = class_model_accuracy(
            cl.net, cl.cfg, judge_for(cl.cfg, a.data_dir), scales, per_class=a.class_per_class,
            steps=a.steps,
        )  # fmt: skip
        print("\n| s | class model n | class model accuracy |")
        print("|---|---|---|")
        for r in out["class"]:
            print(f"| {r['scale']:g} | {r['n']} | {r['class_accuracy']:.3f} |")
    out["seconds"] = time.perf_counter() - t0
    print(f"\n{out['seconds']:.0f} s on {out['machine']}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
