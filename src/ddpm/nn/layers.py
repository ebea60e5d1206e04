"""Building blocks of the U-Net: time embedding, ResNet and ConvNeXt blocks, attention.

Nothing here knows about betas or timesteps beyond the number it embeds (DESIGN rule 4).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer positional encoding of t (Vaswani et al. Sec. 3.5), sin half then cos half."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        # t: integer steps or real-valued times of either sign (a continuous process's own scale)
        args = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ConvNormAct(nn.Module):
    """3x3 conv, GroupNorm, optional FiLM scale/shift, SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two conv blocks with the time embedding added in between (or as scale/shift)."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None,
                 groups: int = 8, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        emb_out = dim_out * 2 if scale_shift else dim_out
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, emb_out)) if time_emb_dim else None
        self.block1 = ConvNormAct(dim, dim_out, groups)
        self.block2 = ConvNormAct(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.mlp is not None and t_emb is not None:
            emb = self.mlp(t_emb)[:, :, None, None]
            if self.scale_shift:
                h = self.block1(x, emb.chunk(2, dim=1))
            else:
                h = self.block1(x) + emb
        else:
            h = self.block1(x)
        return self.block2(h) + self.res_conv(x)


class ConvNextBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) as the seed uses it: depthwise 7x7, time added, MLP."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None,
                 mult: int = 2, norm: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_emb_dim, dim)) if time_emb_dim else None
        self.ds_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim) if norm else nn.Identity(),
            nn.Conv2d(dim, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ds_conv(x)
        if self.mlp is not None and t_emb is not None:
            h = h + self.mlp(t_emb)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


def _qkv_tokens(proj: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as (B, N, heads*d) pixel-major tensors, from the three thirds of ``proj``.

    One 1x1 conv per third rather than one conv split afterwards: then no (B, 3*heads*d, H, W)
    tensor exists, whose split's backward would concatenate the three gradients into a fresh
    buffer and copy it to the input's layout (on CPU, fresh large buffers are what cost).
    With a channels-last input each result is already (B, N, C) in memory: a free view."""
    biases = proj.bias.chunk(3) if proj.bias is not None else (None,) * 3
    return tuple(F.conv2d(x, w, b).flatten(2).transpose(1, 2) for w, b in zip(proj.weight.chunk(3), biases))


def _tokens_to_image(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, C, H, W) in ``like``'s memory layout (a view when it is channels-last)."""
    img = t.transpose(1, 2).unflatten(2, like.shape[-2:])
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return img if channels_last else img.contiguous()


class Attention(nn.Module):
    """Full multi-head self-attention over pixels, through scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(2, (self.heads, self.dim_head)).transpose(1, 2)  # (B, heads, N, d)
                   for t in _qkv_tokens(self.to_qkv, x))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N, heads*d)
        return self.to_out(_tokens_to_image(out, x))


class LinearAttention(nn.Module):
    """Linear attention (Shen et al. 2018): softmax over features for q, over pixels for k."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim_head
        q, k, v = _qkv_tokens(self.to_qkv, x)  # 3 x (B, N, heads*d)
        q = q.unflatten(2, (self.heads, d)).softmax(dim=-1).flatten(2)
        k = k.softmax(dim=1)
        # Per head, on strided 3-d views: context = k^T v (B, d, e), out = q context (B, N, e).
        # A 4-d matmul over (B, heads) would first copy q, k and v into head-major order. The
        # scale of q goes on the small context instead of the (B, N, heads*d) q.
        out = torch.cat([qh @ ((kh.transpose(1, 2) @ vh) * self.scale)
                         for qh, kh, vh in zip(q.split(d, 2), k.split(d, 2), v.split(d, 2))], dim=2)
        return self.to_out(_tokens_to_image(out, x))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(1)(x)): attention behind a pre-norm and a residual."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn  # registered before the norm, so state-dict order matches the seed's
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


def downsample(dim: int) -> nn.Module:
    """Halve the resolution with a strided 4x4 conv."""
    return nn.Conv2d(dim, dim, 4, 2, 1)


def upsample(dim: int) -> nn.Module:
    """Double the resolution with a 4x4 transposed conv."""
    return nn.ConvTranspose2d(dim, dim, 4, 2, 1)
