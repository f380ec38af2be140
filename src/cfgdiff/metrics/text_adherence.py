"""How well a text model obeys its prompts, measured on prompts in phrasings it never saw.

Owns: the held-out prompts of a text run (one per (class, thickness level, slant level) group,
the held-out phrasings taken in turn; for captions of class names alone, as Fashion-MNIST's,
every held-out phrasing of every class, with no levels), prompt adherence (the judge's class
accuracy on their samples), attribute adherence (Spearman's rank correlation between the
requested level and the thickness or slant measured on the sample, data/captions.py's
definitions), and the effect of a negative prompt on a measured attribute, and the record of a
measurement (`text_adherence`, what `cfgdiff eval` and `cfgdiff sweep` report for a text model:
n samples per scale as whole rounds of the held-out prompts). It samples through
sample.generate and judges with the dataset's classifier (evaluate.judge_for); it knows nothing
of files or the CLI.

A caller may bring its own prompts instead (`labelled_prompts`: lines `CLASS<TAB>prompt`, the
class each prompt asks for): prompt adherence is then the judge's accuracy on them, per prompt
too, with each prompt's mean measured thickness and slant (one-channel models); there are no
requested levels, so no rank correlations. So it is for the held-out prompts of class names.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from cfgdiff import dist
from cfgdiff.data.captions import LEVEL_WORDS, caption_set, measure_attributes
from cfgdiff.errors import ConfigError
from cfgdiff.guidance import Guidance
from cfgdiff.metrics.evaluate import build_reference, floor, judge_for, measure
from cfgdiff.sample import generate
from cfgdiff.text import TextConditions, embed_prompts, run_caption_table

# the figures of an adherence row (besides scale, w and n), in the order tables show them
ADHERENCE_KEYS = ("class_accuracy", "thickness_spearman", "slant_spearman")
# fidelity and diversity of the held-out prompts' samples against real images (evaluate.measure,
# classifier features): None for prompts of a file, whose classes need not be the data's mix
FIDELITY_KEYS = ("fid", "is", "precision", "recall")
MIN_REFERENCE = 10  # real images at the least for them (the fewest `cfgdiff eval --n` takes)


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


HELD_OUT = (
    "held-out phrasings, one prompt per (class, thickness level, slant level) group, the "
    "phrasings in turn"
)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The prompts a text model is measured on, each with the class it asks for and, for
    generated captions' held-out phrasings, the thickness and slant levels it asks for."""

    prompts: list[str]
    labels: torch.Tensor  # (P,) class index of each prompt
    thickness: torch.Tensor | None = None  # (P,) requested level 0-2, None: not asked
    slant: torch.Tensor | None = None
    source: str = HELD_OUT

    @property
    def levels(self) -> bool:
        return self.thickness is not None


def labelled_prompts(lines: Sequence[str], source: str, cfg) -> PromptSet:
    """Prompts to measure, from lines `CLASS<TAB>prompt` (CLASS: a class name of the model, or
    its index; the prompt stripped of the spaces around it; blank lines and lines that start
    with # skipped). `source` names the lines in errors (a file's path). Refused with a
    ConfigError naming the line: a line without a tab, an unknown class, an empty prompt, and
    no prompt at all."""
    prompts, labels = [], []
    for i, line in enumerate(lines, 1):
        line = line.removeprefix("\ufeff") if i == 1 else line  # a byte-order mark
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"`prompts` {source} line {i}"
        key, tab, prompt = line.partition("\t")
        if not tab:
            raise ConfigError(f"{where}: expected CLASS<TAB>prompt, got {line.strip()[:60]!r}")
        key, prompt = key.strip(), prompt.strip()
        try:
            (label,) = cfg.class_indices([key])
        except ConfigError:
            names = cfg.label_names()
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(
                f"{where}: class {key!r} is not one of the model's classes ({shown}) or an "
                f"index in [0, {len(names)})"
            ) from None
        if not prompt:
            raise ConfigError(f"{where}: the prompt is empty")
        prompts.append(prompt)
        labels.append(label)
    if not prompts:
        raise ConfigError(f"`prompts` {source}: no CLASS<TAB>prompt line in it")
    return PromptSet(prompts, torch.tensor(labels), source=f"the prompts of {source}")


def held_out_set(table: TextConditions, class_names: Sequence[str]) -> PromptSet:
    """held_out_prompts as a PromptSet."""
    prompts, labels, thick, slant = held_out_prompts(table, class_names)
    return PromptSet(prompts, labels, thick, slant)


