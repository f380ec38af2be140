"""Building blocks of the UNet: timestep embedding, residual block with scale-shift modulation,
self-attention, resampling. Pure nn.Modules; nothing here knows about diffusion or labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. / DDPM.

    t: (B,) -> (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    while channels // groups < 4 and groups > 1:  # at least 4 channels per group
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the embedding applied as scale-shift modulation
    h = norm(h) * (1 + scale) + shift (Dhariwal & Nichol 2021, "AdaGN")."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over spatial positions, pre-norm, residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            num_heads = 1
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj(h)


class CrossAttention(nn.Module):
    """Multi-head attention from spatial positions (queries) to a caption's token embeddings
    (keys and values), pre-norm, residual, zero-initialised output (a new model starts as if
    it were absent). `mask` (B, N) marks the tokens to attend to (False: padding)."""

    def __init__(self, channels: int, context_dim: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            num_heads = 1
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.context_norm = nn.LayerNorm(context_dim)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads, n = self.num_heads, context.shape[1]
        q = self.q(self.norm(x)).reshape(b, heads, c // heads, hgt * wid).transpose(-1, -2)
        kv = self.kv(self.context_norm(context)).reshape(b, n, 2, heads, c // heads)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, C/heads)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _expand2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling as expand + reshape: the form traced under torch.compile."""
    b, c, h, w = x.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    # channels_last in, channels_last out (as F.interpolate): the same in the NHWC view, where
    # the reshape needs no copy-back to NCHW.
    nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, h, 2, w, 2, c)
    return nhwc.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class _NearestUp2x(torch.autograd.Function):
    """expand + reshape forward, the native nearest-upsampling kernel backward: autograd's own
    backward of the expand is a sum over two strided axes, ~8x slower on the CPU than
    upsample_nearest2d_backward (23 against 2.8 ms for 64x64x28x28 bf16 gradients; forward +
    backward 2.5-3.3x, a cpu-demo bf16 training step 1.03-1.09x: bench/upsample.py). Both sum
    the same four values (rounded in another order in fp32)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _expand2x(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.in_shape = tuple(inputs[0].shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = ctx.in_shape
        return torch.ops.aten.upsample_nearest2d_backward(grad, [2 * h, 2 * w], [b, c, h, w])


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, equal to F.interpolate(x, scale_factor=2, mode="nearest")
    to the bit, written as expand + reshape: torch 2.13's CPU inductor under bf16 autocast
    returns a zero gradient through F.interpolate's backward here, which cut every parameter
    below the finest resolution off from the loss (docs/DESIGN.md, "Compilation policy").
    Under torch.compile the plain expand + reshape is traced (inductor fuses its backward sum);
    eagerly its backward is the native kernel (_NearestUp2x)."""
    if torch.compiler.is_compiling():
        return _expand2x(x)
    return _NearestUp2x.apply(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest2x(x))
