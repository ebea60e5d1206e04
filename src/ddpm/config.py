"""Typed, frozen configuration for every component, the named presets, and checked loading.

Closed option sets are ``Literal`` types; :func:`from_dict` checks them once, at the edge,
and raises :class:`~ddpm.errors.DdpmError` with a one-line message naming the bad value.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from .core.schedules import SCHEDULES, Spacing as SpacingName
from .errors import DdpmError

# Each closed set of names is one table (docs/architecture.md, "Names"): the command's choices,
# these checks and the plots read it. Schedules and spacings are tables of core.schedules.
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]  # the keys of core.schedules.SCHEDULES
LossType = Literal["l1", "l2", "huber"]
Objective = Literal["eps", "x0", "v"]
LossWeighting = Literal["uniform", "min_snr"]
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # see ddpm.precision


def _f(default: Any, help: str) -> Any:
    """A field with its one-line description, kept beside it (the command's --help reads it)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: every constructor option of the seed's ``Unet``, plus a few of our own."""

    dim: int = _f(28, "base channel width of the U-Net")
    init_dim: int | None = _f(None, "width of the first convolution (default, as the seed: dim // 3 * 2)")
    out_dim: int | None = _f(None, "output channels (default: channels, doubled with learn-sigma)")
    dim_mults: tuple[int, ...] = _f((1, 2, 4), "width multiplier per resolution, e.g. 1,2,4")
    channels: int = _f(1, "image channels the network sees and outputs")
    with_time_emb: bool = _f(True, "condition the network on t (sinusoidal embedding and MLP)")
    resnet_block_groups: int = _f(8, "GroupNorm groups in ResNet blocks")
    use_convnext: bool = _f(True, "ConvNeXt blocks (the seed's default) instead of ResNet blocks")
    convnext_mult: int = _f(2, "ConvNeXt block expansion factor")
    resnet_scale_shift: bool = _f(False, "time embedding as FiLM scale/shift in ResNet blocks")
    attn_heads: int = _f(4, "attention heads")
    attn_dim_head: int = _f(32, "channels per attention head")
    linear_attn: bool = _f(True, "linear attention at every resolution, as the seed")
    learn_sigma: bool = _f(False, "learn the reverse variances (improved DDPM hybrid loss)")
    grad_checkpoint: bool = _f(False, "recompute block activations in backward to save memory")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective."""

    timesteps: int = _f(200, "T, the number of diffusion steps")
    schedule: ScheduleName = _f("linear", "the beta schedule")
    beta_start: float = _f(1e-4, "beta_1 of the linear, quadratic and sigmoid schedules")
    beta_end: float = _f(0.02, "beta_T of the linear, quadratic and sigmoid schedules")
    loss: LossType = _f("huber", "the distance between the target and the prediction")
    objective: Objective = _f("eps", "what the network predicts: the noise, x0 or v")
    loss_weighting: LossWeighting = _f("uniform", "weight per t of the loss (min_snr: Hang et al. 2023)")
    min_snr_gamma: float = _f(5.0, "gamma of min-SNR weighting")
    offset_noise: float = _f(0.0, "scale of per-channel offset noise added to eps")
    vlb_weight: float = _f(1e-3, "lambda of the hybrid loss, used with learn-sigma")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are shaped."""

    source: str = _f("fashion-mnist", "fashion-mnist or a folder of PNG/JPEG images")
    image_size: int = _f(28, "images are resized to this many pixels a side")
    channels: int = _f(1, "image channels (1: grey, 3: RGB)")
    flip: bool = _f(True, "random horizontal flips")
    data_dir: str | None = _f(None, "folder holding the Fashion-MNIST IDX files")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and its budget (the first of epochs/max_steps/minutes to run out)."""

    batch_size: int = _f(128, "images per optimiser step")
    lr: float = _f(1e-3, "Adam's learning rate")
    lr_schedule: LrSchedule = _f("constant", "learning rate after warm-up")
    warmup_steps: int = _f(0, "steps of linear learning-rate warm-up")
    epochs: float | None = _f(6, "budget in passes over the data")
    max_steps: int | None = _f(None, "budget in optimiser steps")
    minutes: float | None = _f(None, "budget in wall-clock minutes")
    ema_decay: float = _f(0.999, "decay of the weights' moving average (0 turns EMA off)")
    ema_warmup: bool = _f(True, "EMA decay min(ema-decay, (1 + step) / (10 + step)), so short runs work")
    max_grad_norm: float | None = _f(None, "clip the gradient norm to this")
    sample_every: int = _f(1000, "steps between sample grids (0: never)")
    sample_n: int = _f(64, "images in each sample grid")
    checkpoint_every: int = _f(1000, "steps between checkpoints")
    keep: int = _f(2, "checkpoints kept")
    log_every: int = _f(50, "steps between log lines")
    seed: int = _f(0, "seed of the initial weights, the batches and the noise")
    channels_last: bool = _f(True, "channels-last memory layout (1.2x faster convolutions on CPU)")
    compile: bool = _f(False, "torch.compile the network")
    precision: Precision = _f("fp32", "fp32 (exact) | bf16 (autocast, 1.4-1.6x where native) | fp16 (CUDA) | auto")
    tf32: bool = _f(True, "CUDA: TF32 matrix products and convolutions in fp32")


Clip = Literal["none", "clip", "dynamic"]  # x0 clipping while sampling (core.diffusion.interpret)
Variance = Literal["beta_tilde", "beta", "learned"]  # sigma_t^2 of the reverse step (DDPM Sec. 3.2)
CLIPS: tuple[str, ...] = get_args(Clip)
VARIANCES: tuple[str, ...] = get_args(Variance)


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples: which sampler, how many steps, how many images."""

    sampler: str = _f("ddpm", "the sampler (ddpm.samplers.SAMPLERS)")
    steps: int | None = _f(None, "sampling steps (default: the sampler's own)")
    spacing: SpacingName = _f("uniform", "which of the T training steps the sampler visits")
    eta: float = _f(0.0, "DDIM noise, 0 (deterministic) to 1")
    variance: Variance = _f("beta_tilde", "ddpm: the reverse step's variance")
    clip: Clip = _f("clip", "x0 clipping")
    n: int = _f(64, "images to draw")
    batch_size: int = _f(256, "images per batch")
    seed: int = _f(0, "seed of the noise")
    use_ema: bool = _f(True, "the EMA weights (else the raw weights)")
    precision: Precision = _f("fp32", "fp32 | bf16 (autocast, 1.4-1.6x where native) | fp16 (CUDA) | auto")


def check_sample_config(cfg: SampleConfig) -> None:
    """The checks that need no model: names and counts, one-line errors."""
    for name in ("spacing", "variance", "clip", "precision"):
        _check_value(name, typing.get_type_hints(SampleConfig)[name], getattr(cfg, name))
    if cfg.n < 1 or cfg.batch_size < 1:
        raise DdpmError(f"--n and --batch-size must be at least 1, got {cfg.n} and {cfg.batch_size}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved as ``config.json`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return from_dict(cls, d)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DdpmError(f"cannot read config {path}: {e}") from None
        return from_dict(cls, d)


def _fast() -> RunConfig:
    """Small, quick preset for CPUs: the demo's default. Each choice was measured against the
    others at a 4-minute CPU budget (BENCHMARKS.md, "Ablations"): v beats eps, min-SNR beats
    uniform weighting, batch 32 beats 64 and 128 (more updates), bf16 where native is 1.17x
    the steps."""
    return RunConfig(
        model=ModelConfig(dim=32, init_dim=32, dim_mults=(1, 2, 2), use_convnext=False,
                          resnet_scale_shift=True, linear_attn=False, attn_heads=2),
        diffusion=DiffusionConfig(timesteps=500, schedule="cosine", loss="l2", objective="v",
                                  loss_weighting="min_snr"),
        train=TrainConfig(batch_size=32, lr=2e-3, lr_schedule="cosine", warmup_steps=100,
                          epochs=None, minutes=5, ema_decay=0.999, sample_every=0,
                          checkpoint_every=500, precision="auto"),
        preset="fast",
    )


PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    # The seed's recipe exactly: T=200 linear, huber, eps, Adam 1e-3, batch 128, 6 epochs.
    "seed": lambda: RunConfig(preset="seed"),
    "fast": _fast,
}


def preset(name: str) -> RunConfig:
    """The named preset's full config."""
    if name not in PRESETS:
        raise DdpmError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


T = TypeVar("T")


def _check_value(path: str, tp: Any, value: Any) -> Any:
    """Coerce JSON value to the annotated type, or raise a one-line DdpmError."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise DdpmError(f"unknown {path} {value!r}; choose one of: {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(path, inner[0], value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DdpmError(f"{path} must be a list, got {value!r}")
        (elem, _) = get_args(tp)
        return tuple(_check_value(path, elem, v) for v in value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DdpmError(f"{path} must be an object, got {value!r}")
        return _from_dict(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise DdpmError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DdpmError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DdpmError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise DdpmError(f"{path} must be a string, got {value!r}")
    return value


def _from_dict(cls: type[T], d: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise DdpmError(f"unknown config key {prefix}{sorted(unknown)[0]}")
    kwargs = {k: _check_value(prefix + k, hints[k], v) for k, v in d.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build a (nested) config dataclass from a JSON-style dict, checking every value."""
    if not isinstance(d, dict):
        raise DdpmError(f"a config must be a JSON object, got {type(d).__name__}")
    return _from_dict(cls, d, "")


def override(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that checks the new values' types and choices first."""
    hints = typing.get_type_hints(type(cfg))
    checked = {k: _check_value(k.replace("_", "-"), hints[k], v) for k, v in changes.items()}
    return replace(cfg, **checked)
