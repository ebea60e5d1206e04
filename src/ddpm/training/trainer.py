"""The Trainer: the network, optimiser, EMA, data order and RNG of a run; one optimisation step
(DDPM Algorithm 1), its save and restore, and the guiding model it keeps.

Resuming is exact: the state a checkpoint holds is everything the next step reads (weights,
EMA, optimiser, learning-rate schedule, step, data order, the noise generator and torch's
global RNG), so a resumed run ends with the same bits as one never stopped.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checkpoint import (GUIDE, Checkpoint, checkpoint_path, has_guide, last_good_checkpoint, load_into,
                          save_checkpoint, save_snapshot)
from ..config import RunConfig
from ..core.diffusion import sample_noise, training_losses
from ..core.objectives import get_objective
from ..core.schedules import make_schedule
from ..data.readers import Batches, to_model_range
from ..errors import DdpmError
from ..files import atomic_write_text, shorten
from ..nn import build_network, count_parameters
from ..runtime.distributed import Dist
from ..runtime.precision import Trial, autocast_dtype, describe, resolve_precision, under_autocast
from ..sampling.generate import process_of
from .data import place_data
from .ema import EMA, lr_lambda, step_budget

MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops


def build_model(cfg: RunConfig) -> nn.Module:
    """The run's network (ddpm.nn.build_network: impossible sizes are one line)."""
    return build_network(cfg.model)


def drop_labels(y: torch.Tensor, p: float, null: int, gen: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): each label becomes
    the null class with probability p."""
    drop = torch.rand(y.shape, generator=gen, device=gen.device).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null), y)


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

    ema_everywhere = False  # whether every process of a job keeps the EMA (the main one alone saves it)

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
        # only the main process samples and saves, unless the step itself reads the EMA
        keep_ema = cfg.train.ema_decay > 0 and (dist.main or self.ema_everywhere)
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup) if keep_ema else None
        self.batches = Batches(place_data(data, device), cfg.train.batch_size, seed=cfg.train.seed,
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

    # -- what the run says ---------------------------------------------------------------
    def start_line(self, images: int) -> str:
        """The line said as the run starts: what it trains, on what, where."""
        procs = f", {self.dist.world} processes" if self.dist.active else ""
        return (f"training {count_parameters(self.model):,} parameters on {images:,} images ({self.device}, "
                f"{describe(self.amp)}{procs}), run folder {self.run_dir}")

    def resumed_line(self) -> str:
        """The line said when the run continues from its checkpoint."""
        return f"resumed {self.run_dir} at step {self.step}"

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
