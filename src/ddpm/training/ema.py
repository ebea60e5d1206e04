"""What a step reads of the run's progress: the EMA of the weights, the learning-rate schedule
and the number of steps the budget allows."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig


class EMA:
    """Exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # the warm-up depends on the step alone, so a resumed run continues the same curve
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def lr_lambda(cfg: RunConfig, get_horizon: Callable[[], int | None]) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to 0 over the horizon (read each step,
    as a time budget only fixes it once the speed is known)."""
    tc = cfg.train

    def f(step: int) -> float:
        horizon = get_horizon() or 0
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.lr_schedule == "cosine" and horizon > tc.warmup_steps:
            p = min(1.0, (step - tc.warmup_steps) / (horizon - tc.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * p))
        return 1.0
    return f


def step_budget(cfg: RunConfig, steps_per_epoch: int) -> int | None:
    """The number of optimiser steps the config allows, when it is known in advance."""
    budgets = []
    if cfg.train.max_steps is not None:
        budgets.append(cfg.train.max_steps)
    if cfg.train.epochs is not None:
        budgets.append(math.ceil(cfg.train.epochs * steps_per_epoch))
    return min(budgets) if budgets else None
