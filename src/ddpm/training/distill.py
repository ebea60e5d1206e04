"""Distillation into a few-step student, two methods:

- progressive (Salimans & Ho 2022, Algorithm 2): a student that takes one deterministic DDIM
  step where its teacher took two, the number of steps halved round by round;
- consistency (Song et al. 2023, Algorithm 2, consistency distillation): a student whose x0 is
  the consistency function f(x_t, t), the end of the teacher's probability-flow ODE from x_t.
  The ODE is the teacher's DDIM (eta 0) on a trailing grid of N = ``teacher_steps`` levels: the
  student's f at a level is trained towards the target network's f one teacher step lower, and
  at the lowest level towards the teacher's own step to the clean end, f's boundary condition
  (f = identity there). The target network is the student's moving average with decay
  ``target_decay`` (their mu; 0.95 on CIFAR-10), kept as the run's EMA, so it is what a
  checkpoint samples and resumes; the distance is the pseudo-Huber loss of Song & Dhariwal 2023
  (c = 0.00054 sqrt(d)). Sampled with ``--sampler consistency`` (multistep consistency
  sampling) at any number of steps, by default the run's ``student_steps``.

The student is a run folder like any other: checkpoints, ``log.jsonl``, ``--resume``. Its
``config.json`` is the teacher's network, schedule and objective with the distillation's
training settings; ``distill.json`` beside it records the teacher and the rounds, and each
checkpoint's training state carries the current round's teacher, so a resumed run continues
the same round. A progressive student is sampled with DDIM (eta 0) on the trailing grid at its
own number of steps: ``ddpm sample STUDENT --sampler ddim --spacing trailing --steps N``;
``ddpm sample STUDENT`` picks each student's sampler and steps itself.

A conditional teacher is distilled with its labels dropped to the null class as in training
(or at ``cond_drop``), so the student keeps both outputs and classifier-free guidance is
applied at sampling (not distilled in).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..checkpoint import Checkpoint, load_checkpoint, load_into
from ..config import RunConfig
from ..core.diffusion import Denoiser
from ..core.objectives import coef
from ..core.schedules import space_timesteps
from ..errors import DdpmError
from ..files import run_of
from ..nn import build_network
from ..runtime.distributed import Dist
from .loop import TrainResult
from .run import MakeTrainer, run_training
from .trainer import Skipped, StepOut, Trainer, drop_labels

DISTILL_NAME = "distill.json"


@dataclass(frozen=True)
class DistillConfig:
    """What to distil and for how long."""

    teacher: str  # the teacher's run or checkpoint folder
    method: Literal["progressive", "consistency"] = "consistency"  # the default: on the shipped model it came
    # closer to the teacher at far less compute than progressive (bench/distill_quality.py; the results page)
    teacher_steps: int = 16  # progressive: DDIM steps of the first round's teacher; consistency: N, the ODE's grid
    student_steps: int = 4  # progressive: the last round's student, teacher_steps / 2^rounds; consistency: the
    # steps it samples with by default
    steps_per_round: int = 500  # consistency: one round
    batch_size: int | None = None  # None: the teacher's
    lr: float = 1e-4  # Salimans & Ho use 1e-4 (CIFAR-10) to 5e-5 with Adam
    target_decay: float = 0.95  # consistency: the target network's moving average (Song et al.'s mu)
    cond_drop: float | None = None  # conditional teachers: P(label -> null class) in the student's batches;
    # None: the teacher's own training rate
    dataset: str | None = None  # the student's training images; None: the teacher's data source (a diffusers
    # pipeline's is unknown unless its images are 1x28x28 grey)

    @property
    def rounds(self) -> int:
        if self.method == "consistency":
            return 1
        return int(round(math.log2(self.teacher_steps / self.student_steps)))


METHODS = ("consistency", "progressive")
# optimiser steps when --steps-per-round is not given: progressive, per halving; consistency, in
# all. Consistency distillation scored best at 2 and 4 steps after the shorter budget and worse
# after longer ones, while one step gained little from more (bench/distill_quality.py; the
# history page, "Engines and precision")
DEFAULT_STEPS = {"progressive": 500, "consistency": 250}


def check_distill_config(d: DistillConfig, T: int) -> None:
    """One line for settings that cannot be distilled."""
    if d.method not in METHODS:
        raise DdpmError(f"unknown distillation method {d.method!r}; choose: {', '.join(METHODS)}")
    if d.method == "consistency":
        if not (1 <= d.student_steps <= d.teacher_steps <= T):
            raise DdpmError(f"--teacher-steps (the ODE's grid, {d.teacher_steps}) must be at least --student-steps "
                            f"({d.student_steps}) and at most T={T}, and both at least 1")
        if not 0 <= d.target_decay < 1:
            raise DdpmError(f"--target-decay must be in [0, 1), got {d.target_decay}")
    elif not (1 <= d.student_steps < d.teacher_steps <= T) or d.teacher_steps != d.student_steps * 2 ** d.rounds:
        raise DdpmError(f"--teacher-steps ({d.teacher_steps}) must be --student-steps ({d.student_steps}) times a "
                        f"power of two, at most T={T}")
    if d.cond_drop is not None and not 0 <= d.cond_drop <= 1:
        raise DdpmError(f"--cond-drop must be in [0, 1], got {d.cond_drop}")
    if d.steps_per_round < 1 or not d.lr > 0 or (d.batch_size is not None and d.batch_size < 1):
        raise DdpmError("--steps-per-round, --lr and --batch-size must be positive")


def round_grids(T: int, student_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's trailing grid of N steps and its teacher's of 2N, which holds it at odd
    places: student step j (at t = teacher[2j+1]) is teacher steps 2j+1 -> 2j -> 2j-1."""
    s = torch.tensor(space_timesteps(T, student_steps, "trailing"))
    t = torch.tensor(space_timesteps(T, 2 * student_steps, "trailing"))
    if not torch.equal(t[1::2], s):
        raise DdpmError(f"T={T} does not nest {student_steps} DDIM steps in {2 * student_steps}")
    return s, t