def held_out_prompts(table: TextConditions, class_names: Sequence[str]):
    """(prompts, labels, thickness levels, slant levels): one held-out prompt per group, the
    held-out phrasings in turn, from the caption set the run recorded; for attribute-free
    captions (class names, Fashion-MNIST) every held-out phrasing of every class, and no
    levels (None). Refused (ConfigError)
    for a run whose captions came from a folder's captions file: it holds no phrasing out of
    training and its groups have no attribute levels to measure."""
    rec = table.caption_record or {}
    if rec.get("source") == "file":
        raise ConfigError(
            f"the run's captions came from the captions file {rec.get('file')}, which holds no "
            "phrasing out of training and no attribute levels; measure it on prompts of your "
            "own: `prompts` FILE (CLASS<TAB>prompt lines, docs/text.md)"
        )
    edges = {k: tuple(v) for k, v in rec.get("edges", {}).items()}
    cs = caption_set(class_names, edges)
    if cs.captions != table.captions:
        raise ConfigError("the run's caption table is not this version's caption set")
    if not cs.with_attributes:  # class names and paraphrases: no levels to ask for
        rows = cs.held_out_rows[torch.arange(cs.num_classes) * 9]  # (classes, held-out phrasings)
        prompts = [cs.captions[int(r)] for r in rows.T.flatten()]
        labels = torch.arange(cs.num_classes).repeat(rows.shape[1])
        return prompts, labels, None, None
    prompts, labels, thick, slant = [], [], [], []
    for g in range(cs.held_out_rows.shape[0]):
        j = g % cs.held_out_rows.shape[1]
        prompts.append(cs.captions[int(cs.held_out_rows[g, j])])
        labels.append(g // 9)
        thick.append(g // 3 % 3)
        slant.append(g % 3)
    return prompts, torch.tensor(labels), torch.tensor(thick), torch.tensor(slant)


def samples_per_prompt(n: int, num_prompts: int) -> int:
    """Samples per held-out prompt for n samples in total: n rounded up to whole rounds of the
    prompts, so that every (class, thickness, slant) group weighs the same."""
    if n < 1:
        raise ConfigError(f"`n` must be >= 1, got {n}")
    return -(-n // num_prompts)


def adherence(
    net, cfg, table: TextConditions | None, judge, scales: Sequence[float], *,
    per_prompt: int = 1, prompts: PromptSet | None = None, guidance: Guidance | None = None,
    sampler: str = "dpmpp-2m", steps: int = 20, eta: float = 0.0, spacing: str = "trailing",
    seed: int = 0, batch_size: int | None = 256,
    device="cpu", precision: str = "fp32", compile: str = "off", log=None,
    world: dist.World | None = None, reference=None,
) -> list[dict]:  # fmt: skip
    """A row per scale: class accuracy (judge) and the rank correlation of requested and
    measured thickness and slant over `prompts` (default the run's held-out prompts), per_prompt
    samples each (sample i has the same noise at every scale). Prompts without requested levels
    (a caller's) get None for the correlations and a row per prompt instead (`prompt_rows`:
    accuracy, and mean measured thickness and slant on one-channel images). guidance: the
    variant to guide with (its scale replaced by each of `scales`; default plain CFG); the
    other options are sample.generate's. `reference` (evaluate.build_reference): each scale's
    samples are also measured against real images (FIDELITY_KEYS: FID, IS, precision,
    recall; every process of `world` must call); without it those are None."""
    ps = prompts or held_out_set(table, cfg.label_names())
    cond = embed_prompts(ps.prompts, cfg.model, table).repeat_interleave(per_prompt, dim=0)
    labels = ps.labels.repeat_interleave(per_prompt)
    n = len(cond)
    per_sample = torch.tensor([float(s) for s in scales for _ in range(n)])
    guidance = dataclasses.replace(guidance or Guidance(), scale=per_sample)
    images = generate(
        net, cfg, cond.repeat(len(scales), 1), guidance=guidance, sampler=sampler, steps=steps,
        eta=eta, spacing=spacing, seed=seed, batch_size=batch_size,
        indices=list(range(n)) * len(scales),  # the same noise at every scale
        device=device, precision=precision, compile=compile, log=log, world=world,
    )  # fmt: skip
    ink = cfg.model.in_channels == 1  # thickness and slant are measured on one-channel ink
    names = cfg.label_names()
    rows = []
    for i, s in enumerate(scales):
        part = images[i * n : (i + 1) * n]
        _, logits = judge(part)
        right = (logits.argmax(1) == labels).float()
        row = {"scale": float(s), "w": float(s) - 1, "n": n, "class_accuracy": float(right.mean())}
        fidelity = measure(reference, part, labels, world) if reference is not None else {}
        row.update({k: fidelity.get(k) for k in FIDELITY_KEYS})
        m = measure_attributes(part) if ink else None
        if ps.levels:
            for key, want in (("thickness", ps.thickness), ("slant", ps.slant)):
                row[f"{key}_spearman"] = spearman(
                    want.repeat_interleave(per_prompt).float(), m[key]
                )
        else:
            row.update(thickness_spearman=None, slant_spearman=None)
            row["prompt_rows"] = [
                {
                    "prompt": p, "class": names[int(ps.labels[j])],
                    "class_accuracy": float(right[j * per_prompt : (j + 1) * per_prompt].mean()),
                    **({
                        k: float(m[k][j * per_prompt : (j + 1) * per_prompt].mean())
                        for k in ("thickness", "slant")
                    } if ink else {}),
                }
                for j, p in enumerate(ps.prompts)
            ]  # fmt: skip
        rows.append(row)
    return rows


def text_adherence(
    loaded, scales: Sequence[float], n: int, *, guidance: Guidance | None = None,
    record: dict | None = None, dataset: str | None = None, data_dir=None,
    sampler: str = "dpmpp-2m", steps: int = 20, eta: float = 0.0, spacing: str = "trailing",
    seed: int = 0, batch_size: int | None = None, compile: str = "off", device="cpu",
    precision: str = "fp32", log=None, world: dist.World | None = None,
    prompts: PromptSet | None = None,
) -> dict:  # fmt: skip
    """Prompt and attribute adherence of a text checkpoint (`loaded`: checkpoint.
    load_for_sampling's) at each of `scales`, on n samples per scale rounded up to whole rounds
    of the prompts (samples_per_prompt), judged by `dataset`'s classifier (default the
    checkpoint's). The prompts are the run's held-out phrasings, or `prompts` (labelled_prompts:
    then the run's caption table is not needed, so a model file can be measured, and a model of
    colour images is judged by class accuracy alone). Returns the record `cfgdiff eval` and
    `cfgdiff sweep` write: `record` (how it was sampled, without a single scale), what was
    measured (prompts, samples, judge, machine) and `rows`, one per scale (adherence's).
    `world`: the processes of a torchrun job, which share the sampling; every one returns the
    record."""
    from cfgdiff.runtime import describe_machine

    cfg = loaded.cfg
    if cfg.model.condition != "text":
        raise ConfigError("text adherence measures text models; this one takes class labels")
    table = run_caption_table(loaded.path)
    held_out = prompts is None
    if held_out:  # refused before a judge is trained and samples are drawn
        if table is None:
            raise ConfigError(
                f"`checkpoint` {loaded.path}: no captions.safetensors beside it (a model file "
                "from cfgdiff export?); the held-out prompts are read from the run folder's "
                "caption table (`prompts` FILE measures prompts of your own)"
            )
        prompts = held_out_set(table, cfg.label_names())
        if prompts.levels and cfg.model.in_channels != 1:
            raise ConfigError(
                "text adherence measures stroke thickness and slant on one-channel images; this "
                f"model makes {cfg.model.in_channels}-channel ones (`prompts` FILE measures "
                "class accuracy alone)"
            )
    else:  # every prompt through the encoder now, before any judge
        embed_prompts(prompts.prompts, cfg.model, table)
    num_prompts = len(prompts.prompts)
    per_prompt = samples_per_prompt(n, num_prompts)
    world = world or dist.World()
    reference = None
    with dist.main_first(world):  # rank 0 may train and cache the judge; the others read it
        main_log = log if world.is_main else None
        if held_out:  # the held-out prompts ask for the data's mix: compare with real images
            reference = build_reference(
                cfg, num_prompts * per_prompt, dataset=dataset, data_dir=data_dir,
                device=device, log=main_log, at_most=True,
            )  # fmt: skip
            judge, meta = reference.classifier, reference.classifier_meta
            if reference.n < MIN_REFERENCE:  # a tiny folder: too few for the k-NN figures
                if main_log:
                    main_log(
                        f"only {reference.n} real images to compare the samples with (at least "
                        f"{MIN_REFERENCE}): no FID, IS, precision or recall"
                    )
                reference = None
        else:
            judge, meta = judge_for(cfg, dataset, data_dir=data_dir, device=device, log=main_log)
    t0 = time.perf_counter()
    rows = adherence(
        loaded.net, cfg, table, judge, scales, per_prompt=per_prompt, prompts=prompts,
        guidance=guidance,
        sampler=sampler, steps=steps, eta=eta, spacing=spacing, seed=seed,
        batch_size=batch_size, device=device, precision=precision, compile=compile,
        log=log if world.is_main else None, world=world, reference=reference,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    real = {}
    if reference is not None:  # real-vs-real: the figures' floor
        real_floor = floor(reference, world)
        real = {"reference_n": reference.n, "features": reference.features.name,
                "real_floor": {k: real_floor[k] for k in FIDELITY_KEYS}}  # fmt: skip
    record = {k: v for k, v in (record or {}).items() if k not in ("scale", "w")}
    return {
        **record, "scales": [float(s) for s in scales], "n": num_prompts * per_prompt,
        "n_asked": n, "per_prompt": per_prompt, "num_prompts": num_prompts,
        "prompts": prompts.source, "levels": prompts.levels,
        "dataset": meta["dataset"], "classifier_test_accuracy": meta["test_accuracy"],
        "rows": rows, **real,
        "sampling_images_per_s": num_prompts * per_prompt * len(scales) / dt,
        "device": torch.device(device).type, "machine": describe_machine(torch.device(device)),
    }  # fmt: skip


def at_one_scale(result: dict) -> dict:
    """text_adherence's record of a single scale as `cfgdiff eval` writes it: its row's scale,
    w and figures at the top level in place of `scales` and `rows`."""
    (row,) = result["rows"]
    rest = {k: v for k, v in result.items() if k not in ("scales", "rows", "n")}
    return {"scale": row["scale"], "w": row["w"], **rest, **row}


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
    from cfgdiff.data.captions import class_words

    prompts = class_words(cfg.label_names())
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
