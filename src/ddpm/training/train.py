"""The training loop: step, EMA, logging, periodic samples, checkpoints, resume, signals.

Resuming is exact: a run killed at any moment and restarted with ``resume=True`` ends, on the
same device and thread count, with the same bits as a run that was never stopped, because the
checkpoint holds everything the next step reads (weights, EMA, optimiser, learning-rate
schedule, step, data order, the noise generator and torch's global RNG).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..checkpoint import (GUIDE, Checkpoint, checkpoint_path, last_good_checkpoint, load_checkpoint, load_into,
                         has_guide, save_checkpoint, save_snapshot)
from ..files import (LOCK_NAME, atomic_write_text, check_outside_run_files, check_unlocked, run_lock, shorten,
                     signals_held)
from ..config import RunConfig, check_model_config, check_seed
from ..data.readers import Batches, to_model_range
from ..data.sources import class_names, load_dataset, load_labeled_dataset
from ..core.diffusion import sample_noise, training_losses
from ..core.objectives import get_objective
from ..core.processes import make_process
from ..runtime.distributed import Dist, from_env, shutdown
from ..errors import DdpmError
from ..nn import build_network, check_image_size, count_parameters
from ..runtime.precision import (Trial, autocast_dtype, cuda_math_state, describe, fast_cuda_math, resolve_precision,
                                 restore_cuda_math,
                                 under_autocast)
from ..runtime.budget import check_training_memory
from ..runtime.progress import BudgetBar
from .runlog import LOG_NAME, JsonLog, TensorBoard, reset_log
from ..config import SampleConfig
from ..core.schedules import make_schedule
from ..runtime.device import resolve_device
from ..sampling.generate import LoadedModel, generate, process_of
from ..pictures.viz import make_grid, save_grid

MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops
MAX_TIMESTEPS = 1_000_000  # far above any discrete schedule in use; beyond, the tables alone fill memory


@dataclass
class TrainResult:
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _validate_train(cfg: RunConfig) -> None:
    tc = cfg.train
    for name in ("lr", "adam_beta2", "epochs", "minutes", "ema_decay", "max_grad_norm"):
        v = getattr(tc, name)
        if v is not None and not math.isfinite(v):  # NaN passes every comparison below
            raise DdpmError(f"{_flag(name)} must be a finite number, got {v}")
    if tc.batch_size < 1:
        raise DdpmError(f"batch size must be at least 1, got {tc.batch_size}")
    check_seed(tc.seed)
    if not tc.lr > 0:
        raise DdpmError(f"learning rate must be positive, got {tc.lr}")
    if not 0 <= tc.adam_beta2 < 1:
        raise DdpmError(f"--adam-beta2 must be in [0, 1), got {tc.adam_beta2}")
    if not 0 <= tc.ema_decay < 1:
        raise DdpmError(f"EMA decay must be in [0, 1), got {tc.ema_decay}")
    for name in ("epochs", "max_steps", "minutes", "max_grad_norm"):
        v = getattr(tc, name)
        if v is not None and v <= 0:
            raise DdpmError(f"{_flag(name)} must be positive, got {v}")
    for name, least in (("log_every", 1), ("keep", 1), ("sample_n", 1), ("checkpoint_every", 0),
                        ("sample_every", 0), ("warmup_steps", 0)):
        if getattr(tc, name) < least:
            raise DdpmError(f"{_flag(name)} must be at least {least}, got {getattr(tc, name)}")
    if tc.epochs is None and tc.max_steps is None and tc.minutes is None:
        raise DdpmError("no budget: give --epochs, --max-steps or --minutes")
    if not (math.isfinite(tc.guide_at) and 0 <= tc.guide_at < 1):
        raise DdpmError(f"--guide-at must be in [0, 1) (a fraction of the budget; 0: none), got {tc.guide_at}")


def _validate_diffusion(cfg: RunConfig) -> None:
    dc = cfg.diffusion
    if not 1 <= dc.timesteps <= MAX_TIMESTEPS:
        raise DdpmError(f"--timesteps must be between 1 and {MAX_TIMESTEPS:,}, got {dc.timesteps}")
    for name in ("min_snr_gamma", "offset_noise", "vlb_weight"):
        v = getattr(dc, name)
        if not (math.isfinite(v) and v >= 0) or (name == "min_snr_gamma" and v == 0):
            raise DdpmError(f"{_flag(name)} must be a finite number {'> 0' if name == 'min_snr_gamma' else '>= 0'}"
                            f", got {v}")
    if not (math.isfinite(dc.lognormal_mean) and math.isfinite(dc.lognormal_std) and dc.lognormal_std > 0):
        raise DdpmError(f"--lognormal-mean must be finite and --lognormal-std finite and > 0, got "
                        f"{dc.lognormal_mean} and {dc.lognormal_std}")
    make_schedule(cfg)  # unknown schedule / bad betas
    make_process(cfg)  # unknown process / bad sigmas
    get_objective(dc.objective, dc.sigma_data, dc.process)  # unknown, or unfit for the process
    for name in ("logit_mean", "logit_std", "sigma_data"):
        v = getattr(dc, name)
        if not math.isfinite(v) or (name != "logit_mean" and v <= 0):
            raise DdpmError(f"{_flag(name)} must be a finite number{'' if name == 'logit_mean' else ' > 0'}, got {v}")
    if dc.process != "vp" and cfg.model.learn_sigma:
        raise DdpmError(f"learned variances (--learn-sigma) are the discrete chain's (vp); the {dc.process} "
                        "process has no reverse-step variance to learn")


def _validate_model(cfg: RunConfig) -> None:
    k, names = cfg.model.num_classes, cfg.data.class_names
    if k < 0:
        raise DdpmError(f"--num-classes must be 0 (unconditional) or more, got {k}")
    if not 0 <= cfg.train.cond_drop <= 1:  # NaN fails too
        raise DdpmError(f"--cond-drop must be between 0 and 1, got {cfg.train.cond_drop}")
    if k and names and len(names) != k:
        raise DdpmError(f"the model has {k} classes but the data has {len(names)} ({', '.join(names)}); "
                        f"use --num-classes {len(names)} or --cond")
    if cfg.data.channels != cfg.model.channels:
        raise DdpmError(f"data has {cfg.data.channels} channels but the model takes {cfg.model.channels}")
    check_model_config(cfg.model)
    check_image_size(cfg.model, cfg.data.image_size)


def build_model(cfg: RunConfig) -> nn.Module:
    """The run's network (ddpm.nn.build_network: impossible sizes are one line)."""
    return build_network(cfg.model)


