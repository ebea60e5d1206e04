"""How training draws its noise levels, one table; each entry names the loss weighting its paper
pairs it with (``DiffusionConfig.loss_weighting``; the presets use these pairs).

- ``uniform``: DDPM's t ~ U{0..T-1} on the discrete chain, t ~ U(0, 1] on a continuous process;
  DDPM's unweighted simple loss.
- ``lognormal``: EDM (Karras et al. 2022, Sec. 5): ln sigma ~ N(P_mean, P_std^2) in EDM's units
  sigma / alpha, mapped to the process's t (on the discrete chain: the step whose sigma is
  nearest in ln sigma); EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
- ``logit-normal``: Stable Diffusion 3 (Esser et al. 2024, Sec. 3.1): t = sigmoid(u), u ~ N(m, s^2),
  which spends the steps in the middle of the path; SD3's unweighted velocity loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import DdpmError

if TYPE_CHECKING:
    from .processes import VP, Process

T_MIN = 1e-5  # continuous draws stay off t = 0, where sigma = 0 and eps is not defined


class NoiseLevels(NamedTuple):
    name: str
    paper_weighting: str  # the loss weighting of the paper that uses it
    summary: str

    def draw_t(self, p: Process, n: int, device: torch.device | str, g: torch.Generator | None) -> torch.Tensor:
        """(n,) float64 t of a continuous process."""
        c = p.cfg
        if self.name == "uniform":
            u = torch.rand(n, device=device, generator=g, dtype=torch.float64)
            return T_MIN + (1 - T_MIN) * u
        z = torch.randn(n, device=device, generator=g, dtype=torch.float64)
        if self.name == "lognormal":
            return p.t_of_sigma_ve(torch.exp(c.lognormal_mean + c.lognormal_std * z)).clamp(T_MIN, 1.0)
        return torch.sigmoid(c.logit_mean + c.logit_std * z).clamp(T_MIN, 1.0)

    def draw_index(self, p: VP, n: int, device: torch.device | str, g: torch.Generator | None) -> torch.Tensor:
        """(n,) long steps of the discrete chain (uniform draws exactly as runs always have)."""
        c = p.cfg
        if self.name == "uniform":
            return torch.randint(0, p.T, (n,), device=device, generator=g)
        z = torch.randn(n, device=device, generator=g, dtype=torch.float64)
        if self.name == "lognormal":
            return p.nearest_step(c.lognormal_mean + c.lognormal_std * z)
        u = torch.sigmoid(c.logit_mean + c.logit_std * z)
        return (u * p.T).long().clamp(0, p.T - 1)


NOISE_LEVELS: dict[str, NoiseLevels] = {
    "uniform": NoiseLevels("uniform", "uniform", "DDPM: t uniform"),
    "lognormal": NoiseLevels("lognormal", "edm", "EDM: ln sigma ~ N(P_mean, P_std^2)"),
    "logit-normal": NoiseLevels("logit-normal", "uniform", "SD3: t = sigmoid(N(m, s^2))"),
}


def get_noise_levels(name: str) -> NoiseLevels:
    if name not in NOISE_LEVELS:
        raise DdpmError(f"unknown t-sampling {name!r}; choose one of: {', '.join(NOISE_LEVELS)}")
    return NOISE_LEVELS[name]
