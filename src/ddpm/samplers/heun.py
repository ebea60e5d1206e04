"""Heun's second-order ODE sampler (Karras et al. 2022, EDM Algorithm 1) on the model's own
discrete noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, t_batch

SIGMA_MAX = 80.0


def nfe(alpha_bar: torch.Tensor, timesteps: list[int]) -> int:
    """Network evaluations: one per level, plus one per Heun correction (not into sigma = 0,
    not out of sigma > SIGMA_MAX)."""
    ts = sorted(timesteps, reverse=True)[:-1]
    return len(timesteps) + sum(1 for t in ts if ((1 - alpha_bar[t]) / alpha_bar[t]).sqrt() <= SIGMA_MAX)


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, no churn): Euler step plus trapezoidal correction,
    except into sigma = 0 and out of sigma > 80 (EDM's sigma_max: above it D barely depends
    on x, and the slope at the far smaller next sigma would wreck the average).
    Works in x / sqrt(alpha_bar) (the variance-exploding view)."""
    ab_all = denoiser.schedule.alpha_bar
    ts = list(reversed(timesteps))
    sig = [((1 - ab_all[t]) / ab_all[t]).sqrt() for t in ts] + [ab_all.new_tensor(0.0)]

    def d_of(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # (dx/dsigma, D)
        ab = ab_all[ts[k]]
        x0 = denoiser(x * ab.sqrt(), t_batch(ts[k], x)).x0
        return (x - x0) / sig[k], x0

    x = x_T / ab_all[ts[0]].sqrt()
    for k in range(len(ts)):
        d, x0 = d_of(x, k)
        x_next = x + (sig[k + 1] - sig[k]) * d
        if k + 1 < len(ts) and sig[k] <= SIGMA_MAX:
            d2, _ = d_of(x_next, k + 1)
            x_next = x + (sig[k + 1] - sig[k]) * 0.5 * (d + d2)
        x = x_next
        if on_step is not None:
            scale = ab_all[ts[k + 1]].sqrt() if k + 1 < len(ts) else 1.0
            on_step(k, x * scale, x0)
    return x
