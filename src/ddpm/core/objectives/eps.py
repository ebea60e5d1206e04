"""The noise eps (Ho et al. 2020): DDPM's objective."""
from __future__ import annotations

import torch

from .base import Objective, coef


class Eps(Objective):
    name = "eps"
    summary = "the noise eps (DDPM)"
    unfit = ("rectified-flow",)  # at t = 1 alpha = 0, and x0 = (x_t - sigma eps) / alpha is not defined

    def target(self, x0, eps, alpha, sigma):
        return eps

    def x0(self, out, x_t, alpha, sigma):
        return coef(1 / alpha, x_t) * x_t - coef(sigma / alpha, x_t) * out

    def eps(self, out, x_t, alpha, sigma):
        return out

    def out_per_x0(self, alpha, sigma):
        return alpha / sigma
