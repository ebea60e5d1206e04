"""Multistep consistency sampling (Song et al. 2023, Algorithm 1): take the network's x0 at each
level of the grid, then noise it afresh to the next, lower level; the last x0 is the sample.

Made for a consistency student (``ddpm distill --method consistency``), whose x0 is the
consistency function f(x_t, t): the point its teacher's probability-flow ODE reaches at t = 0.
The student is trained with f's boundary condition (f = identity at the clean end) in its
targets, the limit of the scalings c_skip, c_out of Latent Consistency Models (c_skip at the
first noisy level is already 0.0025), so f is the plain x0 prediction at every noisy level and
this sampler needs no scalings. Any model can be sampled this way; with a model trained only on
the DDPM loss, x0 is the posterior mean E[x0 | x_t], and the result comes near the data only
as the number of steps grows.
"""
from __future__ import annotations

import torch

from ..core.diffusion import Denoiser
from .base import SamplerOptions, StepCallback, level, randn_like, t_batch


@torch.no_grad()
def sample(denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *, options: SamplerOptions,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """x0 = f(x, t_k); x = alpha_{k-1} x0 + sigma_{k-1} z for k = K .. 1; return f at t_1."""
    lv = denoiser.levels
    x = x_T
    for i in reversed(range(len(timesteps))):
        x0 = denoiser(x, t_batch(timesteps[i], x)).x0
        if i > 0:
            a, s = level(lv, timesteps[i - 1])
            x = a.to(x0.dtype) * x0 + s.to(x0.dtype) * randn_like(x0, generator)
        else:
            x = x0
        if on_step is not None:
            on_step(len(timesteps) - 1 - i, x, x0)
    return x
