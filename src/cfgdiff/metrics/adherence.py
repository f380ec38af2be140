"""How well a text model obeys its prompts, measured on prompts in phrasings it never saw.

Owns: the held-out prompts of a text run (one per (class, thickness level, slant level) group,
the held-out phrasings taken in turn; for captions of class names alone, as Fashion-MNIST's,
every held-out phrasing of every class, with no levels), prompt adherence (the judge's class
accuracy on their samples), attribute adherence (Spearman's rank correlation between the
requested level and the thickness or slant measured on the sample, text/captions.py's
definitions), and a scale's row of figures (`adherence_row`: what `cfgdiff eval` and `cfgdiff
sweep` report for a text model, through judging.PromptJudge, n samples per scale as whole rounds
of the held-out prompts). It is given the samples and the dataset's classifier; it knows nothing
of sampling, files or the CLI.

A caller may bring its own prompts instead (`labelled_prompts`: lines `CLASS<TAB>prompt`, the
class each prompt asks for): prompt adherence is then the judge's accuracy on them, per prompt
too, with each prompt's mean measured thickness and slant (one-channel models); there are no
requested levels, so no rank correlations. So it is for the held-out prompts of class names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from cfgdiff import dist
from cfgdiff.errors import ConfigError
from cfgdiff.metrics.evaluate import measure
from cfgdiff.text.captions import caption_set, measure_attributes
from cfgdiff.text.embedding import TextConditions

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
    class_names: tuple[str, ...] = ()  # the model's, by label

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
        where = f"`prompts_file` {source} line {i}"
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
        raise ConfigError(f"`prompts_file` {source}: no CLASS<TAB>prompt line in it")
    return PromptSet(
        prompts, torch.tensor(labels), source=f"the prompts of {source}",
        class_names=tuple(cfg.label_names()),
    )  # fmt: skip


def held_out_set(table: TextConditions, class_names: Sequence[str]) -> PromptSet:
    """held_out_prompts as a PromptSet."""
    prompts, labels, thick, slant = held_out_prompts(table, class_names)
    return PromptSet(prompts, labels, thick, slant, class_names=tuple(class_names))


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
            "own: `prompts_file` FILE (CLASS<TAB>prompt lines, docs/text.md)"
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


def adherence_row(
    judge, images: torch.Tensor, prompts: PromptSet, per_prompt: int, scale: float,
    reference=None, world: dist.World | None = None,
) -> dict:  # fmt: skip
    """One scale's row: class accuracy (`judge`: the dataset's classifier, as features) and the
    rank correlation of requested and measured thickness and slant over `prompts`, per_prompt
    samples each (`images`, prompt by prompt). Prompts without requested levels (a caller's)
    get None for the correlations and a row per prompt instead (`prompt_rows`: accuracy, and
    mean measured thickness and slant on one-channel images). `reference`
    (evaluate.build_reference): the samples are also measured against real images
    (FIDELITY_KEYS: FID, IS, precision, recall; every process of `world` must call); without
    it those are None."""
    labels = prompts.labels.repeat_interleave(per_prompt)
    n = len(labels)
    _, logits = judge(images)
    right = (logits.argmax(1) == labels).float()
    row = {"scale": float(scale), "w": float(scale) - 1, "n": n,
           "class_accuracy": float(right.mean())}  # fmt: skip
    fidelity = measure(reference, images, labels, world) if reference is not None else {}
    row.update({k: fidelity.get(k) for k in FIDELITY_KEYS})
    ink = images.shape[1] == 1  # thickness and slant are measured on one-channel ink
    m = measure_attributes(images) if ink else None
    if prompts.levels:
        for key, want in (("thickness", prompts.thickness), ("slant", prompts.slant)):
            row[f"{key}_spearman"] = spearman(want.repeat_interleave(per_prompt).float(), m[key])
        return row
    row.update(thickness_spearman=None, slant_spearman=None)
    names = prompts.class_names
    row["prompt_rows"] = [
        {
            "prompt": p, "class": names[int(prompts.labels[j])],
            "class_accuracy": float(right[j * per_prompt : (j + 1) * per_prompt].mean()),
            **({
                k: float(m[k][j * per_prompt : (j + 1) * per_prompt].mean())
                for k in ("thickness", "slant")
            } if ink else {}),
        }
        for j, p in enumerate(prompts.prompts)
    ]  # fmt: skip
    return row


def at_one_scale(result: dict) -> dict:
    """text_adherence's record of a single scale as `cfgdiff eval` writes it: its row's scale,
    w and figures at the top level in place of `scales` and `rows`."""
    (row,) = result["rows"]
    rest = {k: v for k, v in result.items() if k not in ("scales", "rows", "n")}
    return {"scale": row["scale"], "w": row["w"], **rest, **row}
