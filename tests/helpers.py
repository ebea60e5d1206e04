"""Shared test helpers: tiny made-up data, a tiny run config, the Gaussian oracle denoiser."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from ddpm.core.schedules import NoiseSchedule


def make_images(d: Path, n: int = 24, size: int = 12) -> Path:
    """n grey PNGs of a bright rectangle at a few positions."""
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((size, size), np.uint8)
        a[2 + i % 4: 8 + i % 4, 3:9] = 200 + rng.integers(0, 55)
        Image.fromarray(a).save(d / f"img{i:02d}.png")
    return d


def tiny_config(image_dir: Path, **train_opts: Any) -> RunConfig:
    """A 65k-parameter U-Net on 8x8 images: a step takes milliseconds."""
    return RunConfig(
        model=ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=1, attn_dim_head=8, channels=1),
        diffusion=DiffusionConfig(timesteps=20),
        data=DataConfig(source=str(image_dir), image_size=8, channels=1),
        train=TrainConfig(**{"batch_size": 8, "epochs": None, "max_steps": 4, "checkpoint_every": 2,
                             "sample_every": 0, "sample_n": 4, "log_every": 1, **train_opts}),
        preset="tiny",
    )


def write_config(path: Path, cfg: RunConfig) -> Path:
    path.write_text(cfg.to_json())
    return path


def oracle_eps_net(s: NoiseSchedule, mu: float, sd: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """E[eps | x_t] for data N(mu, sd^2) per dimension: sqrt(1 - a)(x - sqrt(a) mu) / (a sd^2 + 1 - a)."""
    ab = s.alpha_bar.double()

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sd**2 + 1 - a)).float()

    return net
