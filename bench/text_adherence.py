"""Prompt and attribute adherence of a text model against the guidance scale, on prompts in
held-out phrasings; a class model's judged accuracy beside it; a negative prompt's effect on
the measured attributes. Prints markdown tables and writes the rows as JSON. (`cfgdiff eval`
and `cfgdiff sweep` measure the adherence alone, with the same judge: metrics.judging.)

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
from cfgdiff.metrics.adherence import held_out_set
from cfgdiff.metrics.evaluate import ReferenceOptions
from cfgdiff.metrics.evaluate import judge_for as judge_and_meta
from cfgdiff.metrics.judging import judge_of, measure_scales
from cfgdiff.runtime import describe_machine
from cfgdiff.sampling.conditions import Asks, Model
from cfgdiff.sampling.generate import generate
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.sampling.request import SampleRequest, job_for
from cfgdiff.sampling.settings import SamplingSettings
from cfgdiff.text.captions import LEVEL_WORDS, class_words, measure_attributes
from cfgdiff.text.embedding import embed_prompts, run_caption_table

# the sampler these figures were measured with (docs/text.md)
SAMPLER = "dpmpp-2m"


def settings(steps: int) -> SamplingSettings:
    return SamplingSettings(sampler=SAMPLER, steps=steps, seed=0, compile="off")


def adherence(loaded, scales, per_prompt: int, steps: int, data_dir) -> list[dict]:
    """The held-out prompts' adherence at each scale (what `cfgdiff sweep` measures)."""
    model = Model.of(loaded)
    n = per_prompt * len(held_out_set(model.captions, loaded.cfg.label_names()).prompts)
    judge = judge_of(model, Asks(), n, ReferenceOptions(data_dir=data_dir), device="cpu")
    req = SampleRequest(loaded.path, settings=settings(steps))
    job = job_for(model, Asks(), req, 1.0, rows=judge.rows)
    return measure_scales(job, judge, list(scales))[0]


def class_model_accuracy(loaded, judge, scales, *, per_class: int, steps: int) -> list[dict]:
    """The class part's baseline: a class model's judged accuracy per scale."""
    cfg = loaded.cfg
    labels = torch.arange(cfg.model.num_classes).repeat_interleave(per_class)
    rows = []
    for s in scales:
        g = Guidance(scale=float(s))
        images = generate(loaded.net, cfg, labels, settings=settings(steps), guidance=g)
        acc = float((judge(images)[1].argmax(1) == labels).float().mean())
        rows.append({"scale": float(s), "n": len(images), "class_accuracy": acc})
    return rows


def negative_prompt_effect(loaded, table, scale: float, *, per_class: int, steps: int):
    """Mean measured thickness and slant of label-only prompts ("seven") with no negative
    prompt and with each attribute's extreme words as the negative prompt (the same noise)."""
    cfg = loaded.cfg
    prompts = class_words(cfg.label_names())
    cond = embed_prompts(prompts, cfg.model, table).repeat_interleave(per_class, dim=0)
    negatives = [None] + [w for a in ("thickness", "slant") for w in LEVEL_WORDS[a][::2]]
    rows = []
    for neg in negatives:
        g = Guidance(scale=scale)
        if neg is not None:
            g = Guidance(scale=scale, negative_condition=embed_prompts([neg], cfg.model, table)[0])
        images = generate(loaded.net, cfg, cond, settings=settings(steps), guidance=g)
        m = measure_attributes(images)
        rows.append({
            "negative_prompt": neg or "", "n": len(images), "scale": scale,
            "thickness": float(m["thickness"].mean()), "slant": float(m["slant"].mean()),
        })  # fmt: skip
    return rows


def judge_for(cfg, data_dir):
    """The classifier that judges the checkpoint's samples (the one `cfgdiff eval` uses)."""
    return judge_and_meta(cfg, data_dir=data_dir)[0]


def phrasing_accuracy(loaded, table, judge, scales, steps: int) -> list[dict]:
    """The judge's accuracy per phrasing (each training template and each held-out one), one
    prompt per (digit, thickness, slant) group, 90 samples per phrasing and scale (the same
    noise for every phrasing and scale): which phrasings the digit is obeyed in."""
    from cfgdiff.text.captions import caption_set

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
                g = Guidance(scale=scale)
                images = generate(loaded.net, cfg, cond, settings=settings(steps), guidance=g)
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
    out["text"] = adherence(loaded, scales, a.per_prompt, a.steps, a.data_dir)
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
        loaded, table, a.negative_scale, per_class=a.per_class_negative, steps=a.steps
    )
    print(f"\n| negative prompt (s={a.negative_scale:g}) | n | mean thickness | mean slant |")
    print("|---|---|---|---|")
    for r in out["negative"]:
        neg = repr(r["negative_prompt"]) if r["negative_prompt"] else "(none: null)"
        print(f"| {neg} | {r['n']} | {r['thickness']:.3f} | {r['slant']:.3f} |")
    if a.class_checkpoint is not None:
        cl = load_for_sampling(a.class_checkpoint)
        out["class_checkpoint"] = str(cl.path)
        out["class"] = class_model_accuracy(
            cl, judge_for(cl.cfg, a.data_dir), scales, per_class=a.class_per_class, steps=a.steps
        )
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
