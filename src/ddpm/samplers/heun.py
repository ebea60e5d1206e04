"""Heun's second-order ODE sampler (Karras et al. 2022, EDM Algorithm 1) on the model's own
discrete noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, t_batch

SIGMA_MAX = 80.0


def nfe(alpha_bar: torch.Tensor, timesteps: list[int], lower_order_final: bool = False) -> int:
    """Network evaluations: one per level, plus one per Heun correction (not into sigma = 0,
    not out of sigma > SIGMA_MAX, not into the last level with ``lower_order_final``)."""
    ts = sorted(timesteps, reverse=True)
    return len(ts) + sum(1 for k, t in enumerate(ts) if _corrected(k, len(ts), _sigma(alpha_bar, t), lower_order_final))


def _sigma(alpha_bar: torch.Tensor, t: int) -> torch.Tensor:
    """EDM's noise level of step t: sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1 - alpha_bar[t]) / alpha_bar[t]).sqrt()


def _corrected(k: int, n: int, sigma: torch.Tensor, lower_order_final: bool) -> bool:
    """Whether the step out of level k (of n, noisiest first) gets Heun's correction."""
    return k + 1 < n - int(lower_order_final) and bool(sigma <= SIGMA_MAX)


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None,
           lower_order_final: bool = False) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, no churn): Euler step plus trapezoidal correction,
    except into sigma = 0 and out of sigma > 80 (EDM's sigma_max: above it D barely depends
    on x, and the slope at the far smaller next sigma would wreck the average), and with
    ``lower_order_final`` into the grid's last level. Works in x / sqrt(alpha_bar) (the
    variance-exploding view)."""
    ab_all = denoiser.schedule.alpha_bar
    ts = list(reversed(timesteps))
    sig = [_sigma(ab_all, t) for t in ts] + [ab_all.new_tensor(0.0)]

    def d_of(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # (dx/dsigma, D)
        ab = ab_all[ts[k]]
        x0 = denoiser(x * ab.sqrt(), t_batch(ts[k], x)).x0
        return (x - x0) / sig[k], x0

    x = x_T / ab_all[ts[0]].sqrt()
    for k in range(len(ts)):
        d, x0 = d_of(x, k)
        x_next = x + (sig[k + 1] - sig[k]) * d
        if _corrected(k, len(ts), sig[k], lower_order_final):
            d2, _ = d_of(x_next, k + 1)
            x_next = x + (sig[k + 1] - sig[k]) * 0.5 * (d + d2)
        x = x_next
        if on_step is not None:
            scale = ab_all[ts[k + 1]].sqrt() if k + 1 < len(ts) else 1.0
            on_step(k, x * scale, x0)
    return x
