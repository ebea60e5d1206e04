"""From a checkpoint to images: load the model, run a sampler in batches, record frames."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch

from ..checkpoint import GUIDE, has_guide, load_checkpoint, load_into
from ..files import run_of
from ..config import RunConfig, SampleConfig, check_sample_config as check_config
from ..data.readers import from_model_range
from ..core.diffusion import Denoiser
from ..errors import DdpmError
from ..nn import build_network
from ..runtime.device import resolve_device
from ..runtime.precision import Trial, autocast_dtype, describe, resolve_precision, under_autocast
from ..runtime.budget import MARGIN, Need, available_memory, check_fits, check_steps, network_peak, smaller_batch
from ..runtime.progress import StepBar, chain_hooks
from ..samplers.base import ImageGenerators
from ..samplers import SamplerOptions, StepCallback, check_options, check_process, default_steps, get_sampler, plan_for
from ..core.objectives import get_objective
from ..core.processes import VP, Process, make_process
from ..core.schedules import NoiseSchedule, make_schedule
from ..pictures.viz import make_grid
from .guidance import check_guidance, has_labels, request_labels
from .pretrained import output_root, resolve_run


@dataclass
class LoadedModel:
    """A trained network with its schedule and config, ready to sample."""

    net: torch.nn.Module
    schedule: NoiseSchedule
    config: RunConfig
    step: int
    source: Path
    _guides: dict = field(default_factory=dict, repr=False)  # guiding networks loaded, by folder
    process: Process | None = None  # the run's noise process (made from its config when None)

    def __post_init__(self) -> None:
        if self.process is None:
            self.process = process_of(self.config, self.schedule)

    @property
    def device(self) -> torch.device:
        return self.schedule.alpha_bar.device

    def denoiser(self, clip: str = "none", precision: str = "fp32") -> Denoiser:
        d = self.config.diffusion
        dev = self.device
        net = under_autocast(self.net, dev, autocast_dtype(precision, dev))
        levels = self.process.table if isinstance(self.process, VP) else self.process.plan(1, "uniform").levels
        return Denoiser(net, levels.to(dev), objective=get_objective(d.objective, d.sigma_data, d.process),
                        learn_sigma=self.config.model.learn_sigma, clip=clip,
                        num_classes=self.config.model.num_classes, process=self.process)

    def plan(self, sampler: str, steps: int | None, spacing: str | None, *, t_max: float = 1.0):
        """The levels and indices ``sampler`` visits on this model's process (on its device)."""
        p = plan_for(sampler, self.process, steps, spacing, t_max=t_max)
        return p._replace(levels=p.levels.to(self.device))

    def guide_folder(self, path: str | Path | None = None) -> Path:
        """Where autoguidance's guiding model is: ``path``, else RUN/guide beside this checkpoint."""
        return Path(path) if path is not None else self.run() / GUIDE

    def run(self) -> Path:
        """The run this checkpoint belongs to, or the checkpoint folder itself when it stands alone."""
        return run_of(self.source) or self.source

    def has_guide(self) -> bool:
        """Whether training kept a guiding model beside this checkpoint (RUN/guide)."""
        return has_guide(self.run())

    def guide(self, path: str | Path | None = None, precision: str = "fp32") -> torch.nn.Module:
        """Autoguidance's guiding network: ``path`` (a run or checkpoint folder), else the one
        training kept beside this checkpoint (RUN/guide); loaded once, checked to be of the
        same kind (image shape, schedule, objective, outputs, classes)."""
        where = self.guide_folder(path)
        if path is None and not self.has_guide():
            raise DdpmError(f"{self.run()} has no guiding model ({GUIDE}/, kept by training with "
                            "--guide-at, which the fast presets set): pass --guiding-model PATH, e.g. an earlier "
                            "checkpoint of the same run")
        key = (str(where.resolve()) if where.exists() else str(where), precision)
        if self._guides.get(key) is None:
            guide = load_model(where, device=self.schedule.alpha_bar.device)
            check_guide(self.config, guide.config, where)
            dev = self.schedule.alpha_bar.device
            self._guides[key] = under_autocast(guide.net, dev, autocast_dtype(precision, dev))
        return self._guides[key]

    def run_folder(self) -> Path:
        """Where commands write beside this model: its run folder (``runs/NAME`` for a shipped one)."""
        return output_root(self.source)


