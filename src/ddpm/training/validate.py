"""A run's config checked before any data is loaded or any file is written: one line per nonsense."""
from __future__ import annotations

import math

from ..config import RunConfig, check_model_config, check_seed
from ..core.objectives import get_objective
from ..core.processes import make_process
from ..core.schedules import make_schedule
from ..errors import DdpmError
from ..nn import check_image_size

MAX_TIMESTEPS = 1_000_000  # far above any discrete schedule in use; beyond, the tables alone fill memory


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


def validate(cfg: RunConfig) -> None:
    """Reject nonsensical settings before any data is loaded or any file is written."""
    _validate_train(cfg)
    _validate_diffusion(cfg)
    _validate_model(cfg)
