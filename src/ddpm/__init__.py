"""ddpm: denoising diffusion probabilistic models in PyTorch, as a library and a command.

The public names below load on first use (PEP 562), so ``import ddpm`` is cheap and changes
nothing in the caller's process; the ``ddpm`` command's entry point can make its process
settings (``ddpm.runtime.env``) before torch loads.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "DataConfig": "config", "DiffusionConfig": "config", "DiTConfig": "config", "ModelConfig": "config", "RunConfig": "config",
    "SampleConfig": "config", "TrainConfig": "config", "preset": "config",
    "load_dataset": "data", "load_fashion_mnist": "data", "load_image_folder": "data",
    "Denoiser": "core.diffusion", "q_sample": "core.diffusion", "training_losses": "core.diffusion",
    "NoiseSchedule": "core.schedules",
    "DdpmError": "errors",
    "DiT": "nn", "NETWORKS": "nn", "UNet": "nn", "build_network": "nn",
    "generate": "sampling.generate", "load_model": "sampling.generate",
    "inpaint": "sampling.editing", "edit": "sampling.editing", "RePaintConfig": "sampling.editing",
    "train": "training.train", "run_training": "training.run", "Trainer": "training.trainer",
    "noise_figure": "pictures.forward", "save_gif": "pictures.viz", "save_grid": "pictures.viz",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:  # a submodule: ddpm.config, ddpm.samplers, ... as after an eager import
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from .config import DataConfig, DiffusionConfig, DiTConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig, preset
    from .core.diffusion import Denoiser, q_sample, training_losses
    from .core.schedules import NoiseSchedule
    from .data import load_dataset, load_fashion_mnist, load_image_folder
    from .errors import DdpmError
    from .nn import NETWORKS, DiT, UNet, build_network
    from .pictures.forward import noise_figure
    from .pictures.viz import save_gif, save_grid
    from .sampling.generate import generate, load_model
    from .training.run import run_training
    from .training.train import train
    from .training.trainer import Trainer
