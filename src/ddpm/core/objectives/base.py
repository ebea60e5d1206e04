"""What every objective gives: its training target, its conversion to x0, how its error scales
with x0's (for loss weightings stated in x0 units), and the network's input scale.

Every objective is affine in (x_t, x0) at a fixed level, so a prediction of any of them is a
prediction of x0 (and of eps = (x_t - alpha x0) / sigma). alpha and sigma arrive as float64 (B,)
per image; coefficients are formed in float64 and cast to x's arithmetic at use (``coef``).
"""
from __future__ import annotations

import torch


def coef(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 (B,) coefficient cast to ``like``'s dtype and shaped (B, 1, ..., 1)."""
    return c.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class Objective:
    """One entry of :data:`ddpm.core.objectives.OBJECTIVES`."""

    name = ""
    summary = ""
    unfit: tuple[str, ...] = ()  # processes it cannot serve (e.g. where alpha = 0 and x0 would need a division by it)

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def target(self, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def x0(self, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
            ) -> torch.Tensor | None:
        """eps read off the output directly, where the output is it (None: derived from x0, as
        eps = (x_t - alpha x0) / sigma); keeps an eps prediction exactly as the network made it."""
        return None

    def out_per_x0(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """|d output / d x0| at fixed x_t, float64 (B,): an error of e in x0 is one of this times e here."""
        raise NotImplementedError

    def c_in(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The network's input scale, float64: x_t / sqrt(alpha^2 + sigma^2), unit variance for
        data of unit variance (exactly 1 on a variance-preserving process)."""
        return 1 / (alpha**2 + sigma**2).sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = alpha x0 + sigma eps solved for eps."""
    return (x_t - coef(alpha, x_t) * x0) / coef(sigma, x_t)
