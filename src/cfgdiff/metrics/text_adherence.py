"""How well a text model obeys its prompts, measured on prompts in phrasings it never saw.

Owns: the held-out prompts of a text run (one per (class, thickness level, slant level) group,
the held-out phrasings taken in turn), prompt adherence (the judge's class accuracy on their
samples), attribute adherence (Spearman's rank correlation between the requested level and the
thickness or slant measured on the sample, data/captions.py's definitions), and the effect of a
negative prompt on a measured attribute. It samples through sample.generate and judges with
the dataset's classifier; it knows nothing of files or the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cfgdiff.data.captions import LEVEL_WORDS, caption_set, measure_attributes
from cfgdiff.errors import ConfigError
from cfgdiff.guidance import Guidance
from cfgdiff.sample import generate
from cfgdiff.text import TextConditions, embed_prompts


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 where either side is constant."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # ties: their mean rank
            tie = x == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 0.0


def held_out_prompts(table: TextConditions, class_names: Sequence[str]):
    """(prompts, labels, thickness levels, slant levels): one held-out prompt per group, the
    held-out phrasings in turn, from the caption set the run recorded."""
    rec = table.caption_record or {}
    edges = {k: tuple(v) for k, v in rec.get("edges", {}).items()}
    cs = caption_set(class_names, edges)
    if cs.captions != table.captions:
        raise ConfigError("the run's caption table is not this version's caption set")
    prompts, labels, thick, slant = [], [], [], []
    for g in range(cs.held_out_rows.shape[0]):
        j = g % cs.held_out_rows.shape[1]
        prompts.append(cs.captions[int(cs.held_out_rows[g, j])])
        labels.append(g // 9)
        thick.append(g // 3 % 3)
        slant.append(g % 3)
    return prompts, torch.tensor(labels), torch.tensor(thick), torch.tensor(slant)


def adherence(
    net, cfg, table: TextConditions, judge, scales: Sequence[float], *, per_prompt: int = 1,
    sampler: str = "dpmpp-2m", steps: int = 20, seed: int = 0, device="cpu",
    precision: str = "fp32",
) -> list[dict]:  # fmt: skip
    """A row per scale: class accuracy (judge) and the rank correlation of requested and
    measured thickness and slant over the held-out prompts (the same noise at every scale)."""
    prompts, labels, thick, slant = held_out_prompts(table, cfg.label_names())
    cond = embed_prompts(prompts, cfg.model, table).repeat_interleave(per_prompt, dim=0)
    labels, thick, slant = (v.repeat_interleave(per_prompt) for v in (labels, thick, slant))
    rows = []
    for s in scales:
        images = generate(
            net, cfg, cond, guidance=Guidance(scale=float(s)), sampler=sampler, steps=steps,
            seed=seed, device=device, precision=precision,
        )  # fmt: skip
        _, logits = judge(images)
        m = measure_attributes(images)
        rows.append({
            "scale": float(s), "n": len(images),
            "class_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "thickness_spearman": spearman(thick.float(), m["thickness"]),
            "slant_spearman": spearman(slant.float(), m["slant"]),
        })  # fmt: skip
    return rows


def class_model_accuracy(
    net, cfg, judge, scales: Sequence[float], *, per_class: int, sampler: str = "dpmpp-2m",
    steps: int = 20, seed: int = 0, device="cpu", precision: str = "fp32",
) -> list[dict]:  # fmt: skip
    """The class part's baseline: a class model's judged accuracy per scale."""
    labels = torch.arange(cfg.model.num_classes).repeat_interleave(per_class)
    rows = []
    for s in scales:
        images = generate(
            net, cfg, labels, scale=float(s), sampler=sampler, steps=steps, seed=seed,
            device=device, precision=precision,
        )  # fmt: skip
        _, logits = judge(images)
        acc = float((logits.argmax(1) == labels).float().mean())
        rows.append({"scale": float(s), "n": len(images), "class_accuracy": acc})
    return rows


def negative_prompt_effect(
    net, cfg, table: TextConditions, scale: float, *, per_class: int, sampler: str = "dpmpp-2m",
    steps: int = 20, seed: int = 0, device="cpu", precision: str = "fp32",
) -> list[dict]:  # fmt: skip
    """Mean measured thickness and slant of label-only prompts ("seven") with no negative
    prompt and with each attribute's extreme words as the negative prompt (the same noise)."""
    from cfgdiff.data.captions import DIGIT_WORDS

    k = cfg.model.num_classes
    prompts = [DIGIT_WORDS[c] if k == 10 else cfg.label_names()[c] for c in range(k)]
    cond = embed_prompts(prompts, cfg.model, table).repeat_interleave(per_class, dim=0)
    negatives = [None] + [w for a in ("thickness", "slant") for w in LEVEL_WORDS[a][::2]]
    rows = []
    for neg in negatives:
        g = Guidance(scale=scale)
        if neg is not None:
            g = Guidance(scale=scale, negative_condition=embed_prompts([neg], cfg.model, table)[0])
        images = generate(
            net, cfg, cond, guidance=g, sampler=sampler, steps=steps, seed=seed, device=device,
            precision=precision,
        )  # fmt: skip
        m = measure_attributes(images)
        rows.append({
            "negative_prompt": neg or "", "n": len(images), "scale": scale,
            "thickness": float(m["thickness"].mean()), "slant": float(m["slant"].mean()),
        })  # fmt: skip
    return rows
