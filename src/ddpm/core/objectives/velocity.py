"""The flow's velocity u = eps - x0 (rectified flow, flow matching: the field dx_t/dt of
x_t = (1 - t) x0 + t eps)."""
from __future__ import annotations

from .base import Objective, coef


class Velocity(Objective):
    name = "velocity"
    summary = "the flow's velocity u = eps - x0 (rectified flow, flow matching)"

    def target(self, x0, eps, alpha, sigma):
        return eps - x0

    def x0(self, out, x_t, alpha, sigma):
        # x_t = alpha x0 + sigma (u + x0) solved for x0
        return coef(1 / (alpha + sigma), x_t) * x_t - coef(sigma / (alpha + sigma), x_t) * out

    def out_per_x0(self, alpha, sigma):
        return (alpha + sigma) / sigma