def process_of(config: RunConfig, schedule: NoiseSchedule) -> Process:
    """The run's process; the discrete chain on ``schedule`` (and its device) for vp runs."""
    if config.diffusion.process == "vp" and schedule is not None:
        return VP(config.diffusion, schedule)
    return make_process(config)


def load_model(path: str | Path, *, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedModel:
    """A run folder or checkpoint (or a shipped model's name, e.g. "fashion-mnist") -> the
    network (EMA weights by default) in eval mode."""
    ck = load_checkpoint(resolve_run(path))
    dev = resolve_device(device) if isinstance(device, str) else device
    net = build_network(ck.config.model)
    load_into(net, ck.sampling_weights(use_ema), ck.path)
    net = net.to(dev).eval()
    if ck.config.train.channels_last:  # the layout it trained in: faster convolutions
        net = net.to(memory_format=torch.channels_last)
    return LoadedModel(net, make_schedule(ck.config).to(dev), ck.config, ck.step, ck.path)


def check_guide(config: RunConfig, guide: RunConfig, where: Path) -> None:
    """A guiding model must read and write what the guided one does, step for step."""
    m, g = config, guide
    pairs = {"image size": (m.data.image_size, g.data.image_size), "channels": (m.model.channels, g.model.channels),
             "process": (m.diffusion.process, g.diffusion.process),
             "timesteps": (m.diffusion.timesteps, g.diffusion.timesteps),
             "schedule": (m.diffusion.schedule, g.diffusion.schedule),
             "explicit betas": ("these", "these" if m.diffusion.betas == g.diffusion.betas else "others"),
             "objective": (m.diffusion.objective, g.diffusion.objective),
             "learned variances": (m.model.learn_sigma, g.model.learn_sigma),
             "classes": (m.model.num_classes, g.model.num_classes)}
    if m.diffusion.schedule == "linear" or g.diffusion.schedule == "linear":
        pairs["beta range"] = ((m.diffusion.beta_start, m.diffusion.beta_end), (g.diffusion.beta_start, g.diffusion.beta_end))
    bad = [f"{k} {a} vs {b}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise DdpmError(f"the guiding model {where} is not of the same kind as the model it guides: {'; '.join(bad)}")


@dataclass
class Samples:
    images: torch.Tensor  # uint8 (N, C, H, W)
    nfe: int
    steps: int
    frames: list[np.ndarray] = field(default_factory=list)  # grids of x_t (or x0) during sampling
    arithmetic: str = "fp32"  # what cfg.precision resolved to on this device
    labels: torch.Tensor | None = None  # (N,) the class of each image (class by class), when asked
    per_class: int | None = None  # images of each class: one grid row per class

    def class_rows(self, most: int = 16) -> tuple[torch.Tensor | None, int | None]:
        """(images, per row) of a grid with one row per class, at most ``most`` of each;
        (None, None) when no classes were asked for."""
        if self.per_class is None:
            return None, None
        keep = min(self.per_class, most)
        return self.images.reshape(-1, self.per_class, *self.images.shape[1:])[:, :keep].flatten(0, 1), keep


def check_sample_config(model: LoadedModel, cfg: SampleConfig, *, frames: bool = False, stream: bool = False) -> int:
    """Validate against the model, and the memory of the request against the machine's
    (``frames``: a GIF of the first batch is recorded; ``stream``: the images go to disk batch
    by batch, not held); return the number of steps to run."""
    spec = get_sampler(cfg.sampler)
    check_config(cfg)
    check_process(cfg.sampler, model.process)
    steps = default_steps(cfg.sampler, model.process) if cfg.steps is None else cfg.steps
    model.plan(cfg.sampler, steps, cfg.spacing)  # raises on bad steps / spacing
    check_options(cfg.sampler, SamplerOptions(cfg.eta, cfg.variance), model.config.model.learn_sigma)
    autocast_dtype(cfg.precision, model.schedule.alpha_bar.device)  # e.g. fp16 without CUDA
    check_guidance(cfg, model.config)
    if cfg.autoguidance:
        model.guide(cfg.guiding_model, cfg.precision)  # found and of the same kind, or one line
    check_steps(steps, f"--steps {steps}")
    check_sampling_memory(model, cfg, frames=frames, stream=stream)
    return steps


def sampling_needs(model: LoadedModel, cfg: SampleConfig, batch: int, *, frames: bool, stream: bool) -> list[Need]:
    """The memory of drawing ``cfg.n`` images ``batch`` at a time: the network's peak (twice the
    images under classifier-free guidance), the sampler's own tensors, the images held (all of
    them, with their copies while the file is encoded, unless streamed), the GIF's frames."""
    mc = model.config
    size, c = mc.data.image_size, mc.model.channels
    image = c * size * size  # bytes of one uint8 image
    passes = 2 if cfg.guidance and has_labels(cfg, mc) else 1
    net = int(MARGIN * network_peak(mc.model, size, batch * passes, train=False))
    held = (batch + min(cfg.n, 64)) * image if stream else 3 * cfg.n * image
    gif = (MAX_FRAMES + 1) * batch * c * (size + 2) ** 2 * (1 + 4) if frames else 0  # frames, then at scale 2
    return [Need(f"the network at batch size {batch}", net), Need("the sampler's tensors", 8 * 4 * batch * image),
            Need(f"{'a batch and the grid' if stream else f'{cfg.n:,} images'}", held), Need("the GIF's frames", gif)]


def check_sampling_memory(model: LoadedModel, cfg: SampleConfig, *, frames: bool, stream: bool) -> None:
    """One line, before the first step, when the request cannot fit in the memory left."""
    have = available_memory(model.schedule.alpha_bar.device)
    batch = min(cfg.batch_size, cfg.n)
    needs = sampling_needs(model, cfg, batch, frames=frames, stream=stream)
    total = sum(n.bytes for n in needs)
    if total <= have.bytes:
        return
    fits = lambda b: sum(n.bytes for n in sampling_needs(model, cfg, b, frames=frames, stream=stream)) <= have.bytes
    b = smaller_batch(fits, batch, have.bytes / total)
    advice = (f"try --batch-size {b}" if b else "not even at --batch-size 1; try a smaller --n" if needs[2].bytes
              > have.bytes / 2 else "the network does not fit one image at a time")
    check_fits(needs, have, advice=advice)


def with_precision_resolved(model: LoadedModel, cfg: SampleConfig) -> SampleConfig:
    """``cfg`` with its precision resolved once: ``auto`` by a trial of this very network at this
    request's batch (twice the images under classifier-free guidance), cached per machine."""
    mc = model.config
    size = mc.data.image_size
    batch = min(cfg.batch_size, cfg.n) * (2 if cfg.guidance and has_labels(cfg, mc) else 1)
    trial = Trial(model.net, (batch, mc.model.channels, size, size), training=False,
                  num_classes=mc.model.num_classes, channels_last=mc.train.channels_last)
    return dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, model.schedule.alpha_bar.device, trial))


