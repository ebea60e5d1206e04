"""What every sampler shares: options, the step callback, and small helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from ..core.diffusion import Denoiser

Variance = Literal["beta_tilde", "beta", "learned"]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (i, x_t, x0_pred)


@dataclass(frozen=True)
class SamplerOptions:
    """Per-sampler knobs; each sampler reads only those that apply to it."""

    eta: float = 0.0  # ddim: 0 deterministic, 1 the DDPM posterior variance
    variance: Variance = "beta_tilde"  # ddpm: sigma_t^2 of the reverse step


class SamplerFn(Protocol):
    def __call__(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *,
                 options: SamplerOptions, generator: torch.Generator | None = None,
                 on_step: StepCallback | None = None) -> torch.Tensor: ...


def t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    """The scalar timestep t as a (B,) long tensor on x's device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (reproducible)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
