"""v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4)."""
from __future__ import annotations

from .base import Objective, coef


class V(Objective):
    name = "v"
    summary = "v = alpha eps - sigma x0 (Salimans & Ho 2022)"

    def target(self, x0, eps, alpha, sigma):
        return coef(alpha, x0) * eps - coef(sigma, x0) * x0

    def x0(self, out, x_t, alpha, sigma):
        # x_t = alpha x0 + sigma eps and v solved for x0; alpha^2 + sigma^2 = 1 on a VP process
        n = alpha**2 + sigma**2
        return coef(alpha / n, x_t) * x_t - coef(sigma / n, x_t) * out

    def out_per_x0(self, alpha, sigma):
        return (alpha**2 + sigma**2) / sigma
