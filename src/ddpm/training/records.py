"""What a run writes as it goes besides checkpoints: the log records of its steps and the
periodic sample grids."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import SampleConfig
from ..pictures.viz import save_grid
from ..sampling.generate import LoadedModel, generate
from .trainer import Skipped, StepOut, Trainer


@dataclass
class Window:
    """Images and losses since the last log record: its mean loss and images/s."""

    start: float = field(default_factory=time.monotonic)
    images: int = 0
    loss_sum: float | torch.Tensor = 0.0  # a device tensor: no host sync per step
    steps: int = 0

    def add(self, images: int, loss: float | torch.Tensor) -> None:
        self.images += images
        self.loss_sum += loss
        self.steps += 1

    def reset(self) -> None:
        self.start, self.images, self.loss_sum, self.steps = time.monotonic(), 0, 0.0, 0


def log_record(tr: Trainer, out: StepOut, win: Window) -> dict[str, Any]:
    """The log.jsonl record of a step: the window's mean loss and speed, the loss by quarter of the path."""
    T = tr.cfg.diffusion.timesteps
    quart = (out.t * 4 // T).clamp(max=3)
    q = {f"loss_q{i}": float(out.per_sample[quart == i].mean()) for i in range(4) if (quart == i).any()}
    img_s = win.images / max(time.monotonic() - win.start, 1e-9)
    return {"step": tr.step, "epoch": tr.batches.epoch, "loss": float(win.loss_sum) / max(win.steps, 1), **q,
            "lr": tr.sched.get_last_lr()[0], "grad_norm": float(out.grad_norm), "img_per_s": img_s,
            "skipped": tr.skipped, "time": time.time()}


def skip_record(tr: Trainer, out: Skipped) -> dict[str, Any]:
    """The log.jsonl record of a step thrown away."""
    # numbered as the step it failed to be, so a resume from step N drops it with the later records
    return {"step": tr.step + 1, "event": "skipped", "loss": out.loss, "grad_norm": out.grad_norm,
            "skipped": tr.skipped, "time": time.time()}


def periodic_samples(tr: Trainer, path: Path, n: int) -> torch.Tensor:
    """A grid from the EMA weights with a 20-step DPM-Solver++ (fast, close to ancestral); a
    conditional model draws every class (unguided), one row each."""
    net = tr.ema.model if tr.ema is not None else tr.model
    was_training = net.training
    net.eval()
    lm = LoadedModel(net, tr.schedule, tr.cfg, tr.step, tr.run_dir)
    classes = "all" if tr.cfg.model.num_classes else None
    s = generate(lm, SampleConfig(sampler="dpm++2m", steps=min(20, tr.cfg.diffusion.timesteps), n=n, classes=classes))
    rows, nrow = s.class_rows()
    save_grid(s.images if rows is None else rows, path, nrow=nrow)
    net.train(was_training)
    return s.images
