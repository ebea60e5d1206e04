"""Training a run: :func:`train`, the public entry, and the names of the training modules.

The work lives in modules of its own: :mod:`.run` (the one training API, :func:`run_training`),
:mod:`.trainer` (the Trainer and its step), :mod:`.loop` (the loop, signals, budgets),
:mod:`.records` (log records, sample grids), :mod:`.ema` (EMA, learning-rate schedule, step
budget), :mod:`.data`, :mod:`.runfolder` and :mod:`.validate`. Every name imported from here
before that split still is.

Resuming is exact: a run killed at any moment and restarted with ``resume=True`` ends, on the
same device and thread count, with the same bits as a run that was never stopped, because the
checkpoint holds everything the next step reads (weights, EMA, optimiser, learning-rate
schedule, step, data order, the noise generator and torch's global RNG).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig
from .data import check_data, check_labels, load_data, place_data, with_class_counts, with_class_names
from .ema import EMA, lr_lambda, step_budget
from .loop import Interrupted, TrainResult, train_loop
from .records import Window, log_record, periodic_samples, skip_record
from .run import MakeTrainer, run_training
from .runfolder import (agree, check_resume_config, forget_unused_run, prepare_run_dir, refusal, remove_if_empty,
                        resume_config)
from .trainer import MAX_BAD_STEPS, Skipped, StepOut, Trainer, build_model, drop_labels, dry_run
from .validate import MAX_TIMESTEPS, validate

# the names these had inside the one module they came from
from .loop import _StopFlag as _StopFlag  # noqa: F401
_load_data, _check_data, _check_labels, _place_data = load_data, check_data, check_labels, place_data
_loop, _refusal, _agree = train_loop, refusal, agree
_Window, _log_record, _skip_record = Window, log_record, skip_record

__all__ = [
    "EMA", "MAX_BAD_STEPS", "MAX_TIMESTEPS", "Interrupted", "MakeTrainer", "Skipped", "StepOut", "TrainResult",
    "Trainer", "Window", "agree", "build_model", "check_data", "check_labels", "check_resume_config", "drop_labels",
    "dry_run", "forget_unused_run", "load_data", "log_record", "lr_lambda", "periodic_samples", "place_data",
    "prepare_run_dir", "refusal", "remove_if_empty", "resume_config", "run_training", "skip_record", "step_budget",
    "train", "train_loop", "validate", "with_class_counts", "with_class_names",
]


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, device: str = "auto",
          progress: bool = True, data: torch.Tensor | None = None, log: Callable[[str], None] = print,
          tensorboard: bool = True, labels: torch.Tensor | None = None) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` until its budget runs out (or a signal); always checkpoint.

    Everything is checked (config, folder, checkpoint, data) before the first file is written.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process runs this, the main one writing.
    A conditional run (``model.num_classes`` > 0) takes ``labels`` (N,) with ``data``, or reads
    them from its source; its class names are stored in the run's config. The work is
    :func:`~ddpm.training.run.run_training` with the plain :class:`Trainer`.
    """
    return run_training(cfg, run_dir, Trainer, resume=resume, device=device, progress=progress, data=data,
                        labels=labels, log=log, tensorboard=tensorboard)
