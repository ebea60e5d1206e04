"""The diffusion transformer, DiT (Peebles & Xie 2023), with adaLN-Zero conditioning.

The image is cut into patch x patch tokens (a convolution of that kernel and stride), given a
fixed 2-D sine-cosine position, and passed through ``depth`` pre-norm transformer blocks whose
LayerNorms are modulated by the time embedding plus the class embedding (adaLN). Every
modulation and the final linear start at zero (adaLN-Zero, the paper's Sec. 3.2): each block
starts as the identity and the network as the zero function. The tokens are put back into an
image of the output channels (the image's, doubled by learn_sigma).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DiTConfig, check_model_sizes
from .layers import SinusoidalTimeEmbedding

TIME_FREQS = 256  # sinusoidal features of t before the MLP, as the paper's TimestepEmbedder


def sincos_2d(hidden: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, hidden) fixed position embedding, row-major: half the features the row, half the
    column, each the sin and cos of the transformer's frequencies (MAE's get_2d_sincos_pos_embed)."""
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * omega  # (h, quarter)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * omega  # (w, quarter)
    emb = torch.cat([rows.sin()[:, None].expand(h, w, quarter), rows.cos()[:, None].expand(h, w, quarter),
                     cols.sin()[None].expand(h, w, quarter), cols.cos()[None].expand(h, w, quarter)], dim=-1)
    return F.pad(emb.reshape(h * w, 4 * quarter), (0, hidden - 4 * quarter))  # a hidden not a multiple of 4


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) shifted and scaled per image by (B, D) vectors from the condition."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm self-attention and MLP, each modulated and gated by the condition (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(2, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, d)
                   for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """(x_t, t[, cond]) -> tensor of the output channels; knows nothing about the noise process."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        check_model_sizes(cfg)  # sizes it can be built from (hidden a multiple of heads ...), in one line
        self.cfg = cfg
        d, p = cfg.hidden, cfg.patch_size
        self.out_channels = cfg.channels * (2 if cfg.learn_sigma else 1)
        self.patchify = nn.Conv2d(cfg.channels, d, p, stride=p)
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(TIME_FREQS), nn.Linear(TIME_FREQS, d), nn.SiLU(),
                                      nn.Linear(d, d))
        # classes 0..K-1 and the null class K (classifier-free guidance), as the U-Net's
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, p * p * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's: Xavier-uniform linears (and patch embedding, seen as a linear), the time
        MLP and label table at std 0.02, and zero for every adaLN modulation and the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patchify.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        for layer in (self.time_mlp[1], self.time_mlp[3]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=self.cfg.class_emb_std)
        for ada in [b.ada for b in self.blocks] + [self.final_ada]:
            nn.init.zeros_(ada[1].weight)
            nn.init.zeros_(ada[1].bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def _run(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) the process's time as the network sees it: training steps
        (long) or any real number (float; e.g. 1000 t or EDM's ln(sigma) / 4), cond (B,) long
        class indices in [0, num_classes] (num_classes = the null class; None = all null).
        An unconditional net ignores cond."""
        b = x.shape[0]
        p = self.cfg.patch_size
        tokens = self.patchify(x)  # (B, D, H/p, W/p)
        gh, gw = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = tokens + sincos_2d(self.cfg.hidden, gh, gw, x.device).to(tokens.dtype)
        c = self.time_mlp(t)
        if self.class_emb is not None:
            if cond is None:
                cond = torch.full((b,), self.cfg.num_classes, device=x.device, dtype=torch.long)
            c = c + self.class_emb(cond)
        for block in self.blocks:
            tokens = self._run(block, tokens, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))  # (B, N, p*p*C_out)
        out = out.reshape(b, gh, gw, p, p, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, gh * p, gw * p)

