"""Ancestral sampling, DDPM Algorithm 2, on any subset of the training steps (respaced)."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser, p_log_variance, q_posterior
from .base import SamplerOptions, StepCallback, randn_like, t_batch


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """DDPM Algorithm 2; with fewer steps, Improved DDPM Sec. 4's respaced betas. The discrete
    chain only (its posterior q(x_{t-1} | x_t, x0) is the chain's)."""
    sub = denoiser.schedule.respace(timesteps)
    x = x_T
    for i in reversed(range(len(timesteps))):
        pred = denoiser(x, t_batch(timesteps[i], x))
        ti = t_batch(i, x)
        mean = q_posterior(sub, pred.x0, x, ti).mean
        if i > 0:
            logvar = p_log_variance(sub, ti, x.ndim, variance=options.variance or "beta_tilde",
                                    var_frac=pred.var_frac)
            x = mean + torch.exp(0.5 * logvar) * randn_like(x, generator)
        else:
            x = mean
        if on_step is not None:
            on_step(len(timesteps) - 1 - i, x, pred.x0)
    return x