def with_class_names(cfg: RunConfig) -> RunConfig:
    """A conditional config with its data's class names filled in (stored with the run, so that
    sampling can take a name); an unconditional one unchanged."""
    if cfg.model.num_classes == 0 or cfg.data.class_names:
        return cfg
    names = class_names(cfg.data.source, cfg.data.data_dir)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_names=names))


def with_class_counts(cfg: RunConfig, labels: torch.Tensor | None, ck: Checkpoint | None = None) -> RunConfig:
    """A conditional config with its training images per class (the proportions sampling's
    default draw of labels follows); a resumed run keeps what its checkpoint recorded, so that
    an older run without them resumes as it was."""
    if labels is None or cfg.model.num_classes == 0:
        return cfg
    if ck is not None:
        counts = ck.config.data.class_counts
    else:
        counts = tuple(int(c) for c in torch.bincount(labels, minlength=cfg.model.num_classes))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_counts=counts))


def drop_labels(y: torch.Tensor, p: float, null: int, gen: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): each label becomes
    the null class with probability p."""
    drop = torch.rand(y.shape, generator=gen, device=gen.device).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null), y)


def validate(cfg: RunConfig) -> None:
    """Reject nonsensical settings before any data is loaded or any file is written."""
    _validate_train(cfg)
    _validate_diffusion(cfg)
    _validate_model(cfg)


class StepOut(NamedTuple):
    """One optimiser step that was taken."""

    loss: torch.Tensor  # scalar
    per_sample: torch.Tensor  # (B,)
    t: torch.Tensor  # (B,)
    grad_norm: torch.Tensor  # before clipping


class Skipped(NamedTuple):
    """A step thrown away because its loss or gradient was not finite."""

    loss: float
    grad_norm: float


def _adam(params: list[nn.Parameter], lr: float, beta2: float = 0.999) -> torch.optim.Adam:
    """Fused Adam where the build has it (CPU from torch 2.4, CUDA): faster steps (bench/levers.py)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, beta2), fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, beta2), foreach=True)


