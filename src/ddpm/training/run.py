"""The one training API: everything around a Trainer's step, for training and distillation alike.

:func:`run_training` checks the config, the run folder, the checkpoint and the data before the
first file is written, takes the run's lock (agreed by every process of a ``torchrun`` job),
builds the Trainer through the caller's factory, resumes it, runs the loop (budgets, signals,
log) and leaves nothing of a new run stopped before its first checkpoint. A new kind of
training is a Trainer subclass with its own ``train_step`` and a factory for it, never a copy
of this sequence.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch

from ..checkpoint import Checkpoint, last_good_checkpoint, load_checkpoint
from ..config import RunConfig
from ..errors import DdpmError
from ..files import LOCK_NAME, atomic_write_text, check_unlocked, run_lock
from ..runtime.budget import check_training_memory
from ..runtime.device import resolve_device
from ..runtime.distributed import Dist, from_env, shutdown
from ..runtime.precision import autocast_dtype, cuda_math_state, fast_cuda_math, restore_cuda_math
from .data import check_data, check_labels, load_data, with_class_counts, with_class_names
from .loop import TrainResult, train_loop
from .runfolder import agree, check_resume_config, forget_unused_run, prepare_run_dir, refusal, remove_if_empty
from .runlog import LOG_NAME, TensorBoard, reset_log
from .trainer import Trainer, dry_run
from .validate import validate


class MakeTrainer(Protocol):
    """What builds a run's Trainer: ``Trainer`` itself, or a factory of a subclass (the Distiller)."""

    def __call__(self, cfg: RunConfig, run_dir: Path, data: torch.Tensor, device: torch.device, dist: Dist,
                 labels: torch.Tensor | None) -> Trainer: ...


def run_training(cfg: RunConfig, run_dir: str | Path, make_trainer: MakeTrainer = Trainer, *, resume: bool = False,
                 device: str = "auto", progress: bool = True, data: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, log: Callable[[str], None] = print, tensorboard: bool = True,
                 frozen_nets: int = 0, extra_files: Mapping[str, str] | None = None) -> TrainResult:
    """Train the Trainer ``make_trainer`` builds for ``cfg`` in ``run_dir`` until its budget runs
    out (or a signal); always checkpoint.

    Everything is checked (config, folder, checkpoint, data) before the first file is written.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process runs this, the main one writing.
    ``frozen_nets``: networks the Trainer holds beside the one it trains (a teacher, a target),
    counted in the memory check. ``extra_files``: names and texts a new run writes beside its
    config.json (a distillation's distill.json), removed with it if it stops before its first
    checkpoint.
    """
    cfg = with_class_names(cfg)
    validate(cfg)
    run_dir = Path(run_dir)
    dist, dev = from_env(resolve_device(device))
    autocast_dtype(cfg.train.precision, dev)  # fp16 without CUDA: refused before any file is touched
    # a step the machine cannot hold: before the data loads
    check_training_memory(cfg, dev, world=dist.world, frozen_nets=frozen_nets)
    caller_math = cuda_math_state()  # train.tf32 holds for this call; the caller's settings come back after
    fast_cuda_math(cfg.train.tf32)
    made: list[Path] = []
    new_files: list[Path] = []  # what this call adds to a new run, until its first checkpoint
    try:
        if cfg.train.batch_size % dist.world:
            raise DdpmError(f"the batch size {cfg.train.batch_size} (the global batch) does not split evenly "
                            f"over {dist.world} processes")
        # another command writing this run: refused before any work, in every process of the job
        agree(refusal(lambda: check_unlocked(run_dir)) if dist.main else None, dist, dev, run_dir)
        made = prepare_run_dir(run_dir, cfg, resume)
        ck = load_checkpoint(run_dir, with_state=True) if resume else None
        if ck is not None:
            check_resume_config(ck, cfg)
        if data is None:
            data, labels = load_data(cfg)
        check_data(cfg, data)
        check_labels(cfg, data, labels)
        cfg = with_class_counts(cfg, labels, ck)
        tr = make_trainer(cfg, run_dir, data, dev, dist, labels)
        dry_run(tr, data)
        say = log if dist.main else (lambda _: None)
        if ck is not None:
            tr.restore(ck)
            say(tr.resumed_line())
        say(tr.start_line(len(data)))
        return _locked_run(tr, ck, new_files, progress=progress, tensorboard=tensorboard,
                           extra_files=extra_files or {})
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            forget_unused_run(run_dir, new_files)
        remove_if_empty(made)
        raise
    finally:
        restore_cuda_math(caller_math)
        shutdown(dist)


def _locked_run(tr: Trainer, ck: Checkpoint | None, new_files: list[Path], *, progress: bool, tensorboard: bool,
                extra_files: Mapping[str, str]) -> TrainResult:
    """The run's lock, its first files and the loop. ``new_files`` is filled in place with what
    a new run adds, for the caller to remove should it stop before its first checkpoint."""
    run_dir, dist, cfg = tr.run_dir, tr.dist, tr.cfg
    # from the first write on, the run is this command's: a second one writing it fails at once
    lock_file = run_dir / LOCK_NAME
    lock_is_new = not lock_file.exists()
    lock = contextlib.ExitStack()
    agree(refusal(lambda: lock.enter_context(run_lock(run_dir))) if dist.main else None, dist, tr.device, run_dir)
    try:
        with lock:
            if dist.main and ck is None:
                firsts = [run_dir / "config.json", *(run_dir / name for name in extra_files)]
                new_files += [p for p in (*firsts, run_dir / LOG_NAME, run_dir / "tb")
                              if not p.exists()] + ([lock_file] if lock_is_new else [])
                atomic_write_text(run_dir / "config.json", cfg.to_json())
                for name, text in extra_files.items():
                    atomic_write_text(run_dir / name, text)
            tr.config_pending = dist.main and ck is not None  # never a bad --resume value on disk
            if dist.main:
                reset_log(run_dir / LOG_NAME, tr.step)
            tb = TensorBoard(run_dir / "tb", tr.step + 1, tensorboard and dist.main)
            return train_loop(tr, progress and dist.main, tb)
    except OSError as e:  # the log, a sample grid or TensorBoard: checkpoints report their own
        raise DdpmError(f"cannot write {e.filename or run_dir}: {e.strerror or e}; "
                        f"the last good checkpoint is {last_good_checkpoint(run_dir)}") from None
