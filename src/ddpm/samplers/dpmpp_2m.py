"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep, data prediction."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, t_batch


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None,
           lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) in lambda = log(alpha / sigma), then x0 at the grid's last level (the
    step to sigma = 0 is first order); ``lower_order_final``: the step into that last level is
    first order too (diffusers' option: after a short step, the extrapolation weight
    1 + 1/(2r) with r = h_prev / h grows large; bench/sampler_oracle.py measures it)."""
    ab_all = denoiser.schedule.alpha_bar.double()
    x = x_T
    x0_prev, h_prev = None, None
    n = len(timesteps)
    for i in reversed(range(n)):
        pred = denoiser(x, t_batch(timesteps[i], x))
        if i == 0:  # to the clean image: lambda = inf, x = D
            x = pred.x0
        else:
            ab_s, ab_t = ab_all[timesteps[i]], ab_all[timesteps[i - 1]]
            lam_s = 0.5 * torch.log(ab_s / (1 - ab_s))
            lam_t = 0.5 * torch.log(ab_t / (1 - ab_t))
            h = lam_t - lam_s
            d = pred.x0
            if x0_prev is not None and not (lower_order_final and i == 1):
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * x0_prev
            ratio = ((1 - ab_t) / (1 - ab_s)).sqrt()
            x = (ratio * x - ab_t.sqrt() * torch.expm1(-h) * d).to(x.dtype)
            x0_prev, h_prev = pred.x0, h
        if on_step is not None:
            on_step(n - 1 - i, x, pred.x0)
    return x
