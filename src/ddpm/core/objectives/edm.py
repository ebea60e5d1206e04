"""EDM's preconditioned output F (Karras et al. 2022, Eq. 7 and Table 1):
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), in the variance-exploding view x / alpha with
sigma = sigma_t / alpha_t. Written with alpha and sigma multiplied through, so that it stays
finite where alpha = 0 (rectified flow's t = 1)."""
from __future__ import annotations

import torch

from .base import Objective, coef


class EDMPrecond(Objective):
    name = "edm"
    summary = "EDM's preconditioned output F: D = c_skip x + c_out F(c_in x) (Karras et al. 2022)"

    def _parts(self, alpha: torch.Tensor, sigma: torch.Tensor):
        sd2 = self.sigma_data**2
        n = sigma**2 + alpha**2 * sd2  # alpha^2 (sigma_ve^2 + sigma_data^2)
        c_skip = alpha**2 * sd2 / n
        c_out = sigma * self.sigma_data / n.sqrt()
        return n, c_skip, c_out

    def target(self, x0, eps, alpha, sigma):
        n, c_skip, c_out = self._parts(alpha, sigma)
        # F* = (x0 - c_skip (x0 + sigma_ve eps)) / c_out
        a = sigma**2 / n / c_out
        b = alpha * sigma * self.sigma_data**2 / n / c_out
        return coef(a, x0) * x0 - coef(b, x0) * eps

    def x0(self, out, x_t, alpha, sigma):
        n, c_skip, c_out = self._parts(alpha, sigma)
        return coef(alpha * self.sigma_data**2 / n, x_t) * x_t + coef(c_out, x_t) * out

    def out_per_x0(self, alpha, sigma):
        return 1 / self._parts(alpha, sigma)[2]

    def c_in(self, alpha, sigma):
        return 1 / self._parts(alpha, sigma)[0].sqrt()
