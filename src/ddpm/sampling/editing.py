"""Editing with any trained model, no retraining: RePaint inpainting (Lugmayr et al. 2022) and
SDEdit (Meng et al. 2022), with every sampler of the table.

Both drive the samplers unchanged. RePaint's "known region from the input noised to that
level" lives in a denoiser wrapper (:class:`KnownRegion`): before each network call the known
pixels of x_t are replaced by q_sample(input, t). Every sampler updates each pixel from its own
x_t and the network's prediction only, so the unknown pixels follow exactly RePaint's
Algorithm 1, and the stale known pixels of the sampler's state are never seen. The jumps back
(q(x_t | x_{t-1}) over the sampler's respaced grid) happen between runs of the sampler; a run
that stops above t = 0 is cut short from its step callback.

Masks: True (white, >= 50% grey in a file) = keep the input's pixel, False (black) = fill it in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import SampleConfig
from ..core.diffusion import Denoiser, Prediction, q_sample
from ..core.objectives import coef
from ..core.processes import Levels
from ..core.schedules import NoiseSchedule
from ..data.readers import check_image_channels, from_model_range, load_image, read_image_header, to_model_range
from ..errors import DdpmError
from ..pictures.viz import make_grid
from ..runtime.budget import check_steps
from ..runtime.precision import autocast_dtype, describe
from ..samplers import SamplerOptions, SamplerSpec, StepCallback, get_sampler
from ..samplers.base import ImageGenerators, t_batch
from .generate import LoadedModel, Samples, StepHook, _with_hook, check_sample_config, with_precision_resolved
from .guidance import request_labels

MaskShape = Literal["right", "center"]
MASK_SHAPES: tuple[str, ...] = ("right", "center")


@dataclass(frozen=True)
class RePaintConfig:
    """RePaint's jump schedule (Lugmayr et al. 2022, Sec. 4.2): its j and r."""

    jump_length: int = 10  # j: grid levels gone back up at each jump
    resample: int = 10  # r: passes over each jump point; 1 = no resampling (plain replacement)


def check_repaint(cfg: RePaintConfig, steps: int | None = None) -> None:
    """j and r of at least 1; given the sampler's ``steps``, a jump schedule of bounded work
    (counted, never built: an absurd r would fill memory with the schedule alone)."""
    if cfg.jump_length < 1 or cfg.resample < 1:
        raise DdpmError(f"--jump-length and --resample must be at least 1, got {cfg.jump_length} and {cfg.resample}")
    if steps is not None:
        check_steps(repaint_steps(steps, cfg), f"RePaint over {steps} steps with --jump-length {cfg.jump_length} "
                                               f"and --resample {cfg.resample}")


def check_strength(strength: float) -> None:
    if not (0.0 < strength <= 1.0):  # also rejects NaN
        raise DdpmError(f"--strength must be in (0, 1], got {strength}")


# ---------------------------------------------------------------- the math

def jump_schedule(levels: int, jump_length: int, resample: int) -> list[int]:
    """RePaint Sec. 4.2 (its get_schedule_jump) over grid levels K-1 .. 0 and -1 (clean): down one
    level at a time; at levels 0, j, 2j, ... (with j more above them) r - 1 times back up j levels."""
    jumps = {k: resample - 1 for k in range(0, levels - jump_length, jump_length)}
    k, out = levels - 1, [levels - 1]
    while k >= 0:
        k -= 1
        out.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            out.extend(range(k + 1, k + jump_length + 1))
            k += jump_length
    return out


