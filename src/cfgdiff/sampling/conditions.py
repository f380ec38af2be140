"""What a sampling job is conditioned on: one `Condition` type per kind of model.

Owns: turning what a user asks for (class names or indices, prompts, a negative class or
prompt) into the network's condition tensors (class labels, or caption embeddings), the rows'
names (a grid's row labels, an image folder's class folders), the guidance reference (the null
condition, or a negative class or prompt), the request options each kind reads, the metric that
judges it (metrics.judging's table is keyed by `metric`) and what output files record of it.
`Model` is a network to sample with what its conditions need (its caption table and, loaded
once when a prompt needs it, its text encoder).

A new kind of condition (an attribute vector, an image embedding) is one more Condition class
and its entry in CONDITIONS, keyed by config.ModelConfig.condition.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from cfgdiff.config import RunConfig
from cfgdiff.errors import ConfigError
from cfgdiff.pictures.images import PROMPT_LABEL_CHARS
from cfgdiff.sampling.guidance import Guidance
from cfgdiff.text.captions import class_words
from cfgdiff.text.embedding import TextConditions, check_encoder, embed_prompts

CLASS_LABEL_CHARS = 12  # of a class name as a grid's row label
_EMBEDDINGS_KEPT = 256  # prompt embeddings a Model keeps


@dataclass
class Model:
    """A network to sample (checkpoint.load_for_sampling's `net`, `cfg`, `path`), with a text
    model's caption table (text.embedding.run_caption_table: its captions need no encoder) and
    encoder, loaded once when a prompt outside the table needs it. Prompt embeddings are kept
    (a server embeds the same prompts again and again); safe to share between threads."""

    net: Any
    cfg: RunConfig
    path: Path
    captions: TextConditions | None = None
    encoder: Any = None
    skipped: tuple = ()  # checkpoint.Skipped: the run's checkpoints passed over for this one
    _kept: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, loaded) -> Model:
        """A loaded checkpoint or model file (checkpoint.Loaded), with its run's caption table
        for a text model."""
        captions = None
        if loaded.cfg.model.condition == "text":
            from cfgdiff.text.embedding import run_caption_table

            captions = run_caption_table(loaded.path)
        return cls(
            loaded.net, loaded.cfg, Path(loaded.path), captions,
            skipped=loaded.skipped,
        )  # fmt: skip

    @property
    def kind(self) -> type[Condition]:
        return CONDITIONS[self.cfg.model.condition]

    def load_encoder(self) -> None:
        """The model's text encoder, loaded once and checked against the model's record."""
        with self._lock:
            if self.encoder is None:
                from cfgdiff.text.encoder import load_encoder

                encoder = load_encoder(self.cfg.model.text_encoder)
                check_encoder(self.cfg.model, encoder)
                self.encoder = encoder

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, cond_dim) embeddings of prompts (text.embedding.embed_prompts); the newest
        _EMBEDDINGS_KEPT are kept, so a prompt asked for again needs no encoder."""
        with self._lock:
            found = {p: self._kept[p] for p in prompts if p in self._kept}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            table = self.captions
            if any(p and (table is None or p not in table.captions) for p in missing):
                self.load_encoder()
            rows = embed_prompts(missing, self.cfg.model, table, self.encoder)
            new = dict(zip(missing, rows, strict=True))
            found |= new
            with self._lock:
                for p, row in new.items():
                    if len(self._kept) >= _EMBEDDINGS_KEPT:
                        self._kept.pop(next(iter(self._kept)))
                    self._kept[p] = row
        if not prompts:
            return torch.zeros(0, self.cfg.model.cond_dim)
        return torch.stack([found[p] for p in prompts])


@dataclass(frozen=True)
class Asks:
    """What a user asks a job to be conditioned on, as given (names, not tensors): the rows
    (`classes` of a class model, `prompts` of a text model; None: one row per class) and the
    guidance reference (`negative_class`, `negative_prompt`; None: the null condition)."""

    classes: tuple[str, ...] | None = None
    prompts: tuple[str, ...] | None = None
    # a file of prompts: `cfgdiff sample`'s one per line, after `prompts`; eval's and sweep's
    # CLASS<TAB>prompt lines (metrics.adherence.labelled_prompts)
    prompts_file: Path | None = None
    negative_class: int | None = None
    negative_prompt: str | None = None

    def given(self) -> tuple[str, ...]:
        """The names of the fields set."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)


@dataclass(frozen=True)
class Condition:
    """The rows of a job, one condition each: `cond` (R, ...) is what the network reads of
    each row, `names` each row's name, `labels` (R,) the class each row asks for (None where
    that is not known: a prompt of the user's). Subclasses say which Asks fields they read
    (`options`), which metric judges them and how they set the guidance reference."""

    cond: torch.Tensor
    names: tuple[str, ...]
    labels: torch.Tensor | None

    kind: ClassVar[str]
    options: ClassVar[tuple[str, ...]]  # the Asks fields this kind reads
    metric: ClassVar[str]  # the name metrics.judging's table knows its judge by
    row_word: ClassVar[str]  # what a row is, in messages ("classes", "prompts")
    label_chars: ClassVar[int]  # of a row name as a grid's label

    @classmethod
    def check(cls, asks: Asks) -> None:
        """Refuse asks this kind does not read, in one line naming the first and the kinds
        that read it (a free-text value, a prompt, is not repeated)."""
        for name in asks.given():
            if name in cls.options:
                continue
            value = getattr(asks, name)
            said = f"`{name}`" if isinstance(value, str | tuple) else f"`{name}={value}`"
            kinds = [k for k, c in CONDITIONS.items() if name in c.options]
            raise ConfigError(
                f"{said}: only for {' or '.join(kinds)} models (a {cls.kind} model reads "
                f"{', '.join(f'`{o}`' for o in cls.options)})"
            )

    @classmethod
    def of(cls, model: Model, asks: Asks) -> Condition:
        """The rows asked for: a row per class, or per class or prompt asked for."""
        raise NotImplementedError

    @classmethod
    def of_labels(cls, model: Model, labels: torch.Tensor, asks: Asks) -> Condition:
        """A row per label of `labels` (R,), each the condition that stands for its class (an
        evaluation's rows)."""
        raise NotImplementedError

    def guided(self, guidance: Guidance) -> Guidance:
        """`guidance` with this condition's reference in place of the null."""
        return guidance

    def record(self) -> dict:
        """What output files say about the rows and the reference."""
        return {}

    def repeat(self, k: int) -> Condition:
        """Each row k times in a row (k images per row)."""
        return dataclasses.replace(
            self,
            cond=self.cond.repeat_interleave(k, dim=0),
            names=tuple(n for n in self.names for _ in range(k)),
            labels=None if self.labels is None else self.labels.repeat_interleave(k),
        )

    def __len__(self) -> int:
        return self.cond.shape[0]

    def row_labels(self) -> list[str]:
        """Each row's name as a grid's row label."""
        return [str(n)[: self.label_chars] for n in self.names]

    def file_classes(self, folder: bool = False) -> tuple[list[str], torch.Tensor]:
        """(class names, each row's index among them): the classes an .npz records, or
        (`folder`) a folder of images' class folders (`cfgdiff sample --out`)."""
        names = list(dict.fromkeys(self.names))
        return names, torch.tensor([names.index(n) for n in self.names], dtype=torch.long)


@dataclass(frozen=True)
class ClassLabels(Condition):
    """Rows of class labels; the reference is the null label or `negative_class`."""

    negative_class: int | None = None
    class_names: tuple[str, ...] = ()  # every class of the model, by label

    kind: ClassVar[str] = "class"
    options: ClassVar[tuple[str, ...]] = ("classes", "negative_class")
    metric: ClassVar[str] = "classes"
    row_word: ClassVar[str] = "classes"
    label_chars: ClassVar[int] = CLASS_LABEL_CHARS

    @classmethod
    def of(cls, model: Model, asks: Asks) -> ClassLabels:
        cls.check(asks)
        cfg = model.cfg
        wanted = (
            cfg.class_indices(list(asks.classes))
            if asks.classes is not None
            else list(range(cfg.model.num_classes))
        )
        return cls.of_labels(model, torch.tensor(wanted, dtype=torch.long), asks)

    @classmethod
    def of_labels(cls, model: Model, labels: torch.Tensor, asks: Asks) -> ClassLabels:
        cls.check(asks)
        names = model.cfg.label_names()
        labels = torch.as_tensor(labels, dtype=torch.long)
        rows = tuple(names[int(c)] for c in labels)
        return cls(labels, rows, labels, asks.negative_class, tuple(names))

    def file_classes(self, folder: bool = False) -> tuple[list[str], torch.Tensor]:
        """Every class of the model, and each row's label."""
        return list(self.class_names), self.labels

    def guided(self, guidance: Guidance) -> Guidance:
        if self.negative_class is None:
            return guidance
        return dataclasses.replace(guidance, negative_class=self.negative_class)


@dataclass(frozen=True)
class TextPrompts(Condition):
    """Rows of prompts, embedded (a caption of the run's table looked up, any other through
    the model's encoder); the reference is the null (all-zero) embedding or that of
    `negative_prompt`."""

    negative_prompt: str | None = None
    negative: torch.Tensor | None = None  # (cond_dim,) the negative prompt's embedding

    kind: ClassVar[str] = "text"
    options: ClassVar[tuple[str, ...]] = ("prompts", "prompts_file", "negative_prompt")
    metric: ClassVar[str] = "prompts"
    row_word: ClassVar[str] = "prompts"
    label_chars: ClassVar[int] = PROMPT_LABEL_CHARS

    @classmethod
    def of(cls, model: Model, asks: Asks) -> TextPrompts:
        """A row per prompt asked for; by default the prompt that stands for each class, its
        name as a word ("seven", "Sneaker")."""
        cls.check(asks)
        prompts = list(asks.prompts or ())
        if asks.prompts_file is not None:
            prompts += [line.strip() for line in read_lines(asks.prompts_file) if line.strip()]
        prompts = prompts or class_words(model.cfg.label_names())
        return cls.of_prompts(model, prompts, None, asks)

    @classmethod
    def of_labels(cls, model: Model, labels: torch.Tensor, asks: Asks) -> TextPrompts:
        words = class_words(model.cfg.label_names())
        labels = torch.as_tensor(labels, dtype=torch.long)
        return cls.of_prompts(model, [words[int(c)] for c in labels], labels, asks)

    @classmethod
    def of_prompts(
        cls, model: Model, prompts: Sequence[str], labels: torch.Tensor | None, asks: Asks
    ) -> TextPrompts:
        """Rows of `prompts`, each asking for the class of `labels` when known."""
        cls.check(asks)
        if not prompts:
            raise ConfigError("`prompt`: at least one prompt")
        neg = asks.negative_prompt
        # every prompt through the encoder at once, the negative one with them
        rows = model.embed([*prompts, *([neg] if neg is not None else [])])
        negative = rows[-1] if neg is not None else None
        return cls(rows[: len(prompts)], tuple(prompts), labels, neg, negative)

    def guided(self, guidance: Guidance) -> Guidance:
        if self.negative is None:
            return guidance
        return dataclasses.replace(guidance, negative_condition=self.negative)

    def record(self) -> dict:
        out: dict = {"prompts": list(dict.fromkeys(self.names))}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        return out

    def file_classes(self, folder: bool = False) -> tuple[list[str], torch.Tensor]:
        """The distinct prompts (a folder's: prompt-000, prompt-001, ..., since a prompt is no
        folder name) and each row's index among them."""
        names, index = super().file_classes()
        return ([f"prompt-{i:03d}" for i in range(len(names))] if folder else names), index


def read_lines(path: Path) -> list[str]:
    """A prompts file's lines (UTF-8, a byte-order mark dropped), or a ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"`prompts_file` {path}: cannot read it ({e})") from None


# Every kind of condition by config.ModelConfig.condition.
CONDITIONS: dict[str, type[Condition]] = {"class": ClassLabels, "text": TextPrompts}
