"""From a checkpoint to images: load the model, run a sampler in batches, record frames."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..checkpoint import load_checkpoint, load_into
from ..config import RunConfig, SampleConfig, check_sample_config as check_config
from ..data.readers import from_model_range
from ..core.diffusion import Denoiser
from ..errors import DdpmError
from ..nn import UNet
from ..runtime.device import resolve_device
from ..runtime.precision import autocast_dtype, describe, under_autocast
from ..samplers import SamplerOptions, check_options, get_sampler
from ..core.schedules import NoiseSchedule, make_schedule, space_timesteps
from ..pictures.viz import make_grid


@dataclass
class LoadedModel:
    """A trained network with its schedule and config, ready to sample."""

    net: UNet
    schedule: NoiseSchedule
    config: RunConfig
    step: int
    source: Path

    def denoiser(self, clip: str = "none", precision: str = "fp32") -> Denoiser:
        d = self.config.diffusion
        dev = self.schedule.alpha_bar.device
        net = under_autocast(self.net, dev, autocast_dtype(precision, dev))
        return Denoiser(net, self.schedule, objective=d.objective,
                        learn_sigma=self.config.model.learn_sigma, clip=clip)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedModel:
    """A run folder or checkpoint -> the network (EMA weights by default) in eval mode."""
    ck = load_checkpoint(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    net = UNet(ck.config.model)
    load_into(net, ck.sampling_weights(use_ema), ck.path)
    net = net.to(dev).eval()
    if ck.config.train.channels_last:  # the layout it trained in: 1.2x faster convolutions (BENCHMARKS.md)
        net = net.to(memory_format=torch.channels_last)
    return LoadedModel(net, make_schedule(ck.config).to(dev), ck.config, ck.step, ck.path)


@dataclass
class Samples:
    images: torch.Tensor  # uint8 (N, C, H, W)
    nfe: int
    steps: int
    frames: list[np.ndarray] = field(default_factory=list)  # grids of x_t (or x0) during sampling
    arithmetic: str = "fp32"  # what cfg.precision resolved to on this device


def check_sample_config(model: LoadedModel, cfg: SampleConfig) -> int:
    """Validate against the model; return the number of steps to run."""
    spec = get_sampler(cfg.sampler)
    check_config(cfg)
    T = model.schedule.T
    steps = min(spec.default_steps or T, T) if cfg.steps is None else cfg.steps
    space_timesteps(T, steps, cfg.spacing)  # raises on bad steps / spacing
    check_options(cfg.sampler, SamplerOptions(cfg.eta, cfg.variance), model.config.model.learn_sigma)
    autocast_dtype(cfg.precision, model.schedule.alpha_bar.device)  # e.g. fp16 without CUDA
    return steps


@torch.inference_mode()
def generate(model: LoadedModel, cfg: SampleConfig, *, frames: Literal["none", "x_t", "x0"] = "none",
             frame_index: int | None = None, max_frames: int = 100, progress: bool = False) -> Samples:
    """Draw ``cfg.n`` images in batches; optionally record grids of the first batch's denoising."""
    steps = check_sample_config(model, cfg)
    spec = get_sampler(cfg.sampler)
    dev = model.schedule.alpha_bar.device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    timesteps = space_timesteps(model.schedule.T, steps, cfg.spacing)
    mc = model.config
    shape = (mc.model.channels, mc.data.image_size, mc.data.image_size)
    out, recorded = [], []
    every = max(1, steps // max_frames)
    denoiser = model.denoiser(cfg.clip, cfg.precision)
    for start in range(0, cfg.n, cfg.batch_size):
        b = min(cfg.batch_size, cfg.n - start)
        x_T = torch.randn((b, *shape), generator=gen, device=dev)
        on_step = None
        if frames != "none" and start == 0:
            on_step = _recorder(recorded, frames, frame_index, every, steps)
            recorded.append(_frame(x_T, frame_index))
        x = spec.fn(denoiser, x_T, timesteps, options=SamplerOptions(cfg.eta, cfg.variance),
                    generator=gen, on_step=on_step)
        out.append(from_model_range(x).cpu())
    return Samples(torch.cat(out), spec.nfe(model.schedule.alpha_bar, timesteps), steps, recorded,
                   describe(autocast_dtype(cfg.precision, dev)))


def _frame(x: torch.Tensor, index: int | None) -> np.ndarray:
    imgs = from_model_range(x if index is None else x[index:index + 1]).cpu()
    return make_grid(imgs)


def _recorder(frames: list[np.ndarray], what: str, index: int | None, every: int, steps: int):
    def on_step(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i % every == 0 or i == steps - 1:
            frames.append(_frame(x_t if what == "x_t" else x0, index))
    return on_step
