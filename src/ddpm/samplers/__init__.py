"""Samplers: one file each, one signature, an explicit name -> sampler table (rule 5).

Each sampler's default steps and final-step order were chosen from the Gaussian oracle's error
against steps, spacing and schedule (``bench/sampler_oracle.py``); the deterministic samplers'
default spacing from FD-FMNIST on trained models (``bench/spacing_fd.py``)."""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch

from ..core.diffusion import Denoiser
from ..core.processes import Plan, Process
from ..core.schedules import Spacing, space_timesteps
from ..errors import DdpmError
from . import consistency, ddim, ddpm, dpmpp_2m, heun
from .base import SamplerFn, SamplerOptions, StepCallback


class SamplerSpec(NamedTuple):
    fn: SamplerFn  # with its final-step order bound (lower_order_final)
    nfe: Callable[..., int]  # (levels, timesteps) -> network evaluations
    default_steps: int | None  # None: all T training steps; else capped at T
    default_spacing: Spacing  # the discrete chain's grid when --spacing is not given
    options: tuple[str, ...]  # the SamplerOptions fields it reads; any other one given is refused
    summary: str
    processes: tuple[str, ...] | None = None  # the processes it is defined on (None: all)


CONTINUOUS_STEPS = 32  # a continuous process's default for a sampler that would take all T steps
CONTINUOUS_SPACING: Spacing = "uniform"  # the process's own grid (EDM's rho-grid; uniform t on a flow)


def _one_per_step(levels, timesteps: list[int]) -> int:
    return len(timesteps)


# Defaults. Steps and each sampler's final-step order come from the oracle (the worst std error
# over four schedules and three T at the default steps: bench/sampler_oracle.py). Spacing for the
# deterministic samplers comes from trained networks: on the oracle (the sampler's error alone)
# quadratic is best for ddim and dpm++2m, but on trained models uniform scored the better FD-FMNIST
# at every step count (bench/spacing_fd.py): quadratic crowds the steps near t = 0, where the
# network's own error, not the solver's, dominates. heun: uniform, second order into t = 0 (the
# smallest oracle error of its spacings, and the better FD); ddpm: quadratic (the smaller oracle
# error below T steps; at its default, all T, every spacing is the same grid).
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm.sample, _one_per_step, None, "quadratic", ("variance",),
                        "ancestral, DDPM Algorithm 2 (respaced); the discrete chain only", ("vp",)),
    "ddim": SamplerSpec(ddim.sample, _one_per_step, 50, "uniform", ("eta",), "DDIM Eq. 12, eta in [0, 1]"),
    "dpm++2m": SamplerSpec(partial(dpmpp_2m.sample, lower_order_final=True), _one_per_step, 20, "uniform", (),
                           "DPM-Solver++(2M), last step first order"),
    "heun": SamplerSpec(partial(heun.sample, lower_order_final=False), partial(heun.nfe, lower_order_final=False),
                        10, "uniform", (), "Heun 2nd order, EDM Algorithm 1"),
    # for consistency students (ddpm distill --method consistency): trailing, as they were
    # trained; 4 steps by default (a student samples at its own steps: ddpm sample STUDENT)
    "consistency": SamplerSpec(consistency.sample, _one_per_step, 4, "trailing", (),
                               "multistep consistency sampling (x0, then fresh noise), for consistency students"),
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise DdpmError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_process(name: str, process: Process | str) -> None:
    """One line when the sampler is not defined on the process."""
    spec = get_sampler(name)
    pname = process if isinstance(process, str) else process.name
    if spec.processes is not None and pname not in spec.processes:
        fits = ", ".join(n for n, s in SAMPLERS.items() if s.processes is None or pname in s.processes)
        raise DdpmError(f"the {name} sampler is defined on the {' and '.join(spec.processes)} process only, "
                        f"not on {pname}; choose one of: {fits} (ddim --eta for a stochastic one)")


def check_options(name: str, options: SamplerOptions, learn_sigma: bool) -> None:
    """One-line errors for options a sampler cannot honour with this model, or would ignore."""
    spec = get_sampler(name)
    for opt in ("eta", "variance"):
        if getattr(options, opt) is not None and opt not in spec.options:
            readers = " and ".join(n for n, s in SAMPLERS.items() if opt in s.options)
            raise DdpmError(f"--{opt} applies to the {readers} sampler only; {name} would ignore it")
    if options.eta is not None and not 0.0 <= options.eta <= 1.0:
        raise DdpmError(f"eta must be between 0 and 1, got {options.eta}")
    if options.variance == "learned" and not learn_sigma:
        raise DdpmError("--variance learned needs a model trained with learned variances (learn_sigma)")


def grid(name: str, T: int, steps: int | None = None, spacing: str | None = None) -> list[int]:
    """The named sampler's timesteps out of T: its default steps and spacing where None."""
    spec = get_sampler(name)
    steps = min(spec.default_steps or T, T) if steps is None else steps
    return space_timesteps(T, steps, spec.default_spacing if spacing is None else spacing)


def default_steps(name: str, process: Process) -> int:
    """The named sampler's steps on ``process`` when none are asked for."""
    spec = get_sampler(name)
    if process.T is None:
        return spec.default_steps or CONTINUOUS_STEPS
    return min(spec.default_steps or process.T, process.T)


def plan_for(name: str, process: Process, steps: int | None = None, spacing: str | None = None,
             *, t_max: float = 1.0) -> Plan:
    """The levels and indices the named sampler visits on ``process`` (its defaults where None):
    on the discrete chain, ``steps`` of its T steps; on a continuous process, a grid of its own."""
    check_process(name, process)
    steps = default_steps(name, process) if steps is None else steps
    if process.T is not None:
        return Plan(process.table, grid(name, process.T, steps, spacing))
    return process.plan(steps, CONTINUOUS_SPACING if spacing is None else spacing, t_max=t_max)


def count_nfe(name: str, process: Process | torch.Tensor, steps: int | None = None, spacing: str | None = None) -> int:
    """Network evaluations per image of the named sampler at ``steps`` steps (its defaults where
    None), on ``process`` (or on the discrete chain of these alpha_bar)."""
    if isinstance(process, torch.Tensor):
        return get_sampler(name).nfe(process, grid(name, len(process), steps, spacing))
    plan = plan_for(name, process, steps, spacing)
    return get_sampler(name).nfe(plan.levels, plan.timesteps)


def sample(name: str, denoiser: Denoiser, x_T: torch.Tensor, steps: int | None = None, *,
           spacing: str | None = None, options: SamplerOptions = SamplerOptions(),
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """Run the named sampler with ``steps`` steps on ``spacing`` (its defaults when None), on the
    denoiser's process (or, without one, on the T steps of its discrete chain)."""
    check_options(name, options, denoiser.learn_sigma)
    if denoiser.process is not None:
        plan = plan_for(name, denoiser.process, steps, spacing)
        denoiser, timesteps = denoiser.on(plan.levels), plan.timesteps
    else:
        timesteps = grid(name, denoiser.schedule.T, steps, spacing)
    return get_sampler(name).fn(denoiser, x_T, timesteps, options=options, generator=generator, on_step=on_step)


__all__ = ["SAMPLERS", "count_nfe", "grid", "plan_for", "check_process", "default_steps", "SamplerOptions", "SamplerSpec", "StepCallback", "get_sampler",
           "sample", "check_options"]
