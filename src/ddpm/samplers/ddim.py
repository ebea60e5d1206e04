"""DDIM (Song et al. 2021), Eq. 12 with the sigma of Eq. 16 scaled by eta, on any process:
eta = 0 is the probability-flow ODE's Euler step in (x / alpha, sigma / alpha), which is exact
for data of a single point."""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, level, randn_like, t_batch


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """x_prev = alpha_prev x0 + sqrt(sigma_prev^2 - s^2) eps + s z, where s^2 = eta^2 times the
    variance of q(x_prev | x_t, x0) (DDIM Eq. 16 in alpha and sigma)."""
    lv = denoiser.levels
    eta = 0.0 if options.eta is None else options.eta
    x = x_T
    for i in reversed(range(len(timesteps))):
        pred = denoiser(x, t_batch(timesteps[i], x))
        a, s = level(lv, timesteps[i])
        a_prev, s_prev = level(lv, timesteps[i - 1] if i > 0 else None)
        if eta > 0:
            # q(x_prev | x_t, x0): sigma_{t|prev}^2 = sigma_t^2 - (alpha_t / alpha_prev)^2 sigma_prev^2
            s_cond2 = s**2 - (a / a_prev) ** 2 * s_prev**2
            sig = eta * (s_cond2 * s_prev**2 / s**2).clamp(min=0).sqrt()
        else:
            sig = s.new_tensor(0.0)
        x = a_prev * pred.x0 + (s_prev**2 - sig**2).clamp(min=0).sqrt() * pred.eps
        if i > 0 and eta > 0:
            x = x + sig * randn_like(x, generator)
        if on_step is not None:
            on_step(len(timesteps) - 1 - i, x, pred.x0)
    return x
