"""Beta schedules, the precomputed NoiseSchedule, and timestep respacing.

Everything is computed and stored in float64 and cast at use (``diffusion.extract`` casts to
the arithmetic of x): stored in float32, alpha_bar near 0 (t = T-1 of the cosine schedule)
would magnify its rounding about 2e4 times where eps is turned into x0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Literal, NamedTuple, get_args

import torch

from ..errors import DdpmError

if TYPE_CHECKING:
    from ..config import DiffusionConfig, RunConfig

Spacing = Literal["uniform", "quadratic", "trailing"]  # the one table of spacing names
SPACINGS: tuple[str, ...] = get_args(Spacing)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM Sec. 4: betas linear from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def quadratic_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """sqrt(beta) linear, then squared."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """A sigmoid over [-6, 6] scaled into [beta_start, beta_end]."""
    s = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    return s * (beta_end - beta_start) + beta_start


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM Eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    f = torch.cos(((x / T) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, max_beta)


class ScheduleSpec(NamedTuple):
    betas: Callable[[int, float, float], torch.Tensor]  # (T, beta_start, beta_end) -> (T,) float64
    beta_range: bool  # whether beta_start and beta_end shape it
    summary: str


def _cosine(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return cosine_betas(T)  # shaped by alpha_bar alone, no beta range


# The one table of schedule names: config.ScheduleName, the command's choices and the plots read it.
SCHEDULES: dict[str, ScheduleSpec] = {
    "linear": ScheduleSpec(linear_betas, True, "DDPM Sec. 4, betas linear in t"),
    "cosine": ScheduleSpec(_cosine, False, "Improved DDPM Eq. 17, alpha_bar a squared cosine"),
    "quadratic": ScheduleSpec(quadratic_betas, True, "sqrt(beta) linear in t"),
    "sigmoid": ScheduleSpec(sigmoid_betas, True, "betas a sigmoid in t"),
}


def make_betas(name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The named schedule's betas (float64, shape (T,))."""
    if T < 1:
        raise DdpmError(f"timesteps must be at least 1, got {T}")
    if name not in SCHEDULES:
        raise DdpmError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    spec = SCHEDULES[name]
    if spec.beta_range and not 0 < beta_start <= beta_end < 1:
        raise DdpmError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return spec.betas(T, beta_start, beta_end)


@dataclass(frozen=True)
class NoiseSchedule:
    """Every quantity the forward process and the posterior need, indexed by t in [0, T).

    ``timesteps`` maps index i to the timestep the network was trained on (the identity for a
    full schedule; the kept subset for a respaced one).
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    sqrt_recip_alphas: torch.Tensor
    sqrt_recip_alpha_bar: torch.Tensor
    sqrt_recipm1_alpha_bar: torch.Tensor
    posterior_variance: torch.Tensor  # beta-tilde, DDPM Eq. 7
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # on x0
    posterior_mean_coef2: torch.Tensor  # on x_t
    timesteps: torch.Tensor  # long

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timesteps: torch.Tensor | None = None) -> NoiseSchedule:
        b = betas.to(torch.float64)
        a = 1 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        post_var = b * (1 - ab_prev) / (1 - ab)
        # beta-tilde is 0 at t=0; improved-diffusion clips the log with the next value
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(b) > 1 else torch.log(b)
        q = dict(
            betas=b, alphas=a, alpha_bar=ab, alpha_bar_prev=ab_prev,
            sqrt_alpha_bar=ab.sqrt(), sqrt_one_minus_alpha_bar=(1 - ab).sqrt(),
            sqrt_recip_alphas=(1 / a).sqrt(), sqrt_recip_alpha_bar=(1 / ab).sqrt(),
            sqrt_recipm1_alpha_bar=(1 / ab - 1).sqrt(),
            posterior_variance=post_var, posterior_log_variance_clipped=post_logvar,
            posterior_mean_coef1=b * ab_prev.sqrt() / (1 - ab),
            posterior_mean_coef2=(1 - ab_prev) * a.sqrt() / (1 - ab),
        )
        ts = torch.arange(len(b)) if timesteps is None else timesteps.long()
        return cls(**q, timesteps=ts)

    @classmethod
    def create(cls, name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The named schedule with T steps."""
        return cls.from_betas(make_betas(name, T, beta_start, beta_end))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """On ``device``; float64 stays float64 except where the device has none (MPS)."""
        cast = torch.float32 if torch.device(device).type == "mps" else None
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device, cast if f.name != "timesteps" else None)
                                for f in fields(self)})

    def respace(self, keep: list[int] | torch.Tensor) -> NoiseSchedule:
        """Improved DDPM Sec. 4: the schedule on a subset of steps, betas recomputed so that
        alpha_bar on the subset is exactly the original's."""
        keep_t = torch.as_tensor(keep, dtype=torch.long).cpu()
        ab = self.alpha_bar.cpu().double()[keep_t]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        sub = NoiseSchedule.from_betas(1 - ab / ab_prev, timesteps=self.timesteps.cpu()[keep_t])
        return sub.to(self.alpha_bar.device)  # on the device of the schedule it came from (CUDA too)


def space_timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """``steps`` distinct of the T training timesteps, ascending, always ending at the noisiest
    t = T-1 where sampling starts; "uniform" and "quadratic" also include t = 0 (DDIM Sec. C.2),
    "trailing" counts back from T-1 in strides of T/steps (Lin et al., Common Diffusion Noise
    Schedules are Flawed, Table 2)."""
    if not 1 <= steps <= T:
        raise DdpmError(f"steps must be between 1 and T={T}, got {steps}")
    if spacing not in SPACINGS:
        raise DdpmError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if steps == 1:  # one step: from the noisiest level straight to x0
        return [T - 1]
    if spacing == "trailing":
        ts = [round(T - 1 - i * T / steps) for i in range(steps)][::-1]
    elif spacing == "quadratic":
        ts = [int(round((i / (steps - 1)) ** 2 * (T - 1))) for i in range(steps)]
    else:
        ts = [int(round(i * (T - 1) / (steps - 1))) for i in range(steps)]
    # quadratic spacing repeats small timesteps: push each up to be distinct, then pull the
    # tail back under T-1 (the last entry is T-1 either way)
    out: list[int] = []
    for t in ts:
        out.append(max(t, out[-1] + 1 if out else 0))
    return [min(t, T - 1 - (steps - 1 - i)) for i, t in enumerate(out)]


def make_schedule(cfg: RunConfig | DiffusionConfig) -> NoiseSchedule:
    """The schedule a run's diffusion config describes: its explicit ``betas``, else the named schedule."""
    d = getattr(cfg, "diffusion", cfg)
    betas = getattr(d, "betas", None)
    if betas is None:
        return NoiseSchedule.create(d.schedule, d.timesteps, d.beta_start, d.beta_end)
    b = torch.tensor(betas, dtype=torch.float64)
    if len(b) != d.timesteps or not bool(((b > 0) & (b < 1)).all()):
        raise DdpmError(f"diffusion.betas must be {d.timesteps} numbers (one per timestep) in (0, 1), "
                        f"got {len(b)} from {float(b.min()) if len(b) else 0:g} to {float(b.max()) if len(b) else 0:g}")
    return NoiseSchedule.from_betas(b)
