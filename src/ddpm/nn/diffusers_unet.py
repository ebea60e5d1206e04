"""diffusers' ``UNet2DModel`` behind ddpm's network call ``(x_t, t[, cond]) -> out``.

The module holds the diffusers model as ``unet``, so its state dict is diffusers' own with the
prefix ``unet.``. diffusers is imported only when a network is built.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from ..config import DiffusersUNetConfig
from ..errors import DdpmError

PREFIX = "unet."  # the wrapper's state-dict keys: diffusers' own, under this prefix
INSTALL = "pip install 'ddpm[diffusers]'"
# fields of DiffusersUNetConfig that are not UNet2DModel arguments under the same name
OWN_FIELDS = ("arch", "channels", "learn_sigma", "grad_checkpoint", "num_classes", "class_emb_std")


def import_diffusers(what: str = "the diffusers-unet network") -> Any:
    """The diffusers package, or one line saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise DdpmError(f"{what} needs the diffusers package: {INSTALL}") from None
    return diffusers


def unet_kwargs(cfg: DiffusersUNetConfig, image_size: int | None = None) -> dict[str, Any]:
    """UNet2DModel's constructor arguments for ``cfg`` (what its config.json holds)."""
    kw = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in OWN_FIELDS}
    kw.update(in_channels=cfg.channels, out_channels=cfg.channels * (2 if cfg.learn_sigma else 1),
              num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
              block_out_channels=tuple(cfg.block_out_channels), down_block_types=tuple(cfg.down_block_types),
              up_block_types=tuple(cfg.up_block_types))
    if image_size is not None:
        kw["sample_size"] = image_size
    return kw


class DiffusersUNet(nn.Module):
    """UNet2DModel as a ddpm network: t is what the process gives (vp: the step index), cond (B,)
    long class indices in [0, num_classes] (num_classes: the null class; None: all null)."""

    def __init__(self, cfg: DiffusersUNetConfig):
        super().__init__()
        diffusers = import_diffusers()
        self.cfg = cfg
        self.unet = diffusers.UNet2DModel(**unet_kwargs(cfg))
        if cfg.num_classes:
            nn.init.normal_(self.unet.class_embedding.weight, std=cfg.class_emb_std)
        if cfg.grad_checkpoint:
            self.unet.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        labels = None
        if self.cfg.num_classes:
            labels = cond if cond is not None else torch.full((x.shape[0],), self.cfg.num_classes,
                                                              device=x.device, dtype=torch.long)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        return self.unet(x, t, class_labels=labels).sample


def check_diffusers_image_size(cfg: DiffusersUNetConfig, size: int) -> None:
    """Each block but the last halves the image: the size must be a multiple of 2^(blocks - 1)."""
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if size < factor or size % factor:
        raise DdpmError(f"image size {size} must be a multiple of {factor} for {len(cfg.block_out_channels)} "
                        f"diffusers blocks (each but the last halves it); try an --image-size of "
                        f"{max(factor, size // factor * factor)} or fewer --block-out-channels")
