"""Text conditions: the caption table of a text model, and prompts turned into embeddings.

Owns: `TextConditions` (every distinct training caption with its sentence embedding, computed
once when a run starts, the encoder's record, and the caption set's phrasings), its file
(captions.safetensors in the run folder: the table, with captions and records as JSON in the
format's string metadata, no pickle), the training condition of a batch (a caption row per image
drawn from its group's training phrasings, generated or from a folder's captions.txt: a table
lookup, no encoder in the step, with filler words added to some for a token model), and
prompts -> embeddings for sampling (a known caption from the table; a new one through the
encoder the model was trained with, refused when another encoder is installed). "" is the
null condition (the all-zero embedding). It knows nothing about the loss or guidance scales.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cfgdiff.config import ModelConfig
from cfgdiff.errors import CheckpointError, ConfigError
from cfgdiff.files import atomic_write_bytes
from cfgdiff.run_layout import CAPTIONS_FILE
from cfgdiff.text.captions import FILLER_WORDS, CaptionSet, dataset_captions
from cfgdiff.text.encoder import TextEncoder, load_encoder


def check_encoder(model: ModelConfig, encoder: TextEncoder) -> None:
    """Refuse an encoder other than the one `model` was trained with."""
    want = {"name": model.text_encoder, "sha256": model.text_encoder_sha256, "dim": model.text_dim}
    if encoder.record() != want:
        raise CheckpointError(
            f"the model was trained with text encoder {want}, this one is {encoder.record()}; "
            "prompts it encodes would mean nothing to the model"
        )


@dataclass
class TextConditions:
    captions: tuple[str, ...]  # distinct captions, row i of `table`
    table: torch.Tensor  # (K, cond_dim) float32: unit embeddings, or token embeddings (text_tokens)
    encoder: dict  # {"name", "sha256", "dim"}
    caption_set: CaptionSet | None = None  # how training draws captions (None when loaded)
    caption_record: dict | None = None
    # filler words (a token model's training only): the probability a caption gets some, and
    # each word's token embeddings (W, text_tokens, dim), zero rows after its last token
    filler_words: float = 0.0
    filler: torch.Tensor | None = None

    @classmethod
    def for_dataset(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        model,
        folder: Path | None = None,
        filler_words: float = 0.0,
        image_captions: tuple[Sequence[str | None], str] | None = None,
    ) -> tuple[TextConditions, torch.Tensor]:
        """The table of a dataset's captions, encoded once, and the group of every image.
        folder: a folder dataset's root, whose captions.txt gives the captions when it has one
        (text/captions.py). filler_words: the probability that a training caption gets filler
        words (a token model's; DiffusionConfig.filler_words), encoded here too. image_captions:
        (each image's caption or None, the data's name) for data with a caption per image."""
        cs, groups = dataset_captions(images, labels, class_names, folder, image_captions)
        encoder = load_encoder(model.text_encoder)
        check_encoder(model, encoder)
        table = encode_for(model, encoder, list(cs.captions))
        filler = None
        if filler_words:
            n = model.text_tokens
            filler = encoder.encode_tokens(list(FILLER_WORDS), n).reshape(-1, n, encoder.dim)
        record = cs.to_record()
        return cls(cs.captions, table, encoder.record(), cs, record, filler_words, filler), groups

    # --- training: a caption row per image, drawn from its group's training phrasings
    def training_condition(
        self, groups: torch.Tensor, gen: torch.Generator, part: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """(B, D) embeddings: for each image's group a training phrasing drawn uniformly with
        `gen` (the training generator, so a resumed run draws the same captions). Groups with
        phrasings of their own number (a captions file's) draw among their own. part: (first,
        B) when `groups` are rows [first, first + b) of a global batch of B split over
        processes: the draws are made for all B rows and this part's kept, as
        diffusion.training_loss does, so any number of processes draws what one does."""
        cs, dev = self.caption_set, groups.device
        first, total = (0, groups.shape[0]) if part is None else part
        mine = slice(first, first + groups.shape[0])
        rows = cs.rows.to(dev)  # (groups, phrasings)
        if cs.counts is None:  # every group has every phrasing
            j = torch.randint(rows.shape[1], (total,), generator=gen, device=dev)[mine]
        else:
            n = cs.counts.to(dev)[groups]
            u = torch.rand((total,), generator=gen, device=dev)[mine]
            j = torch.minimum((u * n).long(), n - 1)
        c = self.table.to(dev)[rows[groups, j]]
        if self.filler_words:
            c = add_filler_words(c, self.filler.to(dev), self.filler_words, gen, part)
        return c

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings of the caption that stands for each class (its name as a word:
        "seven", "Sneaker"; a captions file's first caption of the class), for previews."""
        return self.table[self.caption_set.class_rows()[labels.cpu()]].cpu()

    # --- the file
    def save(self, path: Path) -> None:
        from safetensors.torch import save

        meta = {
            "captions": json.dumps(list(self.captions)),
            "encoder": json.dumps(self.encoder),
            "caption_set": json.dumps(self.caption_record or {}),
        }
        atomic_write_bytes(path, save({"table": self.table.cpu().contiguous()}, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> TextConditions:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                table = f.get_tensor("table").float()
            captions = tuple(json.loads(meta["captions"]))
            encoder = json.loads(meta["encoder"])
            record = json.loads(meta.get("caption_set", "{}"))
        except Exception as e:  # a damaged file: safetensors, JSON or a missing key
            raise CheckpointError(f"{path}: not a caption table ({type(e).__name__})") from None
        if (
            table.ndim != 2
            or table.shape[0] != len(captions)
            or not all(isinstance(c, str) for c in captions)
        ):
            raise CheckpointError(f"{path}: its table does not match its captions")
        return cls(captions, table, encoder, None, record)

    # --- sampling: prompts -> embeddings
    def embed(self, prompts: Sequence[str], model: ModelConfig) -> torch.Tensor:
        """(N, D): "" the null (zeros); a caption of the table its row; any other prompt through
        the model's encoder (the `text` extra), checked against the model's record."""
        return embed_prompts(prompts, model, self)


MAX_FILLER = 3  # the most filler words a training caption gets


def add_filler_words(
    c: torch.Tensor,
    filler: torch.Tensor,
    p: float,
    gen: torch.Generator,
    part: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Token conditions c (B, n * dim) with, with probability p each, 1 to MAX_FILLER words of
    `filler` (W, n, dim: each word's tokens, then zero rows) written after the caption's last
    token, a word only where it fits whole in the n slots. The model reads the tokens as a bag
    (no position embedding), so after the caption is as good as anywhere. Draws from `gen` the
    same numbers whatever it adds. The null condition (all zeros) gets none. part: as
    TextConditions.training_condition's (the draws of the global batch, this part's kept)."""
    B, (_, n, dim), dev = c.shape[0], filler.shape, c.device
    first, total = (0, B) if part is None else part
    mine = slice(first, first + B)
    x = c.reshape(B, n, dim).clone()
    nonzero = x.ne(0).any(2)  # (B, n)
    used = torch.where(nonzero.any(1), n - nonzero.flip(1).int().argmax(1), 0)  # last token + 1
    add = (torch.rand(total, generator=gen, device=dev)[mine] < p) & (used > 0)
    k = torch.randint(1, MAX_FILLER + 1, (total,), generator=gen, device=dev)[mine]
    w = torch.randint(filler.shape[0], (total, MAX_FILLER), generator=gen, device=dev)[mine]
    slot = torch.arange(MAX_FILLER, device=dev)
    length = filler.ne(0).any(2).sum(1)[w] * ((slot < k[:, None]) & add[:, None])  # (B, M)
    start = used[:, None] + length.cumsum(1) - length
    length = length * (start + length <= n)  # a word that does not fit whole is left out
    t = torch.arange(n, device=dev)
    keep = t < length[..., None]  # (B, M, n): token t of word m is written
    b = torch.arange(B, device=dev)[:, None, None].expand_as(keep)
    x[b[keep], (start[..., None] + t)[keep]] = filler[
        w[..., None].expand_as(keep)[keep], t.expand_as(keep)[keep]
    ]
    return x.reshape(B, n * dim)


def encode_for(model: ModelConfig, encoder: TextEncoder, captions: list[str]) -> torch.Tensor:
    """(N, model.cond_dim): what `model` reads of each caption, its pooled embedding or (a
    cross-attention model) its first text_tokens token embeddings."""
    if model.text_tokens:
        return encoder.encode_tokens(captions, model.text_tokens)
    return encoder.encode(captions)


def embed_prompts(
    prompts: Sequence[str],
    model: ModelConfig,
    table: TextConditions | None = None,
    encoder: TextEncoder | None = None,
) -> torch.Tensor:
    """(N, cond_dim) embeddings of `prompts` for text model `model` (see TextConditions.embed);
    `table`: a run's caption table, so that its captions need no encoder; `encoder`: the
    model's, already loaded (a server keeps one), else it is loaded when a prompt needs it."""
    if model.condition != "text":
        raise ConfigError("`prompt` is for text models; this model takes class labels")
    if table is not None and table.encoder != {
        "name": model.text_encoder,
        "sha256": model.text_encoder_sha256,
        "dim": model.text_dim,
    }:
        raise CheckpointError("the caption table was encoded with another encoder than the model's")
    if table is not None and table.table.shape[1] != model.cond_dim:
        raise CheckpointError(
            f"the caption table has {table.table.shape[1]} numbers per caption, the model reads "
            f"{model.cond_dim}"
        )
    out = torch.zeros(len(prompts), model.cond_dim)
    index = {c: i for i, c in enumerate(table.captions)} if table is not None else {}
    new = [p for p in dict.fromkeys(prompts) if p and p not in index]
    encoded: dict[str, torch.Tensor] = {}
    if new:
        encoder = encoder or load_encoder(model.text_encoder)
        check_encoder(model, encoder)
        encoded = dict(zip(new, encode_for(model, encoder, new), strict=True))
    for i, p in enumerate(prompts):
        if p in index:
            out[i] = table.table[index[p]]
        elif p:
            out[i] = encoded[p]
    return out


def run_caption_table(path: Path) -> TextConditions | None:
    """The caption table of the run a checkpoint folder belongs to (RUN/checkpoints/step-N ->
    RUN/captions.safetensors), or None (a model file, or a run without one)."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / CAPTIONS_FILE).is_file():
            return TextConditions.load(folder / CAPTIONS_FILE)
    return None