class Trainer:
    """Holds the model, optimiser, EMA, data order and RNG; runs steps; saves and restores."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: torch.Tensor, device: torch.device,
                 dist: Dist = Dist(), labels: torch.Tensor | None = None):
        self.cfg, self.run_dir, self.device, self.dist = cfg, run_dir, device, dist
        torch.manual_seed(cfg.train.seed)  # the same initial weights in every process
        self.model = build_model(cfg).to(device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = make_schedule(cfg).to(device)
        self.process = process_of(cfg, self.schedule)  # vp: the chain on this schedule
        self.objective = get_objective(cfg.diffusion.objective, cfg.diffusion.sigma_data, cfg.diffusion.process)
        self.opt = _adam(list(self.model.parameters()), cfg.train.lr, cfg.train.adam_beta2)
        keep_ema = cfg.train.ema_decay > 0 and dist.main  # only the main process samples and saves
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup) if keep_ema else None
        self.batches = Batches(_place_data(data, device), cfg.train.batch_size, seed=cfg.train.seed,
                               flip=cfg.data.flip, labels=None if labels is None else labels.to(device))
        self.gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
        self.step = 0
        self.horizon = step_budget(cfg, self.batches.steps_per_epoch)
        self.bad_steps = 0
        self.skipped = 0
        self.resumed_from: Path | None = None
        self.config_pending = False  # RUN/config.json still to be written (see save)
        net: nn.Module = self.model
        if dist.active:  # averages the gradients over processes inside backward()
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
        self.forward = torch.compile(net) if cfg.train.compile else net
        # auto: the faster arithmetic for this network and this process's share of the batch
        trial = Trial(self.model, (max(1, cfg.train.batch_size // dist.world), cfg.model.channels,
                                   cfg.data.image_size, cfg.data.image_size), training=True,
                      num_classes=cfg.model.num_classes, channels_last=cfg.train.channels_last)
        choice = resolve_precision(cfg.train.precision, device, trial)
        if cfg.train.precision == "auto" and dist.max([float(choice == "fp32")], device)[0]:
            choice = "fp32"  # each process timed its own trial: one arithmetic for the job, fp32 if any says so
        self.amp = autocast_dtype(choice, device)
        self.net_fn = under_autocast(self.forward, device, self.amp)
        # fp16's narrow range needs the loss scaled up (and the gradients back down); bf16 does not
        self.scaler = torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None
        self.lr_horizon = self.horizon  # for the cosine: with a time budget, re-estimated as it runs
        self.guide_kept = False  # RUN/guide written (train.guide_at); checked on disk when due
        self.lr_fn = lr_lambda(cfg, lambda: self.lr_horizon)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_fn)

    # -- one optimisation step ----------------------------------------------------------
    def train_step(self) -> StepOut | Skipped:
        """DDPM Algorithm 1, one batch; a non-finite loss or gradient leaves the weights alone.

        Every process draws the same global batch, t and noise and keeps its own slice
        (see :mod:`ddpm.runtime.distributed`)."""
        x0, y = self.batches.next_labeled()
        x0 = x0.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        dc = self.cfg.diffusion
        draw = self.process.draw(x0.shape[0], dc.t_sampling, device=self.device, generator=self.gen)
        noise = sample_noise(x0, dc.offset_noise, self.gen)
        k = self.cfg.model.num_classes
        y = drop_labels(y.to(self.device), self.cfg.train.cond_drop, k, self.gen) if k else None
        if self.dist.active:
            part = self.dist.shard(x0.shape[0])
            x0, draw, noise = x0[part], draw.part(part), noise[part]
            y = None if y is None else y[part]
        terms = training_losses(self.net_fn, self.schedule, dc, x0, draw, noise, learn_sigma=self.cfg.model.learn_sigma,
                                cond=y, objective=self.objective)
        # the step index logged by quarter of the path (a continuous t in [0, 1] counted on T steps)
        t = draw.index if draw.index is not None else (draw.t * dc.timesteps).long().clamp(max=dc.timesteps - 1)
        return self.optimize(terms.loss, terms.per_sample, t)

    def optimize(self, loss: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor) -> StepOut | Skipped:
        """Backward, clip, Adam, EMA: the half of a step that any loss shares (distillation too)."""
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        clip = self.cfg.train.max_grad_norm
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        bad = not (torch.isfinite(loss) and torch.isfinite(gnorm))
        if self.dist.max([float(bad)], self.device)[0]:  # every process skips the same steps
            return self._bad_step(float(loss.detach()), float(gnorm))
        self.bad_steps = 0
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return StepOut(loss.detach(), per_sample.detach(), t, gnorm)

    def _bad_step(self, loss: float, gnorm: float) -> Skipped:
        if self.scaler is not None:
            self.scaler.update()  # an fp16 overflow: halve the loss scale
        self.bad_steps += 1
        self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        return Skipped(loss, gnorm)

    def check_diverged(self, last: Skipped) -> None:
        """Stop after MAX_BAD_STEPS skipped steps in a row: more will not help."""
        if self.bad_steps >= MAX_BAD_STEPS:
            what = "losses" if not math.isfinite(last.loss) else "gradients"
            raise DdpmError(
                f"{self.bad_steps} non-finite {what} in a row after step {self.step} (loss {last.loss}, gradient "
                f"norm {last.grad_norm}): the learning rate is probably too high (try a lower --lr or a "
                f"--max-grad-norm); the last good checkpoint is {last_good_checkpoint(self.run_dir)}")

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step, "optimizer": self.opt.state_dict(), "lr_sched": self.sched.state_dict(),
            "batches": self.batches.state_dict(), "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(), "horizon": self.horizon if self.horizon is not None else -1,
            "skipped": self.skipped,
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def save(self) -> Path:
        """Write a checkpoint (the main process only; the others just name it)."""
        if not self.dist.main:
            return checkpoint_path(self.run_dir, self.step)
        ema = self.ema.model.state_dict() if self.ema is not None else None
        ck = save_checkpoint(self.run_dir, config=self.cfg, step=self.step, model=self.model.state_dict(),
                             ema=ema, state=self.state(), keep=self.cfg.train.keep)
        if self.config_pending:  # a resumed run's new settings: written once they have made a checkpoint
            atomic_write_text(self.run_dir / "config.json", self.cfg.to_json())
            self.config_pending = False
        return ck

    def guide_due(self) -> bool:
        """Whether this step crossed ``guide_at`` of the budget with no guiding model kept yet
        (a time budget: of the step count it is estimated to reach)."""
        horizon = self.horizon if self.horizon is not None else self.lr_horizon
        if self.guide_kept or horizon is None or self.step < self.cfg.train.guide_at * horizon:
            return False
        self.guide_kept = has_guide(self.run_dir)  # a resumed run keeps its first
        return not self.guide_kept

    def save_guide(self) -> None:
        """Keep the EMA weights (the raw ones without EMA) as RUN/guide, autoguidance's guiding model."""
        self.guide_kept = True
        if self.dist.main:
            weights = self.ema.model.state_dict() if self.ema is not None else self.model.state_dict()
            save_snapshot(self.run_dir / GUIDE, config=self.cfg, step=self.step, model=weights, ema=None)

    def restore(self, ck: Checkpoint) -> None:
        """Continue from a checkpoint loaded with its training state."""
        load_into(self.model, ck.model, ck.path)
        if self.ema is not None:
            load_into(self.ema.model, ck.ema if ck.ema is not None else ck.model, ck.path)
        st = ck.state
        try:
            self.step = int(st["step"])
            # the horizon comes from this invocation's budget, which --resume may extend
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["lr_sched"])
            self.batches.load_state_dict(st["batches"])
            self.gen.set_state(st["gen"])
            torch.set_rng_state(st["torch_rng"])
            self.skipped = int(st["skipped"])
            if self.scaler is not None and "scaler" in st:
                self.scaler.load_state_dict(st["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise DdpmError(f"checkpoint {ck.path} has an unusable training state ({e})") from None
        self._sync_lr()
        self.resumed_from = ck.path

    def _sync_lr(self) -> None:
        """This invocation's --lr and budget set the learning rate: the scheduler's saved base_lrs
        would otherwise silently win over a changed --lr. Same arithmetic as LambdaLR, so an
        unchanged config gives the same bits."""
        lr = self.cfg.train.lr
        self.sched.base_lrs = [lr for _ in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["initial_lr"], g["lr"] = lr, lr * self.lr_fn(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]  # what get_last_lr() reports


# -------------------------------------------------------------------------- run folder


def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> list[Path]:
    """Check the run folder before anything is loaded: not another run's, writable, same config on resume.

    Nothing in an existing run changes here (only a probe file is created and removed). Returns
    the folders it made, deepest first, for :func:`remove_if_empty` should the run fail."""
    if not resume and (run_dir / "latest").exists():
        raise DdpmError(f"{run_dir} already holds a run; use --resume to continue it or pick another --name/--out")
    if resume and not (run_dir / "latest").exists() and not any((run_dir / "checkpoints").glob("step-*")):
        raise DdpmError(f"--resume: {run_dir} has no checkpoint to resume from")
    check_outside_run_files(run_dir)  # e.g. inside another run's checkpoints/: pruned with them
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    probe = run_dir / f".write-test{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")  # one byte: a full disk fails here, before any data is loaded
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        remove_if_empty(made)
        raise DdpmError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from None
    return made


def _refusal(check: Callable[[], object]) -> DdpmError | None:
    """The one-line error ``check`` raises, or None."""
    try:
        check()
    except DdpmError as e:
        return e
    return None


def _agree(refused: DdpmError | None, dist: Dist, device: torch.device, run_dir: Path) -> None:
    """Raise in every process of the job when any refused the run folder (the main process alone
    checks its lock): none is left waiting for the others in a collective."""
    if dist.max([float(refused is not None)], device)[0]:
        raise refused or DdpmError(f"the main process of this job refused the run folder {run_dir}")


def remove_if_empty(folders: list[Path]) -> None:
    """A failed run leaves no empty folder behind (only folders it made, only while empty)."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def forget_unused_run(run_dir: Path, new_files: list[Path]) -> None:
    """A new run stopped before its first checkpoint could never be sampled or resumed: remove
    the files this call made for it (never one that was there before)."""
    import shutil

    if (run_dir / "latest").exists():
        return
    with signals_held():
        for p in new_files:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def resume_config(run_dir: str | Path) -> RunConfig | None:
    """The config a --resume continues from: the (verified) one stored in the run's latest
    checkpoint, never RUN/config.json, which a hand edit may have cut short; None without one."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest").exists() and not any((run_dir / "checkpoints").glob("step-*")):
        return None
    return load_checkpoint(run_dir).config


def dry_run(tr: Trainer, data: torch.Tensor) -> None:
    """One forward pass on one image before any file is written: a network that cannot take
    these images (or whose output the loss cannot use) is refused here, not at the first step."""
    x = to_model_range(data[:1].to(tr.device))
    t = torch.zeros(1, dtype=torch.long, device=tr.device)
    want = (1, tr.cfg.model.channels * (2 if tr.cfg.model.learn_sigma else 1), *x.shape[2:])
    try:
        with torch.no_grad():
            got = tuple(tr.model(x, t).shape)
    except (RuntimeError, ValueError, IndexError) as e:
        raise DdpmError(f"the network of this config cannot run on these images: {shorten(str(e))}") from None
    if got != want:
        raise DdpmError(f"the network of this config outputs {got} for an input {tuple(x.shape)}; sampling needs {want}")


def check_resume_config(ck: Checkpoint, cfg: RunConfig) -> None:
    """Only the training section may change on --resume; the network and data must stay."""
    # the class counts are the data's, filled in by training: not a setting a flag changes
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_counts=ck.config.data.class_counts))
    diff = [k for k in ("model", "diffusion", "data") if getattr(ck.config, k) != getattr(cfg, k)]
    if diff:
        raise DdpmError(f"--resume with a different {diff[0]} config than the checkpoint {ck.path}; "
                        "drop the changed flags")


