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

from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from ..errors import DdpmError

if TYPE_CHECKING:
    from .processes import VP, Process

T_MIN = 1e-5  # continuous draws stay off t = 0, where sigma = 0 and eps is not defined


def _uniform_t(p: Process, n: int, device, g) -> torch.Tensor:
    return T_MIN + (1 - T_MIN) * torch.rand(n, device=device, generator=g, dtype=torch.float64)


def _uniform_index(p: VP, n: int, device, g) -> torch.Tensor:
    return torch.randint(0, p.T, (n,), device=device, generator=g)  # exactly as runs always drew it


def _log_sigma(p: Process, n: int, device, g) -> torch.Tensor:
    z = torch.randn(n, device=device, generator=g, dtype=torch.float64)
    return p.cfg.lognormal_mean + p.cfg.lognormal_std * z


def _lognormal_t(p: Process, n: int, device, g) -> torch.Tensor:
    return p.t_of_sigma_ve(torch.exp(_log_sigma(p, n, device, g))).clamp(T_MIN, 1.0)


def _lognormal_index(p: VP, n: int, device, g) -> torch.Tensor:
    return p.nearest_step(_log_sigma(p, n, device, g))


def _logit_t(p: Process, n: int, device, g) -> torch.Tensor:
    z = torch.randn(n, device=device, generator=g, dtype=torch.float64)
    return torch.sigmoid(p.cfg.logit_mean + p.cfg.logit_std * z).clamp(T_MIN, 1.0)


def _logit_index(p: VP, n: int, device, g) -> torch.Tensor:
    return (_logit_t(p, n, device, g) * p.T).long().clamp(0, p.T - 1)


Draws = Callable[..., torch.Tensor]  # (process, n, device, generator) -> (n,) draws


class NoiseLevels(NamedTuple):
    draw_t: Draws  # float64 t of a continuous process
    draw_index: Draws  # long steps of the discrete chain
    paper_weighting: str  # the loss weighting of the paper that uses it
    summary: str


NOISE_LEVELS: dict[str, NoiseLevels] = {
    "uniform": NoiseLevels(_uniform_t, _uniform_index, "uniform", "DDPM: t uniform"),
    "lognormal": NoiseLevels(_lognormal_t, _lognormal_index, "edm", "EDM: ln sigma ~ N(P_mean, P_std^2)"),
    "logit-normal": NoiseLevels(_logit_t, _logit_index, "uniform", "SD3: t = sigmoid(N(m, s^2))"),
}


def get_noise_levels(name: str) -> NoiseLevels:
    if name not in NOISE_LEVELS:
        raise DdpmError(f"unknown t-sampling {name!r}; choose one of: {', '.join(NOISE_LEVELS)}")
    return NOISE_LEVELS[name]