MAX_FRAMES = 100  # GIF frames recorded by default


@torch.inference_mode()
def generate(model: LoadedModel, cfg: SampleConfig, *, frames: Literal["none", "x_t", "x0"] = "none",
             frame_index: int | None = None, max_frames: int = MAX_FRAMES, progress: bool = False,
             on_step: StepHook | None = None, on_batch: Callable[[torch.Tensor], None] | None = None,
             keep: int | None = None) -> Samples:
    """Draw ``cfg.n`` images in batches; optionally record grids of the first batch's denoising.
    ``progress``: a bar with the time left on stderr (when it is a terminal).

    ``on_step(StepEvent)`` is called after every sampler step of every batch; returning False
    (or raising SamplingCancelled) stops the loop and raises SamplingCancelled out of here.

    ``on_batch(images)`` gets each batch's uint8 images as it is drawn (to stream them to disk);
    ``keep`` limits the images held in the result to the first ``keep`` (None: all)."""
    steps = check_sample_config(model, cfg, frames=frames != "none", stream=on_batch is not None and keep is not None)
    cfg = with_precision_resolved(model, cfg)
    spec = get_sampler(cfg.sampler)
    dev = model.schedule.alpha_bar.device
    labels, classes = request_labels(cfg, model.config, cfg.n)  # asked for, drawn, or none
    n = cfg.n if labels is None else len(labels)
    plan = model.plan(cfg.sampler, steps, cfg.spacing)  # spacing None: the sampler's own
    timesteps = plan.timesteps
    mc = model.config
    shape = (mc.model.channels, mc.data.image_size, mc.data.image_size)
    out, recorded, null_passes = [], [], 0
    every = max(1, steps // max_frames)
    denoiser = model.denoiser(cfg.clip, cfg.precision).on(plan.levels)
    guide = model.guide(cfg.guiding_model, cfg.precision) if cfg.autoguidance else None
    bar = StepBar(-(-n // cfg.batch_size) * steps, f"{cfg.sampler}, {steps} steps", progress) if progress else None
    on_step = chain_hooks(bar, on_step)  # the bar is one more consumer of the steps
    for start in range(0, n, cfg.batch_size):
        b = min(cfg.batch_size, n - start)
        gen = ImageGenerators.for_images(cfg.seed, start, b, dev)  # image i: (seed, i) only, whatever the batch
        x_T = gen.randn((b, *shape), device=dev) * plan.levels.prior_scale(timesteps[-1]).float()
        den = denoiser if labels is None else denoiser.conditioned(
            labels[start:start + b].to(dev), cfg.guidance, cfg.guidance_interval)
        den = den.autoguided(guide, cfg.autoguidance, cfg.autoguidance_interval)
        record = None
        if frames != "none" and start == 0:
            record = _recorder(recorded, frames, frame_index, every, steps)
            recorded.append(_frame(x_T, frame_index))
        hooked = _with_hook(record, on_step, start, steps, -(-n // cfg.batch_size) * steps, cfg.batch_size)
        x = spec.fn(den, x_T, timesteps, options=SamplerOptions(cfg.eta, cfg.variance),
                    generator=gen, on_step=hooked)
        images = from_model_range(x).cpu()
        if on_batch is not None:
            on_batch(images)
        held = sum(len(o) for o in out)
        if keep is None or held < keep:
            out.append(images if keep is None else images[: keep - held])
        null_passes = den.null_passes + den.guide_passes  # the same in every batch: the grid decides
    nfe = spec.nfe(plan.levels, timesteps) + null_passes  # a guided step is two evaluations
    return Samples(torch.cat(out), nfe, steps, recorded,
                   describe(autocast_dtype(cfg.precision, dev)), labels,
                   None if classes is None else n // len(classes))


def _frame(x: torch.Tensor, index: int | None) -> np.ndarray:
    imgs = from_model_range(x if index is None else x[index:index + 1]).cpu()
    return make_grid(imgs)


def _recorder(frames: list[np.ndarray], what: str, index: int | None, every: int, steps: int):
    def on_step(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i % every == 0 or i == steps - 1:
            frames.append(_frame(x_t if what == "x_t" else x0, index))
    return on_step


class SamplingCancelled(DdpmError):
    """Raised out of ``generate`` when its ``on_step`` hook asked to stop."""


class StepEvent(NamedTuple):
    """One finished sampler step: progress over the whole request, and the batch's x_t and x0 guess."""

    done: int  # steps finished so far, over all batches
    total: int  # steps in the whole request (batches x steps)
    batch_start: int  # index of the batch's first image
    x_t: torch.Tensor  # (B, C, H, W) in [-1, 1] (roughly, for x_t)
    x0: torch.Tensor  # (B, C, H, W): the model's current guess of the clean images


StepHook = Callable[[StepEvent], "bool | None"]


def _with_hook(record: StepCallback | None, hook: StepHook | None, start: int, steps: int, total: int,
               batch_size: int) -> StepCallback | None:
    """The sampler's callback: ``record`` (GIF frames), then the caller's hook, which may stop the loop."""
    if hook is None:
        return record
    before = (start // batch_size) * steps

    def on_step(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if record is not None:
            record(i, x_t, x0)
        if hook(StepEvent(before + i + 1, total, start, x_t, x0)) is False:
            raise SamplingCancelled("sampling cancelled")
    return on_step
