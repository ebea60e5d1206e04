"""DDIM (Song et al. 2021), Eq. 12 with the sigma of Eq. 16 scaled by eta."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, randn_like, t_batch


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """DDIM Eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z."""
    ab_all = denoiser.schedule.alpha_bar
    eta = 0.0 if options.eta is None else options.eta
    x = x_T
    for i in reversed(range(len(timesteps))):
        pred = denoiser(x, t_batch(timesteps[i], x))
        ab = ab_all[timesteps[i]]
        ab_prev = ab_all[timesteps[i - 1]] if i > 0 else ab.new_tensor(1.0)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x = ab_prev.sqrt() * pred.x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * pred.eps
        if i > 0 and eta > 0:
            x = x + sigma * randn_like(x, generator)
        if on_step is not None:
            on_step(len(timesteps) - 1 - i, x, pred.x0)
    return x
