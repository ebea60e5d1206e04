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

from .errors import DdpmError

ScheduleName = Literal["linear", "cosine", "quadratic", "sigmoid"]
LossType = Literal["l1", "l2", "huber"]
Objective = Literal["eps", "x0", "v"]
LossWeighting = Literal["uniform", "min_snr"]
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # see ddpm.precision


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: every constructor option of the seed's ``Unet``, plus a few of our own."""

    dim: int = 28
    init_dim: int | None = None  # seed default: dim // 3 * 2
    out_dim: int | None = None  # seed default: channels (doubled when learn_sigma)
    dim_mults: tuple[int, ...] = (1, 2, 4)
    channels: int = 1
    with_time_emb: bool = True
    resnet_block_groups: int = 8
    use_convnext: bool = True
    convnext_mult: int = 2
    resnet_scale_shift: bool = False  # time embedding as FiLM scale/shift in ResNet blocks
    attn_heads: int = 4
    attn_dim_head: int = 32
    linear_attn: bool = True  # linear attention at every resolution, as the seed
    learn_sigma: bool = False  # improved DDPM: also output the variance interpolation v
    grad_checkpoint: bool = False  # recompute block activations in backward to save memory


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective."""

    timesteps: int = 200
    schedule: ScheduleName = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: LossType = "huber"
    objective: Objective = "eps"
    loss_weighting: LossWeighting = "uniform"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    vlb_weight: float = 1e-3  # lambda of the hybrid loss, used when model.learn_sigma


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are shaped."""

    source: str = "fashion-mnist"  # or a folder of PNG/JPEG images
    image_size: int = 28
    channels: int = 1
    flip: bool = True
    data_dir: str | None = None  # folder holding the Fashion-MNIST IDX files


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and its budget (the first of epochs/max_steps/minutes to run out)."""

    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0
    epochs: float | None = 6
    max_steps: int | None = None
    minutes: float | None = None
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)), so short runs work
    max_grad_norm: float | None = None
    sample_every: int = 1000
    sample_n: int = 64
    checkpoint_every: int = 1000
    keep: int = 2
    log_every: int = 50
    seed: int = 0
    channels_last: bool = True
    compile: bool = False
    precision: Precision = "fp32"  # fp32 runs the network exactly; bf16 autocast is 1.4-1.6x faster where native
    tf32: bool = True  # CUDA only: TF32 matrix products and convolutions in fp32


Clip = Literal["none", "clip", "dynamic"]  # x0 clipping while sampling (see core.diffusion.interpret)
Variance = Literal["beta_tilde", "beta", "learned"]  # sigma_t^2 of the reverse step (DDPM Sec. 3.2)
SpacingName = Literal["uniform", "quadratic", "trailing"]  # see core.schedules.space_timesteps


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples: which sampler, how many steps, how many images."""

    sampler: str = "ddpm"  # a name in ddpm.samplers.SAMPLERS
    steps: int | None = None  # None: the sampler's default (all T for ddpm)
    spacing: SpacingName = "uniform"
    eta: float = 0.0
    variance: Variance = "beta_tilde"
    clip: Clip = "clip"
    n: int = 64
    batch_size: int = 256
    seed: int = 0
    use_ema: bool = True
    precision: Precision = "fp32"  # bf16: the network under autocast, 1.4-1.6x faster where native


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
