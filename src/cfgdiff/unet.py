"""The network f(x_t, t, c): a UNet conditioned on a class label or a text embedding.

Owns: shapes, channels and the condition's embedding. For a class model (cfg.condition "class")
that is the label embedding table, whose extra last row (index num_classes) is the null label
used for classifier-free guidance. For a text model ("text") c is a (B, text_dim) sentence
embedding mapped by an MLP into the timestep embedding (FiLM: every residual block's scale and
shift read it); an all-zero row is the null condition, replaced by a learned vector `null_text`
(sentence embeddings are unit vectors, so no caption is all zero). It does not know the noise
schedule, the loss, what its output means (eps or v) or any guidance scale.
"""

from __future__ import annotations

import torch
from torch import nn

from cfgdiff.config import ModelConfig
from cfgdiff.layers import Attention, Downsample, ResBlock, Upsample, group_norm, timestep_embedding


def _normal(*shape: int, over: float = 1.0) -> torch.Tensor:
    """N(0, 1) values divided by `over`: the numbers torch.randn(shape) / over (and, over = 1,
    nn.Embedding's own init) would give. None on the meta device, where
    checkpoint.check_network_size counts parameters: meta tensors hold no values, and drawing
    them runs torch's Python reference kernels, whose first use imports torch._dynamo and sympy,
    seconds of every command that reads a checkpoint."""
    t = torch.empty(shape)
    return t if t.is_meta else t.normal_() / over


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
            self.null_text = nn.Parameter(_normal(cfg.text_dim, over=cfg.text_dim**0.5))
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
            mods.append(Attention(cout, self.cfg.num_heads))
        return nn.ModuleList(mods)

    def condition_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """(B, emb_ch) of the condition: a label's row, or a text embedding through the MLP (the
        learned null vector in place of all-zero rows)."""
        if self.cfg.condition == "class":
            return self.label_emb(y)
        null = (y == 0).all(dim=1, keepdim=True)  # (B, 1)
        c = torch.where(null, self.null_text.to(y.dtype), y)
        return self.text_mlp(c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps (float or int); y: the condition,
        (B,) labels in [0, num_classes], num_classes meaning "no label", or for a text model
        (B, text_dim) embeddings, an all-zero row meaning "no caption". Returns (B, C, H, W)."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        emb = emb + self.condition_embedding(y)
        if self.patch > 1:  # (B, C, H, W) -> (B, C p^2, H/p, W/p)
            x = torch.nn.functional.pixel_unshuffle(x, self.patch)
        h = self.conv_in(x)
        skips = [h]
        for mod in self.down:
            h = _apply(mod, h, emb)
            skips.append(h)
        for mod in self.mid:
            h = mod(h, emb) if isinstance(mod, ResBlock) else mod(h)
        for mod in self.up:
            if isinstance(mod, Upsample):
                h = mod(h)
            else:
                h = _apply(mod, torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
        return torch.nn.functional.pixel_shuffle(out, self.patch) if self.patch > 1 else out


def _apply(mod: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.ModuleList):  # ResBlock [+ Attention]
        h = mod[0](h, emb)
        for extra in mod[1:]:
            h = extra(h)
        return h
    return mod(h)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
