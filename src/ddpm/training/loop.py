"""The loop of a run: steps until the budget runs out or a signal arrives, with its log records,
sample grids, guiding model and checkpoints on their schedules; always a checkpoint at the end."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..pictures.viz import make_grid
from ..runtime.progress import BudgetBar
from .records import Window, log_record, periodic_samples, skip_record
from .runlog import LOG_NAME, JsonLog, TensorBoard
from .trainer import Skipped, StepOut, Trainer


@dataclass
class TrainResult:
    """What a run ended with: its last step and checkpoint, its speed, its skipped steps."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    images_per_sec: float
    interrupted: bool
    skipped: int = 0
    model: nn.Module | None = None  # the trained network (raw weights, not the EMA)
    main: bool = True  # False in the other processes of a multi-process run


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; exit status 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class _StopFlag:
    """SIGINT/SIGTERM set a flag so the loop saves and stops; a second one exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # the user insists: no checkpoint, no cleanup
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class _Clock:
    """The time budget and the speed measured since this invocation started."""

    deadline: float | None
    start: float = field(default_factory=time.monotonic)
    images: int = 0

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def _halt(tr: Trainer, stop: _StopFlag, clock: _Clock) -> int | None:
    """Whether to stop before the next step: 0 for the time budget, a signal number for a
    signal, None to go on. Agreed by every process, so that all stop after the same step."""
    signum, expired = tr.dist.max([float(stop.signum or 0), float(clock.expired())], tr.device)
    if signum:
        stop.signum = int(signum)  # a signal that reached any process stops them all
        return int(signum)
    return 0 if expired else None


def train_loop(tr: Trainer, progress: bool, tb: TensorBoard) -> TrainResult:
    """Steps until the budget (steps, epochs, minutes) runs out or a signal arrives; a checkpoint
    at the end either way, and :class:`Interrupted` raised after it for a signal."""
    tc = tr.cfg.train
    clock = _Clock(time.monotonic() + tc.minutes * 60 if tc.minutes else None)
    start_step, ck = tr.step, tr.resumed_from
    bar = BudgetBar(tr.horizon, tr.step, tc.minutes, progress)  # a --minutes budget: the clock's time left
    log, win = JsonLog(tr.run_dir / LOG_NAME, tr.dist.main), Window()
    try:
        with _StopFlag() as stop:
            while (tr.horizon is None or tr.step < tr.horizon) and _halt(tr, stop, clock) is None:
                out = tr.train_step()
                if isinstance(out, Skipped):
                    log.write(skip_record(tr, out))
                    tr.check_diverged(out)
                    continue
                done = tr.step - start_step
                if tr.horizon is None and clock.deadline and done >= 20 and done % 20 == 0:
                    tr.lr_horizon = _estimate_horizon(tr, clock.deadline, clock.start, done)
                clock.images += tc.batch_size
                ck = _after_step(tr, out, win, log, tb, bar) or ck
                bar.update(1)
            if ck is None or ck.name != f"step-{tr.step:08d}":
                ck = tr.save()
            tr.dist.barrier()  # no process returns before the checkpoint is on disk
    finally:
        bar.close()
        log.close()
        tb.close()
    if stop.signum is not None:
        raise Interrupted(stop.signum, tr.step, ck)
    elapsed = time.monotonic() - clock.start
    return TrainResult(tr.run_dir, tr.step, ck, clock.images / max(elapsed, 1e-9), False, tr.skipped, tr.model,
                       tr.dist.main)


def _after_step(tr: Trainer, out: StepOut, win: Window, log: JsonLog, tb: TensorBoard, bar: Any) -> Path | None:
    """Log, sample and checkpoint on their schedules; the new checkpoint, if one was written."""
    tc = tr.cfg.train
    win.add(tc.batch_size, out.loss.detach())
    if tr.step % tc.log_every == 0 or tr.step == 1:
        win.loss_sum = tr.dist.mean(torch.as_tensor(win.loss_sum))  # the global batch's loss
        rec = log_record(tr, out, win)
        log.write(rec)
        tb.scalars(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
        win.reset()
    if tc.sample_every and tr.step % tc.sample_every == 0 and tr.dist.main:
        images = periodic_samples(tr, tr.run_dir / "samples" / f"step-{tr.step:08d}.png", tc.sample_n)
        tb.image(make_grid(images), tr.step)
    if tc.guide_at and tr.guide_due():
        tr.save_guide()
    if tc.checkpoint_every and tr.step % tc.checkpoint_every == 0:
        return tr.save()
    return None


def _estimate_horizon(tr: Trainer, deadline: float, t_start: float, done: int) -> int:
    """With a time budget only, the cosine schedule's length from the speed so far; re-estimated
    every 20 steps, so a machine that speeds up or slows down still ends near lr 0, on time."""
    per_step = (time.monotonic() - t_start) / done
    left = (deadline - time.monotonic()) / per_step
    left = -tr.dist.max([-left], tr.device)[0]  # the slowest process's estimate, so all agree
    return tr.step + max(1, int(left))
