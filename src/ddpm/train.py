"""The training loop: step, EMA, logging, periodic samples, checkpoints, resume, signals."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import atomic_write_text, load_checkpoint, load_into, save_checkpoint
from .config import RunConfig
from .data import Batches, load_dataset
from .diffusion import sample_noise, training_losses
from .errors import DdpmError
from .nn import UNet, check_image_size, count_parameters
from .sampling import LoadedModel, SampleConfig, generate, make_schedule, resolve_device
from .viz import save_grid

MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    images_per_sec: float
    interrupted: bool


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
            os._exit(128 + signum)
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


def validate(cfg: RunConfig) -> None:
    """Reject nonsensical settings before any data is loaded."""
    tc = cfg.train
    if tc.batch_size < 1:
        raise DdpmError(f"batch size must be at least 1, got {tc.batch_size}")
    if not tc.lr > 0:
        raise DdpmError(f"learning rate must be positive, got {tc.lr}")
    if not 0 <= tc.ema_decay < 1:
        raise DdpmError(f"EMA decay must be in [0, 1), got {tc.ema_decay}")
    for name in ("epochs", "max_steps", "minutes"):
        v = getattr(tc, name)
        if v is not None and v <= 0:
            raise DdpmError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if tc.epochs is None and tc.max_steps is None and tc.minutes is None:
        raise DdpmError("no budget: give --epochs, --max-steps or --minutes")
    if cfg.diffusion.timesteps < 1:
        raise DdpmError(f"timesteps must be at least 1, got {cfg.diffusion.timesteps}")
    if cfg.data.channels != cfg.model.channels:
        raise DdpmError(f"data has {cfg.data.channels} channels but the model takes {cfg.model.channels}")
    check_image_size(cfg.model, cfg.data.image_size)
    make_schedule(cfg)  # unknown schedule / bad betas


class Trainer:
    """Holds the model, optimiser, EMA, data order and RNG; runs steps; saves and restores."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: torch.Tensor, device: torch.device):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        torch.manual_seed(cfg.train.seed)
        self.model = UNet(cfg.model).to(device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = make_schedule(cfg).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr, foreach=True)
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0 else None
        self.batches = Batches(data, cfg.train.batch_size, seed=cfg.train.seed, flip=cfg.data.flip)
        self.gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
        self.step = 0
        self.horizon = step_budget(cfg, self.batches.steps_per_epoch)
        self.bad_steps = 0
        self.skipped = 0
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, lambda: self.horizon))

    # -- one optimisation step ----------------------------------------------------------
    def train_step(self) -> dict[str, Any] | None:
        x0 = next(self.batches).to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        dc = self.cfg.diffusion
        t = torch.randint(0, dc.timesteps, (x0.shape[0],), device=self.device, generator=self.gen)
        noise = sample_noise(x0, dc.offset_noise, self.gen)
        terms = training_losses(self.forward, self.schedule, dc, x0, t, noise, learn_sigma=self.cfg.model.learn_sigma)
        self.opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        clip = self.cfg.train.max_grad_norm
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        if not (torch.isfinite(terms.loss) and torch.isfinite(gnorm)):
            return self._bad_step(terms.loss)
        self.bad_steps = 0
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return {"loss": terms.loss, "per_sample": terms.per_sample, "t": t, "grad_norm": gnorm}

    def _bad_step(self, loss: torch.Tensor) -> None:
        self.bad_steps += 1
        self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        if self.bad_steps >= MAX_BAD_STEPS:
            raise DdpmError(
                f"{self.bad_steps} non-finite losses in a row at step {self.step} (last {loss.item()}): "
                "the learning rate is probably too high (try a lower --lr or --max-grad-norm)")
        return None

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step, "optimizer": self.opt.state_dict(), "lr_sched": self.sched.state_dict(),
            "batches": self.batches.state_dict(), "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(), "horizon": self.horizon if self.horizon is not None else -1,
            "skipped": self.skipped,
        }

    def save(self) -> Path:
        ema = self.ema.model.state_dict() if self.ema is not None else None
        return save_checkpoint(self.run_dir, config=self.cfg, step=self.step, model=self.model.state_dict(),
                               ema=ema, state=self.state(), keep=self.cfg.train.keep)

    def restore(self, path: Path) -> None:
        ck = load_checkpoint(path, with_state=True)
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
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise DdpmError(f"checkpoint {ck.path} has an unusable training state ({e})") from None


# -------------------------------------------------------------------------- the run


