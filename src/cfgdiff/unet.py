"""The network f(x_t, t, c): a UNet conditioned on a class label or a text embedding.

Owns: shapes, channels and the condition's embedding. For a class model (cfg.condition "class")
that is the label embedding table, whose extra last row (index num_classes) is the null label
used for classifier-free guidance. For a text model ("text") c is a (B, text_dim) sentence
embedding mapped by an MLP into the timestep embedding (FiLM: every residual block's scale and
shift read it); an all-zero row is the null condition, replaced by a learned vector `null_text`
(sentence embeddings are unit vectors, so no caption is all zero). A text model that reads
tokens (cfg.text_tokens N > 0) takes (B, N * text_dim), a caption's token embeddings laid end to
end with zero rows after its last token: their normalised sum (the encoder's pooled embedding)
goes through FiLM as above, and a cross-attention layer after every self-attention layer reads
the tokens (the null caption: one learned token, `null_token`). It does not know the noise
schedule, the loss, what its output means (eps or v) or any guidance scale.
"""

from __future__ import annotations

import torch
from torch import nn

from cfgdiff.config import ModelConfig
from cfgdiff.layers import (
    Attention,
    CrossAttention,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
)


def _normal(*shape: int, over: float = 1.0) -> torch.Tensor:
    """N(0, 1) values divided by `over`: the numbers torch.randn(shape) / over (and, over = 1,
    nn.Embedding's own init) would give. None on the meta device, where
    checkpoint.check_network_size counts parameters: meta tensors hold no values, and drawing
    them runs torch's Python reference kernels, whose first use imports torch._dynamo and sympy,
    seconds of every command that reads a checkpoint."""
    t = torch.empty(shape)
    return t if t.is_meta else t.normal_() / over


# E[SiLU(z)^2] for z ~ N(0, 1) (numerical integral: 0.3555)
_SILU_SECOND_MOMENT = 0.3555


