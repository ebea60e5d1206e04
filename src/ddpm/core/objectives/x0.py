"""The clean image x0 itself."""
from __future__ import annotations

import torch

from .base import Objective


class X0(Objective):
    name = "x0"
    summary = "the clean image x0"

    def target(self, x0, eps, alpha, sigma):
        return x0

    def x0(self, out, x_t, alpha, sigma):
        return out

    def out_per_x0(self, alpha, sigma):
        return torch.ones_like(alpha)