# -------------------------------------------------------------------------- the run


@dataclass
class _Window:
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


def _log_record(tr: Trainer, out: StepOut, win: _Window) -> dict[str, Any]:
    T = tr.cfg.diffusion.timesteps
    quart = (out.t * 4 // T).clamp(max=3)
    q = {f"loss_q{i}": float(out.per_sample[quart == i].mean()) for i in range(4) if (quart == i).any()}
    img_s = win.images / max(time.monotonic() - win.start, 1e-9)
    return {"step": tr.step, "epoch": tr.batches.epoch, "loss": float(win.loss_sum) / max(win.steps, 1), **q,
            "lr": tr.sched.get_last_lr()[0], "grad_norm": float(out.grad_norm), "img_per_s": img_s,
            "skipped": tr.skipped, "time": time.time()}


def _skip_record(tr: Trainer, out: Skipped) -> dict[str, Any]:
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


def _place_data(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA a data set that fits easily (Fashion-MNIST is 47 MB) lives on the GPU as uint8, so
    a batch is one indexing kernel with no host copy; a larger one stays on the host."""
    if device.type != "cuda":
        return data
    free, _ = torch.cuda.mem_get_info(device)
    return data.to(device) if data.nbytes < free // 4 else data


def _load_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training images (and labels for a conditional run); each skipped unreadable file
    becomes one ``warning:`` line on stderr."""
    d = cfg.data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cfg.model.num_classes:
            lab = load_labeled_dataset(d.source, size=d.image_size, channels=d.channels, data_dir=d.data_dir)
            if lab.class_names != d.class_names:
                raise DdpmError(f"the run's classes {list(d.class_names)} are not the data's {list(lab.class_names)}")
            data, labels = lab.images, lab.labels
        else:
            data = load_dataset(d.source, size=d.image_size, channels=d.channels, data_dir=d.data_dir)
            labels = None
        if d.test_source:  # read only by evaluations, minutes later: a wrong path is said now
            from ..data.sources import describe as describe_source

            describe_source(d.test_source, d.data_dir)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return data, labels


def _check_labels(cfg: RunConfig, data: torch.Tensor, labels: torch.Tensor | None) -> None:
    k = cfg.model.num_classes
    if not k:
        return
    if labels is None or labels.shape != (len(data),) or labels.dtype != torch.long:
        raise DdpmError(f"a conditional run needs int64 labels, one per image ({len(data)},)")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise DdpmError(f"labels must lie in [0, {k - 1}], got {int(labels.min())}..{int(labels.max())}")


def _check_data(cfg: RunConfig, data: torch.Tensor) -> None:
    want = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if data.dtype != torch.uint8 or data.ndim != 4 or tuple(data.shape[1:]) != want:
        raise DdpmError(f"data must be uint8 (N, {', '.join(map(str, want))}), got {data.dtype} {tuple(data.shape)}")


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, device: str = "auto",
          progress: bool = True, data: torch.Tensor | None = None, log: Callable[[str], None] = print,
          tensorboard: bool = True, labels: torch.Tensor | None = None) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` until its budget runs out (or a signal); always checkpoint.

    Everything is checked (config, folder, checkpoint, data) before the first file is written.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process runs this, the main one writing.
    A conditional run (``model.num_classes`` > 0) takes ``labels`` (N,) with ``data``, or reads
    them from its source; its class names are stored in the run's config.
    """
    cfg = with_class_names(cfg)
    validate(cfg)
    run_dir = Path(run_dir)
    dist, dev = from_env(resolve_device(device))
    autocast_dtype(cfg.train.precision, dev)  # fp16 without CUDA: refused before any file is touched
    check_training_memory(cfg, dev, world=dist.world)  # a step the machine cannot hold: before the data loads
    caller_math = cuda_math_state()  # train.tf32 holds for this call; the caller's settings come back after
    fast_cuda_math(cfg.train.tf32)
    made: list[Path] = []
    new_files: list[Path] = []  # what this call adds to a new run, until its first checkpoint
    try:
        if cfg.train.batch_size % dist.world:
            raise DdpmError(f"the batch size {cfg.train.batch_size} (the global batch) does not split evenly "
                            f"over {dist.world} processes")
        # another command writing this run: refused before any work, in every process of the job
        _agree(_refusal(lambda: check_unlocked(run_dir)) if dist.main else None, dist, dev, run_dir)
        made = prepare_run_dir(run_dir, cfg, resume)
        ck = load_checkpoint(run_dir, with_state=True) if resume else None
        if ck is not None:
            check_resume_config(ck, cfg)
        if data is None:
            data, labels = _load_data(cfg)
        _check_data(cfg, data)
        _check_labels(cfg, data, labels)
        cfg = with_class_counts(cfg, labels, ck)
        tr = Trainer(cfg, run_dir, data, dev, dist, labels)
        dry_run(tr, data)
        say = log if dist.main else (lambda _: None)
        if ck is not None:
            tr.restore(ck)
            say(f"resumed {run_dir} at step {tr.step}")
        procs = f", {dist.world} processes" if dist.active else ""
        say(f"training {count_parameters(tr.model):,} parameters on {len(data):,} images ({dev}, "
            f"{describe(tr.amp)}{procs}), "
            f"run folder {run_dir}")
        # from the first write on, the run is this command's: a second one writing it fails at once
        lock_file = run_dir / LOCK_NAME
        lock_is_new = not lock_file.exists()
        lock = contextlib.ExitStack()
        _agree(_refusal(lambda: lock.enter_context(run_lock(run_dir))) if dist.main else None, dist, dev, run_dir)
        try:
            with lock:
                if dist.main and ck is None:
                    new_files = [p for p in (run_dir / "config.json", run_dir / LOG_NAME, run_dir / "tb")
                                 if not p.exists()] + ([lock_file] if lock_is_new else [])
                    atomic_write_text(run_dir / "config.json", cfg.to_json())
                tr.config_pending = dist.main and ck is not None  # never a bad --resume value on disk
                if dist.main:
                    reset_log(run_dir / LOG_NAME, tr.step)
                tb = TensorBoard(run_dir / "tb", tr.step + 1, tensorboard and dist.main)
                return _loop(tr, progress and dist.main, tb)
        except OSError as e:  # the log, a sample grid or TensorBoard: checkpoints report their own
            raise DdpmError(f"cannot write {e.filename or run_dir}: {e.strerror or e}; "
                            f"the last good checkpoint is {last_good_checkpoint(run_dir)}") from None
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            forget_unused_run(run_dir, new_files)
        remove_if_empty(made)
        raise
    finally:
        restore_cuda_math(caller_math)
        shutdown(dist)


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


def _loop(tr: Trainer, progress: bool, tb: TensorBoard) -> TrainResult:
    tc = tr.cfg.train
    clock = _Clock(time.monotonic() + tc.minutes * 60 if tc.minutes else None)
    start_step, ck = tr.step, tr.resumed_from
    bar = BudgetBar(tr.horizon, tr.step, tc.minutes, progress)  # a --minutes budget: the clock's time left
    log, win = JsonLog(tr.run_dir / LOG_NAME, tr.dist.main), _Window()
    try:
        with _StopFlag() as stop:
            while (tr.horizon is None or tr.step < tr.horizon) and _halt(tr, stop, clock) is None:
                out = tr.train_step()
                if isinstance(out, Skipped):
                    log.write(_skip_record(tr, out))
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


def _after_step(tr: Trainer, out: StepOut, win: _Window, log: JsonLog, tb: TensorBoard, bar: Any) -> Path | None:
    """Log, sample and checkpoint on their schedules; the new checkpoint, if one was written."""
    tc = tr.cfg.train
    win.add(tc.batch_size, out.loss.detach())
    if tr.step % tc.log_every == 0 or tr.step == 1:
        win.loss_sum = tr.dist.mean(torch.as_tensor(win.loss_sum))  # the global batch's loss
        rec = _log_record(tr, out, win)
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