def _init_text_mlp(mlp: nn.Sequential) -> None:
    """Start the text MLP where a class model's label table starts: a unit-length embedding
    comes out as about N(0, 1) per component (the label rows' scale), so the caption weighs in
    the sum with the timestep embedding from the first step. The first layer is N(0, 1) (a unit
    vector in gives N(0, 1) pre-activations), the second N(0, 1 / (E[SiLU(z)^2] emb_ch)), the
    biases zero. torch's default (uniform of std 1 / sqrt(3 fan_in)) starts the caption about 90x
    smaller than the label rows, and a text model then learns the digit far more slowly
    (docs/text.md, "Starting the caption at the label's scale")."""
    first, last = mlp[0], mlp[2]
    with torch.no_grad():
        for layer, std in ((first, 1.0), (last, (_SILU_SECOND_MOMENT * last.in_features) ** -0.5)):
            w = _normal(*layer.weight.shape)
            if w.is_meta:
                return
            layer.weight.copy_(w * std)
            layer.bias.zero_()


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch0 = cfg.base_channels
        emb_ch = 4 * ch0
        self.null_label = cfg.num_classes
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.condition == "class":
            rows = cfg.num_classes + 1  # last row: the null label
            self.label_emb = nn.Embedding(rows, emb_ch, _weight=_normal(rows, emb_ch))
        else:
            self.text_mlp = nn.Sequential(
                nn.Linear(cfg.text_dim, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
            )
            _init_text_mlp(self.text_mlp)
            self.null_text = nn.Parameter(_normal(cfg.text_dim, over=cfg.text_dim**0.5))
            if cfg.text_tokens:  # the null caption's one token, for cross-attention
                self.null_token = nn.Parameter(_normal(cfg.text_dim, over=cfg.text_dim**0.5))
        self.patch = cfg.patch_size
        pixels = cfg.in_channels * self.patch**2  # channels of the (unshuffled) input
        self.conv_in = nn.Conv2d(pixels, ch0, 3, padding=1)

        # Down path: record the channel count of every skip connection.
        self.down = nn.ModuleList()
        skip_chs = [ch0]
        ch = ch0
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            out = ch0 * mult
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._block(ch, out, emb_ch, level in cfg.attn_levels))
                ch = out
                skip_chs.append(ch)
            if level < levels - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_ch, cfg.dropout), Attention(ch, cfg.num_heads)]
            + self._cross_attention(ch)
            + [ResBlock(ch, ch, emb_ch, cfg.dropout)]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            out = ch0 * cfg.channel_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(
                    self._block(ch + skip_chs.pop(), out, emb_ch, level in cfg.attn_levels)
                )
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
        assert not skip_chs

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, pixels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _block(self, cin: int, cout: int, emb_ch: int, attn: bool) -> nn.ModuleList:
        mods: list[nn.Module] = [ResBlock(cin, cout, emb_ch, self.cfg.dropout)]
        if attn:
            mods += [Attention(cout, self.cfg.num_heads), *self._cross_attention(cout)]
        return nn.ModuleList(mods)

    def _cross_attention(self, ch: int) -> list[nn.Module]:
        """A cross-attention layer to the caption's tokens where a model reads tokens."""
        cfg = self.cfg
        return [CrossAttention(ch, cfg.text_dim, cfg.num_heads)] if cfg.text_tokens else []

    def condition_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """(B, emb_ch) of the condition: a label's row, or a text embedding through the MLP (the
        learned null vector in place of all-zero rows; a token model's pooled embedding, the
        normalised sum of its tokens, which is what the encoder pools)."""
        if self.cfg.condition == "class":
            return self.label_emb(y)
        if self.cfg.text_tokens:
            y = torch.nn.functional.normalize(self._tokens(y).sum(dim=1), dim=1)
        null = (y == 0).all(dim=1, keepdim=True)  # (B, 1)
        c = torch.where(null, self.null_text.to(y.dtype), y)
        return self.text_mlp(c)

    def _tokens(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], self.cfg.text_tokens, self.cfg.text_dim)

    def context(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A token model's cross-attention context: (B, N, text_dim) tokens and the (B, N) mask
        of those to attend to (all-zero rows are padding). The null caption (an all-zero
        condition) attends to the one learned token `null_token`. None for other models."""
        if not (self.cfg.condition == "text" and self.cfg.text_tokens):
            return None
        tokens = self._tokens(y)
        mask = (tokens != 0).any(dim=2)  # (B, N)
        null = ~mask.any(dim=1)  # (B,)
        first = torch.zeros_like(mask[0])
        first[0] = True
        null_tokens = torch.zeros_like(tokens[0])
        null_tokens[0] = self.null_token.to(tokens.dtype)
        tokens = torch.where(null[:, None, None], null_tokens, tokens)
        # the null's mask is `first`, in logical ops (ONNX Runtime has no boolean Where)
        return tokens, mask | (null[:, None] & first)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps (float or int); y: the condition,
        (B,) labels in [0, num_classes], num_classes meaning "no label", or for a text model
        (B, cond_dim) embeddings, an all-zero row meaning "no caption". Returns (B, C, H, W)."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        emb = emb + self.condition_embedding(y)
        ctx = self.context(y)
        if self.patch > 1:  # (B, C, H, W) -> (B, C p^2, H/p, W/p)
            x = torch.nn.functional.pixel_unshuffle(x, self.patch)
        h = self.conv_in(x)
        skips = [h]
        for mod in self.down:
            h = _apply(mod, h, emb, ctx)
            skips.append(h)
        h = _apply(self.mid, h, emb, ctx)
        for mod in self.up:
            if isinstance(mod, Upsample):
                h = mod(h)
            else:
                h = _apply(mod, torch.cat([h, skips.pop()], dim=1), emb, ctx)
        out = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
        return torch.nn.functional.pixel_shuffle(out, self.patch) if self.patch > 1 else out


def _apply(mod: nn.Module, h: torch.Tensor, emb: torch.Tensor, ctx) -> torch.Tensor:
    """A block (a ModuleList of ResBlocks, Attention and CrossAttention; `ctx` the latter's
    (tokens, mask)) or a resampling layer."""
    if isinstance(mod, nn.ModuleList):
        for layer in mod:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttention):
                h = layer(h, *ctx)
            else:
                h = layer(h)
        return h
    return mod(h)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