def renoise(s: NoiseSchedule | Levels, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    """q(x_to | x_from) for t_to > t_from: N((alpha_to / alpha_from) x, sigma_to^2 - (alpha_to / alpha_from)^2
    sigma_from^2) on any process; on the discrete chain DDPM Eq. 2 composed, in alpha_bar."""
    if isinstance(s, Levels) and s.schedule is not None:
        s = s.schedule
    if isinstance(s, NoiseSchedule):
        ratio = s.alpha_bar[t_to] / s.alpha_bar[t_from]
        return ratio.sqrt() * x + (1 - ratio).sqrt() * noise
    a = s.alpha[t_to] / s.alpha[t_from]
    return a * x + (s.sigma[t_to] ** 2 - a**2 * s.sigma[t_from] ** 2).clamp(min=0).sqrt() * noise


def strength_timestep(strength: float, T: int) -> int:
    """SDEdit's t0 = S * T as a 0-based index into the T training steps: ceil(S T) - 1."""
    check_strength(strength)
    return min(T, max(1, math.ceil(strength * T - 1e-9))) - 1


def sdedit_grid(timesteps: list[int], t0: int) -> list[int]:
    """The part of a sampler's grid below t0, with t0 itself on top (where the input is noised to)."""
    return [t for t in timesteps if t < t0] + [t0]


# ---------------------------------------------------------------- RePaint

class KnownRegion:
    """A denoiser whose network sees the known pixels of x_t replaced by q_sample(x0_known, t)
    (RePaint Algorithm 1, line 5); counts its network evaluations."""

    def __init__(self, inner: Denoiser, x0: torch.Tensor, keep: torch.Tensor, noise: ImageGenerators):
        self.inner, self.x0, self.keep, self.noise = inner, x0, keep, noise
        self.levels, self.learn_sigma = inner.levels, inner.learn_sigma
        self.calls = 0

    @property
    def schedule(self) -> NoiseSchedule:
        return self.inner.schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        noise = self.noise.randn(self.x0.shape, device=self.x0.device)
        if self.levels.schedule is not None:
            known = q_sample(self.levels.schedule, self.x0, t, noise)
        else:
            known = coef(self.levels.alpha[t], self.x0) * self.x0 + coef(self.levels.sigma[t], self.x0) * noise
        self.calls += 1
        return self.inner(torch.where(self.keep, known, x_t), t)


class _Stop(Exception):
    def __init__(self, x: torch.Tensor):
        self.x = x


@dataclass
class _Run:
    """What one batch's descent needs: the sampler, its grid, options and hooks."""

    spec: SamplerSpec
    denoiser: Denoiser | KnownRegion
    timesteps: list[int]
    options: SamplerOptions
    generator: ImageGenerators
    on_step: StepCallback | None
    done: int = 0  # sampler steps so far (the on_step index)


def descend(run: _Run, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """Run the sampler from grid level ``top`` down to ``bottom`` (-1: the clean image)."""
    n = top - bottom

    def step(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if run.on_step is not None:
            run.on_step(run.done, x_t, x0)
        run.done += 1
        if i + 1 == n and bottom >= 0:
            raise _Stop(x_t)

    try:
        return run.spec.fn(run.denoiser, x, run.timesteps[: top + 1], options=run.options,
                           generator=run.generator, on_step=step)
    except _Stop as stop:
        return stop.x


def repaint(run: _Run, schedule: NoiseSchedule | Levels, x_T: torch.Tensor, cfg: RePaintConfig,
            noise: ImageGenerators) -> torch.Tensor:
    """RePaint Algorithm 1 over the run's grid: descents by the sampler, jumps back by :func:`renoise`."""
    levels = jump_schedule(len(run.timesteps), cfg.jump_length, cfg.resample)
    x, pos = x_T, 0
    while pos < len(levels) - 1:
        down = levels[pos + 1] < levels[pos]
        end = pos + 1
        while end + 1 < len(levels) and (levels[end + 1] < levels[end]) == down:
            end += 1
        a, b = levels[pos], levels[end]
        if down:
            x = descend(run, x, a, b)
        else:
            x = renoise(schedule, x, run.timesteps[a], run.timesteps[b], noise.randn(x.shape, device=x.device))
        pos = end
    return x


def repaint_steps(steps: int, cfg: RePaintConfig) -> int:
    """Sampler steps (on_step calls) per batch of an inpainting over ``steps`` grid levels: each
    level once, and j more for each of the r - 1 passes back up at every jump point of
    :func:`jump_schedule` (counted without building it)."""
    jumps = len(range(0, steps - cfg.jump_length, cfg.jump_length))
    return steps + jumps * (cfg.resample - 1) * cfg.jump_length


# ---------------------------------------------------------------- the public calls

def _as_batch(image: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (C, H, W) -> n copies; (N, C, H, W) -> as is."""
    if image.dtype != torch.uint8 or image.ndim not in (3, 4):
        raise DdpmError(f"the image must be uint8 (C, H, W) or (N, C, H, W), got {image.dtype} {tuple(image.shape)}")
    return image.expand(n, *image.shape) if image.ndim == 3 else image


def _check_image(model: LoadedModel, images: torch.Tensor) -> None:
    c, s = model.config.model.channels, model.config.data.image_size
    if tuple(images.shape[1:]) != (c, s, s):
        raise DdpmError(f"the image is {tuple(images.shape[1:])} (C, H, W); the model draws ({c}, {s}, {s})")


def _as_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A bool mask (H, W), (1, H, W) or (N, 1, H, W), True = keep -> (N, 1, H, W)."""
    if mask.dtype != torch.bool:
        raise DdpmError(f"the mask must be a bool tensor (True = keep), got {mask.dtype}")
    m = mask.reshape(-1, 1, *mask.shape[-2:]) if mask.ndim in (2, 3) else mask
    h, w = images.shape[-2:]
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (h, w) or m.shape[0] not in (1, len(images)):
        raise DdpmError(f"the mask is {'x'.join(map(str, mask.shape[-2:]))}, the image {h}x{w}: they must match")
    return m.expand(len(images), 1, h, w)


class _Request:
    """An edit of ``images`` in batches: labels, the sampler's grid, one generator per image."""

    def __init__(self, model: LoadedModel, cfg: SampleConfig, image: torch.Tensor):
        self.steps = check_sample_config(model, cfg)
        cfg = with_precision_resolved(model, cfg)
        self.model, self.cfg = model, cfg
        self.images = _as_batch(image, cfg.n)
        _check_image(model, self.images)
        # an edit keeps the null class unless a class is named: its input's class is unknown
        labels = None if cfg.classes is None else request_labels(cfg, model.config, len(self.images))[0]
        if cfg.guidance and labels is None:
            raise DdpmError("--guidance with an edit needs --class (an edit keeps the null class without it: "
                            "its input's class is unknown)")
        self.labels = None if labels is None else labels[: len(self.images)]
        self.device = model.device
        self.plan = model.plan(cfg.sampler, self.steps, cfg.spacing)
        self.timesteps = self.plan.timesteps
        self.denoiser = model.denoiser(cfg.clip, cfg.precision).on(self.plan.levels)
        self.guide = model.guide(cfg.guiding_model, cfg.precision) if cfg.autoguidance else None

    def batches(self):
        """(start, x0 in [-1, 1] on the device, per-image generators, the run for this batch)."""
        cfg = self.cfg
        for start in range(0, len(self.images), cfg.batch_size):
            b = min(cfg.batch_size, len(self.images) - start)
            den = self.denoiser if self.labels is None else self.denoiser.conditioned(
                self.labels[start:start + b].to(self.device), cfg.guidance, cfg.guidance_interval)
            den = den.autoguided(self.guide, cfg.autoguidance, cfg.autoguidance_interval)
            gens = ImageGenerators.for_images(cfg.seed, start, b, self.device)  # image i: (seed, i) only
            run = _Run(get_sampler(cfg.sampler), den, self.timesteps, SamplerOptions(cfg.eta, cfg.variance), gens, None)
            yield start, to_model_range(self.images[start:start + b].to(self.device)), gens, run

    def hook(self, start: int, steps: int, on_step: StepHook | None, record: StepCallback | None) -> StepCallback | None:
        """The sampler callback of a batch: GIF frames (first batch) and the caller's progress hook."""
        total = -(-len(self.images) // self.cfg.batch_size) * steps
        return _with_hook(record if start == 0 else None, on_step, start, steps, total, self.cfg.batch_size)

    def samples(self, out: list[torch.Tensor], nfe: int, steps: int, frames: list[np.ndarray]) -> Samples:
        return Samples(torch.cat(out), nfe, steps, frames, describe(autocast_dtype(self.cfg.precision, self.device)),
                       self.labels)


def _recorder(frames: list[np.ndarray], keep: torch.Tensor, x0: torch.Tensor, every: int) -> StepCallback:
    """Every ``every``-th x_t of the batch, the known pixels shown as the clean input."""
    def on_step(i: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if i % every == 0:
            frames.append(make_grid(from_model_range(torch.where(keep, x0, x_t)).cpu()))
    return on_step


@torch.inference_mode()
def inpaint(model: LoadedModel, image: torch.Tensor, mask: torch.Tensor, cfg: SampleConfig,
            repaint_cfg: RePaintConfig = RePaintConfig(), *, on_step: StepHook | None = None,
            record: bool = False, max_frames: int = 100) -> Samples:
    """Fill in the pixels where ``mask`` is False (RePaint, Lugmayr et al. 2022, Algorithm 1).

    ``image``: uint8 (C, H, W) -> ``cfg.n`` completions, or (N, C, H, W) -> one each.
    ``mask``: bool (H, W) or (N, 1, H, W), True = keep; the kept pixels of the result are exactly
    the input's. Completion i depends only on (cfg.seed, i) and its input. ``cfg.classes`` and
    ``cfg.guidance`` steer a conditional model. ``on_step(StepEvent)`` as in ``generate`` (steps
    count the whole jump schedule, :func:`repaint_steps`; False cancels); ``record``: grids of
    the first batch's x_t in ``Samples.frames``.
    """
    req = _Request(model, cfg, image)
    check_repaint(repaint_cfg, req.steps)
    keep = _as_mask(mask, req.images)
    steps = repaint_steps(req.steps, repaint_cfg)
    out, frames, nfe = [], [], 0
    for start, x0, gens, run in req.batches():
        m = keep[start:start + len(x0)].to(req.device)
        run.denoiser = KnownRegion(run.denoiser, x0, m, gens)
        record_fn = _recorder(frames, m, x0, max(1, steps // max_frames)) if record else None
        run.on_step = req.hook(start, steps, on_step, record_fn)
        x_T = gens.randn(x0.shape, device=req.device) * req.plan.levels.prior_scale(req.timesteps[-1]).float()
        x = repaint(run, req.plan.levels, x_T, repaint_cfg, gens)
        out.append(torch.where(m.cpu(), req.images[start:start + len(x0)], from_model_range(x).cpu()))
        nfe = run.denoiser.calls + _extra_passes(run.denoiser.inner)
    return req.samples(out, nfe, req.steps, frames)


@torch.inference_mode()
def edit(model: LoadedModel, image: torch.Tensor, strength: float, cfg: SampleConfig, *,
         on_step: StepHook | None = None, record: bool = False, max_frames: int = 100) -> Samples:
    """SDEdit (Meng et al. 2022, Algorithm 1): noise the input to t0 = strength * T, then denoise
    with ``cfg.sampler`` over the part of its grid below t0.

    ``image``: uint8 (C, H, W) -> ``cfg.n`` edits, or (N, C, H, W) -> one each; edit i depends
    only on (cfg.seed, i) and its input. Small strengths stay close to the input; 1 is sampling.
    ``on_step``, ``record``: as :func:`inpaint`.
    """
    check_strength(strength)
    req = _Request(model, cfg, image)
    if model.process.T is not None:  # the discrete chain: t0 a step index
        t0 = strength_timestep(strength, model.process.T)
        sub, levels = sdedit_grid(req.timesteps, t0), req.plan.levels
    else:  # a continuous process: the grid's levels below t0 = strength, and t0 on top
        p = model.process
        t = p.grid_t(req.steps, cfg.spacing or "uniform")
        t = torch.cat([t[t < strength], t.new_tensor([strength])])
        levels = p.levels_at(t).to(req.device)
        sub, t0 = list(range(len(t))), len(t) - 1
    out, frames, extra = [], [], 0
    for start, x0, gens, run in req.batches():
        run.denoiser = run.denoiser.on(levels)
        noise = gens.randn(x0.shape, device=req.device)
        x_t0 = q_sample(levels.schedule, x0, t_batch(t0, x0), noise) if levels.schedule is not None \
            else coef(levels.alpha[t0].expand(len(x0)), x0) * x0 + coef(levels.sigma[t0].expand(len(x0)), x0) * noise
        record_fn = None
        if record:
            record_fn = _recorder(frames, torch.zeros_like(x0, dtype=torch.bool), x0, max(1, len(sub) // max_frames))
            frames.append(make_grid(from_model_range(x_t0).cpu()))
        hook = req.hook(start, len(sub), on_step, record_fn)
        x = run.spec.fn(run.denoiser, x_t0, sub, options=run.options, generator=gens, on_step=hook)
        out.append(from_model_range(x).cpu())
        extra = _extra_passes(run.denoiser)  # the same in every batch
    return req.samples(out, run.spec.nfe(levels, sub) + extra, len(sub), frames)


def _extra_passes(den: Denoiser) -> int:
    """Evaluations beyond one per call: classifier-free guidance's null class, autoguidance's guide."""
    return den.null_passes + den.guide_passes


def comparison_grid(image: torch.Tensor, results: torch.Tensor, mask: torch.Tensor | None = None,
                    per_row: int = 8) -> tuple[torch.Tensor, int]:
    """Rows of input | mask | up to ``per_row`` results (without a mask: input | results), uint8,
    and the tiles per row, for ``make_grid``."""
    lead = [image] if mask is None else [image, (mask.to(torch.uint8) * 255).expand_as(image)]
    blank = torch.full_like(image, 255)
    rows = []
    for k in range(0, len(results), per_row):
        chunk = list(results[k:k + per_row])
        rows += lead + chunk + [blank] * (min(per_row, len(results)) - len(chunk))
    return torch.stack(rows), len(lead) + min(per_row, len(results))


# ---------------------------------------------------------------- files and masks

def load_edit_image(model: LoadedModel, path: str | Path) -> torch.Tensor:
    """An image file as the model draws them: uint8 (C, S, S), through the data folders' reader;
    a grey image for a colour model is refused in one line."""
    check_image_channels(read_image_header(path), model.config.model.channels, f"the image {path}")
    return load_image(path, model.config.data.image_size, model.config.model.channels)


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """A grey or black-and-white image -> bool (size, size), True (>= 50% grey, white) = keep.
    One mask for every channel: a colour file is read as its grey (a mask keeps or repaints a
    pixel, not a channel of it).

    The file must already be size x size: a resized mask would blur its edge."""
    w, h, _ = read_image_header(path, "mask")
    if (w, h) != (size, size):
        raise DdpmError(f"the mask {path} is {w}x{h}, the model's images are {size}x{size}")
    return load_image(path, size, 1)[0] >= 128


def region_mask(shape: MaskShape, size: int) -> torch.Tensor:
    """The evaluation masks, True = keep: ``right`` half unknown, or a ``center`` square of half the side."""
    keep = torch.ones(size, size, dtype=torch.bool)
    if shape == "right":
        keep[:, size // 2:] = False
    elif shape == "center":
        lo = size // 4
        keep[lo: lo + size // 2, lo: lo + size // 2] = False
    else:
        raise DdpmError(f"unknown mask {shape!r}; choose one of: {', '.join(MASK_SHAPES)}")
    return keep