def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> None:
    """Create the run folder; refuse to overwrite another run; check it is writable."""
    if not resume and (run_dir / "latest").exists():
        raise DdpmError(f"{run_dir} already holds a run; use --resume to continue it or pick another --name/--out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise DdpmError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from None
    if resume:
        saved = run_dir / "config.json"
        if saved.is_file() and RunConfig.load(saved) != cfg:
            prev = RunConfig.load(saved)
            diff = [k for k in ("model", "diffusion", "data") if getattr(prev, k) != getattr(cfg, k)]
            if diff:
                raise DdpmError(f"--resume with a different {diff[0]} config than {saved}; drop the changed flags")
    atomic_write_text(run_dir / "config.json", cfg.to_json())


def _log_record(tr: Trainer, out: dict[str, Any], img_s: float, loss_sum: float, n: int) -> dict[str, Any]:
    T = tr.cfg.diffusion.timesteps
    quart = (out["t"] * 4 // T).clamp(max=3)
    per = out["per_sample"]
    q = {f"loss_q{i}": float(per[quart == i].mean()) for i in range(4) if (quart == i).any()}
    return {"step": tr.step, "loss": loss_sum / max(n, 1), **q, "lr": tr.sched.get_last_lr()[0],
            "grad_norm": float(out["grad_norm"]), "img_per_s": img_s, "skipped": tr.skipped, "time": time.time()}


def periodic_samples(tr: Trainer, path: Path, n: int) -> None:
    """A grid from the EMA weights with a 20-step DPM-Solver++ (fast, close to ancestral)."""
    net = tr.ema.model if tr.ema is not None else tr.model
    was_training = net.training
    net.eval()
    lm = LoadedModel(net, tr.schedule, tr.cfg, tr.step, tr.run_dir)
    s = generate(lm, SampleConfig(sampler="dpm++2m", steps=min(20, tr.cfg.diffusion.timesteps), n=n))
    save_grid(s.images, path)
    net.train(was_training)


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, device: str = "auto",
          progress: bool = True, data: torch.Tensor | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` until its budget runs out (or a signal); always checkpoint."""
    validate(cfg)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    latest = run_dir / "latest"
    if resume and not latest.exists():
        raise DdpmError(f"--resume: {run_dir} has no checkpoint to resume from")
    prepare_run_dir(run_dir, cfg, resume)
    if data is None:
        data = load_dataset(cfg.data.source, size=cfg.data.image_size, channels=cfg.data.channels,
                            data_dir=cfg.data.data_dir)
    tr = Trainer(cfg, run_dir, data, dev)
    if resume:
        tr.restore(run_dir)
        log(f"resumed {run_dir} at step {tr.step}")
    log(f"training {count_parameters(tr.model):,} parameters on {len(data):,} images ({dev}), run folder {run_dir}")
    return _loop(tr, progress)


def _loop(tr: Trainer, progress: bool) -> TrainResult:
    from tqdm import tqdm

    tc = tr.cfg.train
    deadline = time.monotonic() + tc.minutes * 60 if tc.minutes else None
    t_start, n_images, start_step = time.monotonic(), 0, tr.step
    win_t, win_n, loss_sum, loss_n = time.monotonic(), 0, 0.0, 0
    img_s = 0.0
    bar = tqdm(total=tr.horizon, initial=tr.step, disable=not progress, unit="step", dynamic_ncols=True)
    log_f = open(tr.run_dir / "log.jsonl", "a")
    interrupted = False
    ck = None
    with _StopFlag() as stop:
        while tr.horizon is None or tr.step < tr.horizon:
            out = tr.train_step()
            if out is None:
                continue
            if tr.horizon is None and tc.lr_schedule == "cosine" and tr.step == start_step + 20 and deadline:
                tr.horizon = _estimate_horizon(tr, deadline, t_start)
            n_images += tc.batch_size
            win_n += tc.batch_size
            loss_sum += float(out["loss"].detach())
            loss_n += 1
            if tr.step % tc.log_every == 0 or tr.step == 1:
                img_s = win_n / max(time.monotonic() - win_t, 1e-9)
                rec = _log_record(tr, out, img_s, loss_sum, loss_n)
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{img_s:.0f}")
                win_t, win_n, loss_sum, loss_n = time.monotonic(), 0, 0.0, 0
            bar.update(1)
            if tc.sample_every and tr.step % tc.sample_every == 0:
                periodic_samples(tr, tr.run_dir / "samples" / f"step-{tr.step:08d}.png", tc.sample_n)
            if tc.checkpoint_every and tr.step % tc.checkpoint_every == 0:
                ck = tr.save()
            if stop.signum is not None:
                interrupted = True
                break
            if deadline and time.monotonic() >= deadline:
                break
        bar.close()
        log_f.close()
        if ck is None or ck.name != f"step-{tr.step:08d}":
            ck = tr.save()
    if interrupted:
        raise KeyboardInterrupt(f"stopped by signal {stop.signum} at step {tr.step}; checkpoint {ck}")
    elapsed = time.monotonic() - t_start
    return TrainResult(tr.run_dir, tr.step, ck, n_images / max(elapsed, 1e-9), interrupted)


def _estimate_horizon(tr: Trainer, deadline: float, t_start: float) -> int:
    """With a time budget only, fix the cosine schedule's length from the measured speed."""
    per_step = (time.monotonic() - t_start) / 20
    return tr.step + max(1, int((deadline - time.monotonic()) / per_step))
