"""Samplers: one file each, one signature, an explicit name -> sampler table (rule 5)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..core.diffusion import Denoiser
from ..errors import DdpmError
from ..core.schedules import space_timesteps
from . import ddim, ddpm, dpmpp_2m, heun
from .base import SamplerFn, SamplerOptions, StepCallback


class SamplerSpec(NamedTuple):
    fn: SamplerFn
    nfe: Callable[[torch.Tensor, list[int]], int]  # (alpha_bar, timesteps) -> network evaluations
    default_steps: int | None  # None: all T training steps
    summary: str


def _one_per_step(alpha_bar: torch.Tensor, timesteps: list[int]) -> int:
    return len(timesteps)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm.sample, _one_per_step, None, "ancestral, DDPM Algorithm 2 (respaced)"),
    "ddim": SamplerSpec(ddim.sample, _one_per_step, 50, "DDIM Eq. 12, eta in [0, 1]"),
    "dpm++2m": SamplerSpec(dpmpp_2m.sample, _one_per_step, 20, "DPM-Solver++(2M)"),
    "heun": SamplerSpec(heun.sample, heun.nfe, 10, "Heun 2nd order, EDM Algorithm 1"),
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise DdpmError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_options(name: str, options: SamplerOptions, learn_sigma: bool) -> None:
    """One-line errors for options a sampler cannot honour with this model."""
    if not 0.0 <= options.eta <= 1.0:
        raise DdpmError(f"eta must be between 0 and 1, got {options.eta}")
    if options.variance == "learned" and not learn_sigma:
        raise DdpmError("--variance learned needs a model trained with learned variances (learn_sigma)")


def count_nfe(name: str, alpha_bar: torch.Tensor, steps: int, spacing: str = "uniform") -> int:
    """Network evaluations per image of the named sampler at ``steps`` steps."""
    return get_sampler(name).nfe(alpha_bar, space_timesteps(len(alpha_bar), steps, spacing))


def sample(name: str, denoiser: Denoiser, x_T: torch.Tensor, steps: int | None = None, *,
           spacing: str = "uniform", options: SamplerOptions = SamplerOptions(),
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """Run the named sampler with ``steps`` of the model's T steps (its default when None)."""
    spec = get_sampler(name)
    T = denoiser.schedule.T
    steps = min(spec.default_steps or T, T) if steps is None else steps
    check_options(name, options, denoiser.learn_sigma)
    timesteps = space_timesteps(T, steps, spacing)
    return spec.fn(denoiser, x_T, timesteps, options=options, generator=generator, on_step=on_step)


__all__ = ["SAMPLERS", "count_nfe", "SamplerOptions", "SamplerSpec", "StepCallback", "get_sampler", "sample", "check_options"]
