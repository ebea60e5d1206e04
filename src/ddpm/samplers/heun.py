"""Heun's second-order ODE sampler (Karras et al. 2022, EDM Algorithm 1) on any process, in the
variance-exploding view x / alpha with noise level sigma / alpha. On the ``edm`` process with
uniform spacing its grid is EDM's rho-grid, and this is EDM's Algorithm 1 exactly (no churn)."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, t_batch

SIGMA_MAX = 80.0


def nfe(levels, timesteps: list[int], lower_order_final: bool = False) -> int:
    """Network evaluations: one per level, plus one per Heun correction (not into sigma = 0,
    not out of sigma > SIGMA_MAX, not into the last level with ``lower_order_final``)."""
    ts = sorted(timesteps, reverse=True)
    sig = levels.sigma_ve if hasattr(levels, "sigma_ve") else ((1 - levels) / levels).sqrt()  # levels or alpha_bar
    return len(ts) + sum(1 for k, t in enumerate(ts) if _corrected(k, len(ts), sig[t], lower_order_final))


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
    ``lower_order_final`` into the grid's last level. Out of alpha = 0 (sigma infinite:
    rectified flow's t = 1) the Euler step is its limit, x_next / alpha_next = D + sigma_next eps."""
    lv = denoiser.levels
    ts = list(reversed(timesteps))
    alpha = [lv.alpha[t] for t in ts] + [lv.alpha.new_tensor(1.0)]
    sig = [lv.sigma_ve[t] for t in ts] + [lv.alpha.new_tensor(0.0)]

    def d_of(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # (dy/dsigma, D)
        x0 = denoiser(y * alpha[k], t_batch(ts[k], y)).x0
        return (y - x0) / sig[k], x0

    x = x_T
    y = x_T / alpha[0] if bool(alpha[0] > 0) else None  # None: at infinite sigma
    for k in range(len(ts)):
        if y is None:
            pred = denoiser(x, t_batch(ts[k], x))
            x0, y_next = pred.x0, pred.x0 + sig[k + 1] * pred.eps
        else:
            d, x0 = d_of(y, k)
            y_next = y + (sig[k + 1] - sig[k]) * d
            if _corrected(k, len(ts), sig[k], lower_order_final):
                d2, _ = d_of(y_next, k + 1)
                y_next = y + (sig[k + 1] - sig[k]) * 0.5 * (d + d2)
        y = y_next
        if on_step is not None:
            on_step(k, y * (alpha[k + 1] if k + 1 < len(ts) else 1.0), x0)
    return y
