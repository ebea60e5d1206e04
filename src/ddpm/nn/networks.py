"""The networks: one entry per architecture, and the one constructor every caller uses.

A config names its network by ``arch`` (:data:`ddpm.config.AnyModelConfig`); training,
sampling, distillation, the memory estimate and export all build it through
:func:`build_network`, so that a new network is one file and one entry here.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import nn

from ..config import DiffusersUNetConfig, DiTConfig, ModelConfig, check_patch_size
from ..errors import DdpmError
from ..files import shorten
from .diffusers_unet import DiffusersUNet, check_diffusers_image_size
from .dit import DiT
from .unet import UNet, check_unet_image_size


class NetworkSpec(NamedTuple):
    config: type  # its config dataclass (whose ``arch`` is the key)
    build: Callable[[Any], nn.Module]
    check_image_size: Callable[[Any, int], None]  # one line where the network cannot take that size
    title: str  # as messages name it
    summary: str  # one line, for the docs and the help


NETWORKS: dict[str, NetworkSpec] = {
    "unet": NetworkSpec(ModelConfig, UNet, check_unet_image_size, "U-Net",
                        "the seed's U-Net: ResNet or ConvNeXt blocks, linear attention, full attention in the middle"),
    "dit": NetworkSpec(DiTConfig, DiT, check_patch_size, "DiT",
                       "a diffusion transformer (Peebles & Xie 2023): patches, adaLN-Zero transformer blocks"),
    "diffusers-unet": NetworkSpec(DiffusersUNetConfig, DiffusersUNet, check_diffusers_image_size, "diffusers UNet2DModel",
                                  "diffusers' UNet2DModel itself (pip install 'ddpm[diffusers]'); exports to a "
                                  "diffusers pipeline"),
}


def network_spec(model_cfg: Any) -> NetworkSpec:
    """The table's entry for a model config, or a one-line DdpmError naming the choices."""
    arch = getattr(model_cfg, "arch", None)
    if arch not in NETWORKS or type(model_cfg) is not NETWORKS[arch].config:
        raise DdpmError(f"unknown network {shorten(arch)}; choose one of: {', '.join(NETWORKS)}")
    return NETWORKS[arch]


def build_network(model_cfg: Any) -> nn.Module:
    """The network a model config describes (fresh weights), with torch's complaints about
    impossible sizes (e.g. a --dim the group norm cannot split) turned into one line."""
    spec = network_spec(model_cfg)
    try:
        return spec.build(model_cfg)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
        raise DdpmError(f"cannot build the {spec.title} from this model config: {e}") from None


def check_image_size(model_cfg: Any, size: int) -> None:
    """Raise a one-line DdpmError when the network cannot take ``size`` pixels a side."""
    network_spec(model_cfg).check_image_size(model_cfg, size)
