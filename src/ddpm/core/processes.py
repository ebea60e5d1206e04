"""Noise processes, one table: x_t = alpha(t) x0 + sigma(t) eps for t in [0, 1].

A process gives, in float64, alpha(t) and sigma(t), the grid of levels a sampler visits, how
training draws its levels (with :mod:`.noise_levels`), and what the network is told of time.
Everything downstream (objectives, samplers, guidance intervals, editing, distillation) reads
only a :class:`Levels` table of (alpha, sigma, what the network sees), never a process's
insides, so a new process is one class here and its registration in :data:`PROCESSES`.

- ``vp``: the discrete variance-preserving chain of DDPM (Ho et al. 2020), alpha = sqrt(alpha_bar_i),
  sigma = sqrt(1 - alpha_bar_i) at its T steps, the network told the step index i. Runs made
  before this table are ``vp`` runs: their levels are exactly the old tables.
- ``edm``: Karras et al. 2022: alpha = 1, sigma from sigma_min to sigma_max, t the position on
  EDM's rho-grid (sigma(t)^(1/rho) linear in t, so a uniform grid in t is EDM's Eq. 5), the network
  told c_noise = ln(sigma) / 4.
- ``rectified-flow``: Liu et al. 2023 / Lipman et al. 2023 (as in Stable Diffusion 3):
  alpha = 1 - t, sigma = t, the network told 1000 t (SD3's scale, the range of DDPM's step
  indices that the time embeddings were made for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from ..errors import DdpmError
from .schedules import SPACINGS, NoiseSchedule, make_schedule, space_timesteps

if TYPE_CHECKING:
    from ..config import DiffusionConfig, RunConfig


@dataclass(frozen=True)
class Levels:
    """A table of K noise levels, ascending in noise: float64 alpha and sigma (K,), and ``net_t``
    (K,), what the network is told at each (long step indices on the discrete chain, floats on
    continuous processes). Samplers index it with ``timesteps``; below index 0 lies the clean
    image (alpha = 1, sigma = 0). ``schedule`` is the discrete chain where there is one (the
    ancestral sampler, learned variances and the likelihood need it)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    net_t: torch.Tensor
    schedule: NoiseSchedule | None = None

    @property
    def K(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alpha.device

    def prior_scale(self, i: int) -> torch.Tensor:
        """The std a sampler's start at level i is drawn with: sqrt(alpha^2 + sigma^2), the marginal
        std there of data of unit variance (1 on a variance-preserving process and at rectified
        flow's t = 1; EDM's sigma_max, to 1e-4, at its top)."""
        return (self.alpha[i] ** 2 + self.sigma[i] ** 2).sqrt()

    @property
    def sigma_ve(self) -> torch.Tensor:
        """EDM's noise level sigma / alpha of each level (the variance-exploding view; inf where alpha = 0)."""
        return self.sigma / self.alpha

    @property
    def log_snr(self) -> torch.Tensor:
        """lambda = log(alpha / sigma) of each level (DPM-Solver's variable)."""
        return torch.log(self.alpha) - torch.log(self.sigma)

    def to(self, device: torch.device | str) -> Levels:
        cast = torch.float32 if torch.device(device).type == "mps" else None
        return Levels(self.alpha.to(device, cast), self.sigma.to(device, cast), self.net_t.to(device),
                      None if self.schedule is None else self.schedule.to(device))

    @classmethod
    def of_schedule(cls, s: NoiseSchedule) -> Levels:
        """The discrete chain's T steps, exactly its own tables (old runs sample as before)."""
        return cls(s.sqrt_alpha_bar, s.sqrt_one_minus_alpha_bar, s.timesteps, s)


class Plan(NamedTuple):
    """What a sampler runs on: a levels table and the indices into it that it visits, ascending."""

    levels: Levels
    timesteps: list[int]


class Draw(NamedTuple):
    """Training levels for a batch: float64 alpha and sigma (B,), what the network is told
    (B,), and the step indices on the discrete chain (None on continuous processes)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    net_t: torch.Tensor
    index: torch.Tensor | None
    t: torch.Tensor | None = None  # float64 t in [0, 1] (continuous processes)

    def part(self, keep: slice | torch.Tensor) -> Draw:
        """The draws of some of the images (a process's share of a distributed batch)."""
        return Draw(*(None if f is None else f[keep] for f in self))


class Process:
    """The interface; one subclass per entry of :data:`PROCESSES`."""

    name = ""
    discrete = False
    summary = ""
    default_sampler = "heun"  # what `ddpm sample` runs when no --sampler is given
    default_steps: dict[str, int] = {}  # a sampler's default steps here, where not the table's

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    # -- the continuous view (discrete processes index their table instead)
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def net_time(self, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_of_sigma_ve(self, s: torch.Tensor) -> torch.Tensor:
        """The t whose sigma / alpha is ``s`` (for noise levels drawn in EDM's units)."""
        raise NotImplementedError

    def grid_t(self, steps: int, spacing: str) -> torch.Tensor:
        """The t of ``steps`` levels, ascending, float64."""
        raise NotImplementedError

    # -- shared
    def levels_at(self, t: torch.Tensor) -> Levels:
        t = t.double()
        alpha, sigma = self.alpha_sigma(t)
        return Levels(alpha, sigma, self.net_time(t, alpha, sigma))

    @property
    def T(self) -> int | None:
        """The discrete chain's steps (None: continuous, any number of steps)."""
        return None

    def plan(self, steps: int, spacing: str, *, t_max: float = 1.0) -> Plan:
        """``steps`` levels on ``spacing``, the noisiest at ``t_max`` (SDEdit starts lower)."""
        _check_steps(steps, spacing)
        t = self.grid_t(steps, spacing) * t_max
        return Plan(self.levels_at(t), list(range(steps)))

    def draw(self, n: int, sampling: str, *, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> Draw:
        from .noise_levels import get_noise_levels
        t = get_noise_levels(sampling).draw_t(self, n, device, generator)
        alpha, sigma = self.alpha_sigma(t)
        return Draw(alpha, sigma, self.net_time(t, alpha, sigma), None, t)

    def describe(self) -> str:
        return self.name


MAX_STEPS = 100_000  # a continuous process takes any number of steps; beyond this a request is a mistake


def _check_steps(steps: int, spacing: str) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise DdpmError(f"steps must be between 1 and {MAX_STEPS:,}, got {steps}")
    if spacing not in SPACINGS:
        raise DdpmError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")


class VP(Process):
    """DDPM's discrete chain, any of the four beta schedules, T steps."""

    name, discrete = "vp", True
    default_sampler = "ddpm"  # DDPM's Algorithm 2, as every run before this table
    summary = "DDPM's discrete variance-preserving chain: T steps of a beta schedule (Ho et al. 2020)"

    def __init__(self, cfg: DiffusionConfig, schedule: NoiseSchedule | None = None):
        super().__init__(cfg)
        self.schedule = make_schedule(cfg) if schedule is None else schedule
        self.table = Levels.of_schedule(self.schedule)

    @property
    def T(self) -> int:
        return self.schedule.T

    def to(self, device: torch.device | str) -> VP:
        return VP(self.cfg, self.schedule.to(device))

    def plan(self, steps: int, spacing: str, *, t_max: float = 1.0) -> Plan:
        """``steps`` of the T steps (SDEdit starts the chain by step index, not by ``t_max``)."""
        return Plan(self.table, space_timesteps(self.T, steps, spacing))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At t in [0, 1]: the chain's step round(t T) - 1 (t = 0: the clean image)."""
        i = (t * self.T).round().long() - 1
        ab = torch.where(i >= 0, self.schedule.alpha_bar.to(t.device)[i.clamp(min=0)], torch.ones_like(t))
        return ab.sqrt(), (1 - ab).sqrt()

    def t_of_sigma_ve(self, s: torch.Tensor) -> torch.Tensor:
        return (self.nearest_step(torch.log(s)) + 1).double() / self.T

    def nearest_step(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """The step whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is nearest in ln sigma."""
        ab = self.schedule.alpha_bar.to(log_sigma.device)
        log_sig_t = 0.5 * (torch.log1p(-ab) - torch.log(ab))  # ascending in t
        hi = torch.searchsorted(log_sig_t, log_sigma).clamp(1, len(ab) - 1)
        lo = hi - 1
        nearer_lo = (log_sigma - log_sig_t[lo]) < (log_sig_t[hi] - log_sigma)
        return torch.where(nearer_lo, lo, hi).long()

    def draw(self, n: int, sampling: str, *, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> Draw:
        from .noise_levels import get_noise_levels
        i = get_noise_levels(sampling).draw_index(self, n, device, generator)
        tab = self.table
        return Draw(tab.alpha[i], tab.sigma[i], tab.net_t[i], i)

    def describe(self) -> str:
        kind = "explicit betas" if getattr(self.cfg, "betas", None) is not None else f"{self.cfg.schedule} schedule"
        return f"vp, {kind}, T={self.T}"


class EDM(Process):
    """Karras et al. 2022: x = x0 + sigma eps, sigma in [sigma_min, sigma_max] on the rho-grid."""

    name = "edm"
    default_steps = {"heun": 18}  # EDM's 18 levels (35 evaluations): its rho-grid is coarse at 10
    summary = "EDM (Karras et al. 2022): x0 + sigma eps, sigma from 0.002 to 80 on the rho = 7 grid"

    def _ends(self) -> tuple[float, float, float]:
        c = self.cfg
        return c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho), c.rho

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, rho = self._ends()
        return torch.ones_like(t), (lo + t * (hi - lo)) ** rho

    def net_time(self, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(sigma / alpha) / 4  # EDM's c_noise (Table 1)

    def t_of_sigma_ve(self, s: torch.Tensor) -> torch.Tensor:
        lo, hi, rho = self._ends()
        return ((s.clamp(self.cfg.sigma_min, self.cfg.sigma_max) ** (1 / rho) - lo) / (hi - lo)).clamp(0, 1)

    def grid_t(self, steps: int, spacing: str) -> torch.Tensor:
        """EDM Eq. 5: sigma_min to sigma_max inclusive (uniform in t: the rho-grid); then the
        sampler's last step goes to sigma = 0."""
        if spacing == "trailing":  # t = k / steps, k = 1 .. steps: the grids distillation trains on
            return torch.arange(1, steps + 1, dtype=torch.float64) / steps
        if steps == 1:
            return torch.ones(1, dtype=torch.float64)
        u = torch.linspace(0, 1, steps, dtype=torch.float64)
        return u**2 if spacing == "quadratic" else u

    def describe(self) -> str:
        c = self.cfg
        return f"edm, sigma {c.sigma_min:g} to {c.sigma_max:g}, rho {c.rho:g}"


class RectifiedFlow(Process):
    """x_t = (1 - t) x0 + t eps: the straight path from data to noise."""

    name = "rectified-flow"
    summary = "rectified flow / flow matching (Liu et al. 2023; SD3): x_t = (1 - t) x0 + t eps"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - t, t

    def net_time(self, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return 1000 * t

    def t_of_sigma_ve(self, s: torch.Tensor) -> torch.Tensor:
        return s / (1 + s)  # sigma / alpha = t / (1 - t)

    def grid_t(self, steps: int, spacing: str) -> torch.Tensor:
        """t = k / steps for k = 1 .. steps (t = 1: pure noise; the last step goes to t = 0)."""
        u = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        return u**2 if spacing == "quadratic" else u


class ProcessSpec(NamedTuple):
    make: Callable[[DiffusionConfig], Process]
    summary: str


PROCESSES: dict[str, ProcessSpec] = {
    "vp": ProcessSpec(VP, VP.summary),
    "edm": ProcessSpec(EDM, EDM.summary),
    "rectified-flow": ProcessSpec(RectifiedFlow, RectifiedFlow.summary),
}


def make_process(cfg: RunConfig | DiffusionConfig) -> Process:
    """The process a run's diffusion config describes."""
    d = getattr(cfg, "diffusion", cfg)
    name = getattr(d, "process", "vp")
    if name not in PROCESSES:
        raise DdpmError(f"unknown process {name!r}; choose one of: {', '.join(PROCESSES)}")
    if name == "edm" and not 0 < d.sigma_min < d.sigma_max < math.inf:
        raise DdpmError(f"edm needs 0 < sigma_min < sigma_max, got {d.sigma_min} and {d.sigma_max}")
    if name == "edm" and not d.rho > 0:
        raise DdpmError(f"edm needs rho > 0, got {d.rho}")
    return PROCESSES[name].make(d)
