"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep, data prediction, in
the log-SNR lambda = log(alpha / sigma) of any process."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, level, t_batch


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None,
           lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) in lambda = log(alpha / sigma), then x0 at the grid's last level (the
    step to sigma = 0 is first order); ``lower_order_final``: the step into that last level is
    first order too (diffusers' option: after a short step, the extrapolation weight
    1 + 1/(2r) with r = h_prev / h grows large; bench/sampler_oracle.py measures it). Where
    alpha = 0 (rectified flow's t = 1) lambda = -inf and the first step is DDIM's."""
    lv = denoiser.levels
    x = x_T
    x0_prev, h_prev = None, None
    n = len(timesteps)
    for i in reversed(range(n)):
        pred = denoiser(x, t_batch(timesteps[i], x))
        if i == 0:  # to the clean image: lambda = inf, x = D
            x = pred.x0
        else:
            a_s, s_s = level(lv, timesteps[i])
            a_t, s_t = level(lv, timesteps[i - 1])
            lam_s = torch.log(a_s) - torch.log(s_s)
            lam_t = torch.log(a_t) - torch.log(s_t)
            h = lam_t - lam_s
            d = pred.x0
            if x0_prev is not None and not (lower_order_final and i == 1) and bool(torch.isfinite(h_prev)):
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * pred.x0 - (1 / (2 * r)) * x0_prev
            x = ((s_t / s_s) * x - a_t * torch.expm1(-h) * d).to(x.dtype)
            x0_prev, h_prev = pred.x0, h
        if on_step is not None:
            on_step(n - 1 - i, x, pred.x0)
    return x