def ddim_to(pred_x0: torch.Tensor, pred_eps: torch.Tensor, a_prev: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
    """DDIM Eq. 12 with eta 0: x_prev = alpha_prev x0 + sigma_prev eps (float64 (B,) alpha, sigma)."""
    return coef(a_prev, pred_x0) * pred_x0 + coef(s_prev, pred_x0) * pred_eps


def x0_target(a_t: torch.Tensor, s_t: torch.Tensor, a_prev: torch.Tensor, s_prev: torch.Tensor,
              x_t: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho Algorithm 2: the x0 whose one DDIM step from x_t lands on x_prev,
    (x_prev - (sigma_p / sigma_t) x_t) / (alpha_p - (sigma_p / sigma_t) alpha_t)."""
    ratio = s_prev / s_t  # float64 coefficients: alpha_t is tiny at the noisiest level
    den = a_prev - ratio * a_t
    return coef(1 / den, x_t) * x_prev - coef(ratio / den, x_t) * x_t


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


class Distiller(Trainer):
    """A Trainer whose step is Algorithm 2's, with the round's teacher beside the student.

    Under ``torchrun`` every process draws the whole batch, its levels and noise, as training
    does, and keeps its own slice, so a job takes the steps of one process at any world size."""

    def __init__(self, cfg: RunConfig, run_dir: Path, data: torch.Tensor, device: torch.device,
                 d: DistillConfig, teacher_weights: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
                 dist: Dist = Dist()):
        super().__init__(cfg, run_dir, data, device, dist, labels)
        self.d = d
        load_into(self.model, teacher_weights, Path(d.teacher))
        self.teacher = build_network(cfg.model).to(device).eval().requires_grad_(False)
        if cfg.train.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.teacher.load_state_dict(self.model.state_dict())
        self.round = 0
        # the levels the grids index: the chain's T steps, or T levels t = (i + 1) / T of a continuous process
        self.lv = self.process.table if self.process.T is not None else \
            self.process.levels_at(torch.arange(1, cfg.diffusion.timesteps + 1, dtype=torch.float64)
                                   / cfg.diffusion.timesteps).to(device)

    def student_steps(self, round_: int) -> int:
        return self.d.teacher_steps // 2 ** (round_ + 1)

    def _next_round(self) -> None:
        """The student so far becomes the teacher; the optimiser starts afresh (Algorithm 2)."""
        self.round += 1
        self.teacher.load_state_dict(self.model.state_dict())
        self.opt.state.clear()

    def train_step(self) -> StepOut | Skipped:
        """Salimans & Ho Algorithm 2, one batch: two teacher DDIM steps, one student step."""
        while self.step // self.d.steps_per_round > self.round and self.round + 1 < self.d.rounds:
            self._next_round()
        x0, y = self._batch()
        lv = self.lv
        student, teacher = round_grids(lv.K, self.student_steps(self.round))
        j = torch.randint(0, len(student), (x0.shape[0],), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        x0, y, j, noise = self._part(x0, y, j, noise)
        t, t_mid = teacher.to(self.device)[2 * j + 1], teacher.to(self.device)[2 * j]
        t_prev = torch.where(j > 0, teacher.to(self.device)[(2 * j - 1).clamp(min=0)], -1)
        a_t, s_t = lv.alpha[t], lv.sigma[t]  # float64: coefficients are cast at use
        a_prev = torch.where(t_prev >= 0, lv.alpha[t_prev.clamp(min=0)], torch.ones_like(a_t))
        s_prev = torch.where(t_prev >= 0, lv.sigma[t_prev.clamp(min=0)], torch.zeros_like(s_t))
        x_t = coef(a_t, x0) * x0 + coef(s_t, x0) * noise
        with torch.no_grad():
            x_prev = self._teacher_two_steps(x_t, t, t_mid, (lv.alpha[t_mid], lv.sigma[t_mid]), (a_prev, s_prev), y)
            target = x0_target(a_t, s_t, a_prev, s_prev, x_t, x_prev)
        pred = self._denoiser(self.net_fn, y)(x_t, t)
        weight = (a_t**2 / s_t**2).clamp(min=1).float()  # truncated SNR weighting, max(SNR, 1)
        per_sample = weight * (pred.x0 - target).square().flatten(1).mean(1)
        return self.optimize(per_sample.mean(), per_sample.detach(), t)

    def _part(self, *xs: torch.Tensor | None) -> tuple[Any, ...]:
        """This process's slice of each of the global batch's tensors (None stays None)."""
        if not self.dist.active:
            return xs
        part = self.dist.shard(xs[0].shape[0])
        return tuple(None if x is None else x[part] for x in xs)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of images (channels-last as the student) and its labels, dropped to the null
        class as in training (None for an unconditional teacher)."""
        x0, y = self.batches.next_labeled()
        x0 = x0.to(self.device)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0, (None if not self.cfg.model.num_classes else self._drop(y.to(self.device)))

    def _denoiser(self, net: torch.nn.Module, y: torch.Tensor | None) -> Denoiser:
        den = Denoiser(net, self.lv, objective=self.objective,
                       learn_sigma=self.cfg.model.learn_sigma, num_classes=self.cfg.model.num_classes)
        return den.conditioned(y) if y is not None else den

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        return drop_labels(y, self.cfg.train.cond_drop, self.cfg.model.num_classes, self.gen)

    def _teacher_two_steps(self, x_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                           mid: tuple[torch.Tensor, torch.Tensor], prev: tuple[torch.Tensor, torch.Tensor],
                           y: torch.Tensor | None) -> torch.Tensor:
        den = self._denoiser(self.teacher, y)
        p = den(x_t, t)
        x_mid = ddim_to(p.x0, p.eps, *mid)
        p = den(x_mid, t_mid)
        return ddim_to(p.x0, p.eps, *prev)

    def start_line(self, images: int) -> str:
        d = self.d
        return (f"distilling {d.teacher} ({d.teacher_steps} DDIM steps) into {d.student_steps} in {d.rounds} rounds "
                f"of {d.steps_per_round} steps, run folder {self.run_dir}")

    def resumed_line(self) -> str:
        return f"{super().resumed_line()} (round {self.round + 1} of {self.d.rounds})"

    def state(self) -> dict[str, Any]:
        return {**super().state(), "round": self.round, "teacher": self.teacher.state_dict()}

    def restore(self, ck: Checkpoint) -> None:
        super().restore(ck)
        try:
            self.round = int(ck.state["round"])
            self.teacher.load_state_dict(ck.state["teacher"])
        except (KeyError, RuntimeError, TypeError) as e:
            raise DdpmError(f"checkpoint {ck.path} is not a distillation's ({e})") from None


class ConsistencyDistiller(Distiller):
    """A Trainer whose step is consistency distillation's (Song et al. 2023, Algorithm 2), the
    teacher fixed, the target network the run's EMA (decay ``target_decay``, no warm-up)."""

    ema_everywhere = True  # the step reads the target network: every process of a job keeps it

    def __init__(self, cfg: RunConfig, run_dir: Path, data: torch.Tensor, device: torch.device,
                 d: DistillConfig, teacher_weights: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
                 dist: Dist = Dist()):
        super().__init__(cfg, run_dir, data, device, d, teacher_weights, labels, dist)
        if self.ema is not None:  # made from the initial weights: the target starts at the teacher too
            self.ema.model.load_state_dict(self.model.state_dict())
        self.grid = torch.tensor(space_timesteps(self.lv.K, d.teacher_steps, "trailing"), device=device)

    def train_step(self) -> StepOut | Skipped:
        """One batch: a level t_n of the grid, x at t_n, one teacher DDIM step to t_{n-1} (the
        clean end below t_0), and the student's f(x, t_n) pulled towards the target's f there."""
        x0, y = self._batch()
        lv = self.lv
        n = torch.randint(0, len(self.grid), (x0.shape[0],), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        x0, y, n, noise = self._part(x0, y, n, noise)
        t = self.grid[n]
        t_prev = self.grid[(n - 1).clamp(min=0)]
        lowest = n == 0  # the step goes to the clean end, where f is the identity
        a_prev = torch.where(lowest, 1.0, lv.alpha[t_prev])
        s_prev = torch.where(lowest, 0.0, lv.sigma[t_prev])
        x_t = coef(lv.alpha[t], x0) * x0 + coef(lv.sigma[t], x0) * noise
        with torch.no_grad():
            p = self._denoiser(self.teacher, y)(x_t, t)
            x_prev = ddim_to(p.x0, p.eps, a_prev, s_prev)
            target_net = self.ema.model if self.ema is not None else self.model  # decay 0: the student itself
            f_prev = self._denoiser(target_net, y)(x_prev, t_prev).x0
            target = torch.where(_bcast(lowest), x_prev, f_prev)
        pred = self._denoiser(self.net_fn, y)(x_t, t)
        d2 = (pred.x0 - target).square().flatten(1).sum(1)
        c = 0.00054 * math.sqrt(x0[0].numel())  # Song & Dhariwal 2023's pseudo-Huber constant
        per_sample = (d2 + c * c).sqrt() - c
        return self.optimize(per_sample.mean(), per_sample.detach(), t)

    def start_line(self, images: int) -> str:
        d = self.d
        return (f"consistency distillation of {d.teacher} (its DDIM ODE on {d.teacher_steps} levels), "
                f"{d.steps_per_round} steps, target decay {d.target_decay}, run folder {self.run_dir}")


def student_config(teacher: RunConfig, d: DistillConfig) -> RunConfig:
    """The teacher's config with the distillation's training settings: a checkpoint at the end
    of each round, constant lr; no EMA for a progressive student (the student of a round is its
    next teacher), the target network's for a consistency one."""
    ema = d.target_decay if d.method == "consistency" else 0.0
    tc = replace(teacher.train, lr=d.lr, lr_schedule="constant", warmup_steps=0, epochs=None, minutes=None,
                 max_steps=d.rounds * d.steps_per_round, ema_decay=ema, ema_warmup=False, sample_every=0,
                 checkpoint_every=d.steps_per_round, batch_size=d.batch_size or teacher.train.batch_size,
                 guide_at=0.0, cond_drop=teacher.train.cond_drop if d.cond_drop is None else d.cond_drop)
    data = teacher.data if d.dataset is None else replace(teacher.data, source=d.dataset, test_source=None,
                                                          class_names=(), class_counts=())
    return replace(teacher, train=tc, data=data, preset="distilled")


def distill(d: DistillConfig, out: str | Path, *, resume: bool = False, device: str = "auto", progress: bool = True,
            data: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            log: Callable[[str], None] = print) -> TrainResult:
    """Distil ``d.teacher`` into a student run at ``out`` (Salimans & Ho 2022; Song et al. 2023)
    through :func:`~ddpm.training.run.run_training`, with everything training has (the checks of
    the config, folder and data, ``torchrun``, the lock, the cleanup of a student stopped before
    its first checkpoint); returns the training result of the student's run."""
    run_dir = Path(out)
    if resume:
        d = load_distill_config(run_dir)
    tck = load_checkpoint(d.teacher)
    check_distill_config(d, tck.config.diffusion.timesteps)
    if d.cond_drop is not None and not tck.config.model.num_classes:
        raise DdpmError(f"--cond-drop needs a class-conditional teacher; {d.teacher} has no labels")
    return run_training(student_config(tck.config, d), run_dir, distiller(d, tck.sampling_weights(True)),
                        resume=resume, device=device, progress=progress, data=data, labels=labels, log=log,
                        tensorboard=False, frozen_nets=2,  # the teacher and the target beside the student
                        extra_files={DISTILL_NAME: json.dumps(asdict(d), indent=2)})


def distiller(d: DistillConfig, teacher_weights: dict[str, torch.Tensor]) -> MakeTrainer:
    """The factory of ``d.method``'s Trainer (a :class:`ConsistencyDistiller` or a progressive
    :class:`Distiller`), starting from ``teacher_weights``, for :func:`run_training`."""
    kind = ConsistencyDistiller if d.method == "consistency" else Distiller

    def make(cfg: RunConfig, run_dir: Path, data: torch.Tensor, device: torch.device, dist: Dist,
             labels: torch.Tensor | None) -> Trainer:
        return kind(cfg, run_dir, data, device, d, teacher_weights, labels, dist)
    return make


def load_distill_config(run_dir: Path) -> DistillConfig:
    """The run's distill.json with every value's type checked, so that a hand edit is one line
    here, not a traceback in whichever command reads it next."""
    from ..config import from_dict

    path = Path(run_dir) / DISTILL_NAME
    try:
        return from_dict(DistillConfig, json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, RecursionError, DdpmError) as e:  # TypeError: a key missing
        raise DdpmError(f"{run_dir} is not a distillation run ({DISTILL_NAME}: {e})") from None


def check_resume_flags(stored: DistillConfig, given: dict[str, Any]) -> None:
    """A resumed distillation continues as its distill.json says: a setting given that differs
    is refused, naming its flag, rather than silently ignored."""
    def differs(k: str, v: Any) -> bool:  # the teacher by where it is, however the path is spelled
        was = getattr(stored, k)
        return Path(v).resolve() != Path(was).resolve() if k == "teacher" else v != was

    changed = [k for k, v in given.items() if v is not None and differs(k, v)]
    if changed:
        flags = ", ".join(f"{'the teacher' if k == 'teacher' else '--' + k.replace('_', '-')} (the run has "
                          f"{getattr(stored, k)!r})" for k in changed)
        raise DdpmError(f"--resume continues the distillation as it began; it cannot change {flags}: drop "
                        f"{'it' if len(changed) == 1 else 'them'} or distil into a new --out")


def student_sampling(d: DistillConfig) -> dict[str, Any]:
    """How a student samples as it was trained (SampleConfig's fields): a progressive one with
    DDIM, eta 0, a consistency one with multistep consistency sampling; both on the trailing
    grid at the student's own number of steps."""
    if d.method == "consistency":
        return {"sampler": "consistency", "spacing": "trailing", "eta": None, "steps": d.student_steps}
    return {"sampler": "ddim", "spacing": "trailing", "eta": 0.0, "steps": d.student_steps}


def student_in(run_dir: Path) -> DistillConfig | None:
    """The distillation that made the run folder ``run_dir``, or None for any other run."""
    return load_distill_config(Path(run_dir)) if (Path(run_dir) / DISTILL_NAME).is_file() else None


def student_of(checkpoint: Path) -> DistillConfig | None:
    """The distillation that made the run of ``checkpoint`` (RUN/checkpoints/step-N, or a
    checkpoint folder standing alone with its own distill.json), or None."""
    return student_in(run_of(Path(checkpoint)) or Path(checkpoint))
