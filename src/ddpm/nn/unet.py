"""The conditional U-Net noise predictor of the seed, built from :mod:`ddpm.nn.layers`.

Topology (as the seed's): an init 7x7 conv; per resolution two blocks, linear attention and
a down-sampling (none after the last); two blocks around full attention in the middle; per
resolution but the first, on the way up, two blocks over the concatenated skip, attention
and an up-sampling; a final block and 1x1 conv. The first resolution's skip is unused there.
``blocks_per_level`` (default 2, the seed's) sets the blocks per resolution, down and up; the
parameter names of the default are the seed's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, check_model_sizes
from ..errors import DdpmError
from .layers import (
    Attention, ConvNextBlock, LinearAttention, PreNormResidual, ResnetBlock,
    SinusoidalTimeEmbedding, downsample, upsample,
)


def resolved_out_channels(cfg: ModelConfig) -> int:
    """Output channels: out_dim or channels, doubled for learned variances."""
    out = cfg.out_dim if cfg.out_dim is not None else cfg.channels
    return out * 2 if cfg.learn_sigma else out


def check_unet_image_size(cfg: ModelConfig, size: int) -> None:
    """Raise a one-line DdpmError when the down-sampling cannot take ``size``."""
    factor = 2 ** (len(cfg.dim_mults) - 1)
    if size < factor or size % factor:
        raise DdpmError(
            f"image size {size} does not fit this U-Net: with {len(cfg.dim_mults)} resolutions "
            f"it must be a multiple of {factor} (try --image-size {max(factor, size // factor * factor)})"
        )


class UNet(nn.Module):
    """(x_t, t[, cond]) -> tensor of the output channels; knows nothing about the noise schedule."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_sizes(cfg)  # sizes it can be built from, in one line
        self.cfg = cfg
        init_dim = cfg.init_dim if cfg.init_dim is not None else cfg.dim // 3 * 2
        self.init_conv = nn.Conv2d(cfg.channels, init_dim, 7, padding=3)
        dims = [init_dim, *(cfg.dim * m for m in cfg.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = cfg.dim * 4 if cfg.with_time_emb else None
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(cfg.dim), nn.Linear(cfg.dim, time_dim), nn.GELU(),
            nn.Linear(time_dim, time_dim),
        ) if time_dim else None
        if cfg.num_classes < 0 or (cfg.num_classes and not time_dim):
            raise DdpmError(f"num_classes={cfg.num_classes} needs num_classes >= 0 and a time embedding")
        # classes 0..K-1 and the null class K (classifier-free guidance, Ho & Salimans 2022);
        # class_emb_std 0.02 (DiT's label table) starts close to the unconditional model, 1 (ADM's
        # nn.Embedding default) starts with the label as loud as the time embedding
        self.class_emb = nn.Embedding(cfg.num_classes + 1, time_dim) if cfg.num_classes else None
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=cfg.class_emb_std)

        def block(d_in: int, d_out: int, emb: int | None = time_dim) -> nn.Module:
            if cfg.use_convnext:
                return ConvNextBlock(d_in, d_out, time_emb_dim=emb, mult=cfg.convnext_mult)
            return ResnetBlock(d_in, d_out, time_emb_dim=emb, groups=cfg.resnet_block_groups,
                               scale_shift=cfg.resnet_scale_shift)

        def attn(d: int) -> nn.Module:
            if not cfg.linear_attn:
                return nn.Identity()
            return PreNormResidual(d, LinearAttention(d, cfg.attn_heads, cfg.attn_dim_head))

        n, k = len(in_out), cfg.blocks_per_level
        # each level: k blocks (the first changes the width), attention, resampling
        self.downs = nn.ModuleList(
            nn.ModuleList([block(d_in, d_out), *(block(d_out, d_out) for _ in range(k - 1)), attn(d_out),
                           downsample(d_out) if i < n - 1 else nn.Identity()])
            for i, (d_in, d_out) in enumerate(in_out)
        )
        self.ups = nn.ModuleList(
            nn.ModuleList([block(d_out * 2, d_in), *(block(d_in, d_in) for _ in range(k - 1)), attn(d_in),
                           upsample(d_in)])
            for d_in, d_out in reversed(in_out[1:])
        )
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = PreNormResidual(mid, Attention(mid, cfg.attn_heads, cfg.attn_dim_head))
        self.mid_block2 = block(mid, mid)
        # the seed writes block(dim, dim): the same when dim_mults[0] == 1, and right otherwise
        self.final_conv = nn.Sequential(block(dims[1], cfg.dim, None),
                                        nn.Conv2d(cfg.dim, resolved_out_channels(cfg), 1))

    def _run(self, fn: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) training steps, cond (B,) long class indices in [0, num_classes]
        (num_classes = the null class; None = all null). An unconditional net ignores cond."""
        x = self.init_conv(x)
        emb = self.time_mlp(t) if self.time_mlp is not None else None
        if self.class_emb is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.cfg.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(cond)
        skips = []
        for *blocks, attn, down in self.downs:
            for b in blocks:
                x = self._run(b, x, emb)
            x = attn(x)
            skips.append(x)
            x = down(x)
        x = self._run(self.mid_block1, x, emb)
        x = self.mid_attn(x)
        x = self._run(self.mid_block2, x, emb)
        for *blocks, attn, up in self.ups:
            x = torch.cat([x, skips.pop()], dim=1)
            for b in blocks:
                x = self._run(b, x, emb)
            x = up(attn(x))
        return self.final_conv(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
