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

from .core.noise_levels import NOISE_LEVELS
from .core.objectives import OBJECTIVES
from .core.processes import PROCESSES
from .core.schedules import SCHEDULES, Spacing as SpacingName
from .errors import DdpmError
from .files import shorten

# Each closed set of names is one table (docs/architecture.md, "Names"): the command's choices,
# these checks and the plots read it. Schedules and spacings are tables of core.schedules.
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]  # the keys of core.schedules.SCHEDULES
LossType = Literal["l1", "l2", "huber"]
Objective = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]  # the keys of core.objectives.OBJECTIVES
ProcessName = Literal[tuple(PROCESSES)]  # type: ignore[valid-type]  # the keys of core.processes.PROCESSES
LossWeighting = Literal["uniform", "min_snr", "edm"]
TimestepSampling = Literal[tuple(NOISE_LEVELS)]  # type: ignore[valid-type]  # the keys of core.noise_levels.NOISE_LEVELS
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # see ddpm.runtime.precision


def _f(default: Any, help: str) -> Any:
    """A field with its one-line description, kept beside it (the command's --help reads it)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: every constructor option of the seed's ``Unet``, plus a few of our own."""

    arch: Literal["unet"] = _f("unet", "the network (ddpm.nn.NETWORKS); each has its own flags, grouped below")
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
    blocks_per_level: int = _f(2, "blocks per resolution on the way down (the way up has as many), 2 as the seed")
    num_classes: int = _f(0, "> 0: class-conditional (index num_classes: the null class of classifier-free guidance)")
    class_emb_std: float = _f(0.02, "conditional: std of the class embedding's initial weights (DiT: 0.02; ADM: 1)")

    def check_sizes(self) -> None:
        """Sizes it can be built from, in one line each (see check_model_sizes)."""
        mults = self.dim_mults
        if not (2 <= self.dim <= MAX_WIDTH and mults and len(mults) <= 16
                and all(1 <= k <= MAX_WIDTH for k in mults) and self.dim * max(mults) <= MAX_WIDTH):
            raise DdpmError(f"invalid U-Net size: dim={shorten(self.dim)}, dim_mults={shorten(mults)} (dim at least "
                            f"2, 1 to 16 multipliers of at least 1, widths up to {MAX_WIDTH:,})")
        for name in ("init_dim", "out_dim", "attn_heads", "attn_dim_head", "resnet_block_groups", "convnext_mult",
                     "blocks_per_level"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= MAX_WIDTH:
                raise DdpmError(f"model.{name} must be between 1 and {MAX_WIDTH:,}, got {shorten(v)}")


@dataclass(frozen=True)
class DiTConfig:
    """The diffusion transformer (Peebles & Xie 2023): patches, transformer blocks with adaLN-Zero.
    The fields it shares with the U-Net (channels, learn_sigma, num_classes, class_emb_std,
    grad_checkpoint) have the same names and meanings, so that the rest of the code reads either."""

    arch: Literal["dit"] = _f("dit", "the network (ddpm.nn.NETWORKS); each has its own flags, grouped below")
    channels: int = _f(1, "image channels the network sees and outputs")
    patch_size: int = _f(2, "DiT: pixels a side of one token's patch (must divide the image size)")
    hidden: int = _f(192, "DiT: width of the tokens")
    depth: int = _f(6, "DiT: transformer blocks")
    heads: int = _f(4, "DiT: attention heads (must divide --hidden)")
    mlp_ratio: float = _f(4.0, "DiT: width of each block's MLP, in multiples of --hidden")
    learn_sigma: bool = _f(False, "learn the reverse variances (improved DDPM hybrid loss)")
    grad_checkpoint: bool = _f(False, "recompute block activations in backward to save memory")
    num_classes: int = _f(0, "> 0: class-conditional (index num_classes: the null class of classifier-free guidance)")
    class_emb_std: float = _f(0.02, "conditional: std of the class embedding's initial weights (DiT: 0.02; ADM: 1)")

    def check_sizes(self) -> None:
        """Sizes it can be built from, in one line each (see check_model_sizes)."""
        for name, top in (("channels", MAX_WIDTH), ("patch_size", MAX_WIDTH), ("hidden", MAX_WIDTH),
                          ("depth", MAX_DEPTH), ("heads", MAX_WIDTH)):
            v = getattr(self, name)
            if not 1 <= v <= top:
                raise DdpmError(f"--{name.replace('_', '-')} must be between 1 and {top:,}, got {shorten(v)}")
        if self.hidden % self.heads:
            raise DdpmError(f"--hidden {self.hidden} must be a multiple of --heads {self.heads} "
                            "(each head takes an equal share)")
        ratio = self.mlp_ratio
        if not (isinstance(ratio, (int, float)) and 0 < ratio and self.hidden * ratio <= MAX_WIDTH):
            raise DdpmError(f"--mlp-ratio must be above 0 with --hidden times it at most {MAX_WIDTH:,}, "
                            f"got {shorten(self.mlp_ratio)}")


# diffusers' UNet2DModel block names (diffusers.models.unets.unet_2d_blocks) a DiffusersUNetConfig may use
DIFFUSERS_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnSkipDownBlock2D",
                         "SkipDownBlock2D")
DIFFUSERS_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D")


@dataclass(frozen=True)
class DiffusersUNetConfig:
    """diffusers' ``UNet2DModel``: its own constructor options under their own names (in_channels,
    out_channels and num_class_embeds come from channels, learn_sigma and num_classes, the fields
    every network shares). Needs ``pip install 'ddpm[diffusers]'``."""

    arch: Literal["diffusers-unet"] = _f("diffusers-unet", "the network (ddpm.nn.NETWORKS); each has its own flags, "
                                                           "grouped below")
    channels: int = _f(1, "image channels the network sees and outputs")
    block_out_channels: tuple[int, ...] = _f((16, 32, 64), "diffusers: width of each resolution's blocks")
    layers_per_block: int = _f(1, "diffusers: ResNet layers per down block (the up blocks have one more)")
    down_block_types: tuple[str, ...] = _f(("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                           f"diffusers: one per resolution, of {', '.join(DIFFUSERS_DOWN_BLOCKS)}")
    up_block_types: tuple[str, ...] = _f(("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                         f"diffusers: one per resolution, of {', '.join(DIFFUSERS_UP_BLOCKS)}")
    mid_block_type: str | None = _f("UNetMidBlock2D", "diffusers: UNetMidBlock2D or none")
    add_attention: bool = _f(True, "diffusers: attention in the middle block")
    attention_head_dim: int | None = _f(8, "diffusers: channels per attention head (none: one head)")
    norm_num_groups: int = _f(8, "diffusers: GroupNorm groups (must divide every width)")
    attn_norm_num_groups: int | None = _f(None, "diffusers: GroupNorm groups of the middle attention (none: as above)")
    norm_eps: float = _f(1e-5, "diffusers: GroupNorm epsilon")
    act_fn: str = _f("silu", "diffusers: activation (silu, mish, gelu, relu)")
    resnet_time_scale_shift: Literal["default", "scale_shift"] = _f(
        "default", "diffusers: time embedding added (default) or as FiLM scale/shift")
    time_embedding_dim: int | None = _f(None, "diffusers: time embedding width (none: 4 x the first width)")
    flip_sin_to_cos: bool = _f(True, "diffusers: cos before sin in the timestep embedding")
    freq_shift: int = _f(0, "diffusers: frequency shift of the timestep embedding")
    center_input_sample: bool = _f(False, "diffusers: x -> 2 x - 1 before the first convolution")
    mid_block_scale_factor: float = _f(1.0, "diffusers: the middle block's output scale")
    downsample_padding: int = _f(1, "diffusers: padding of the down-sampling convolution")
    downsample_type: Literal["conv", "resnet"] = _f("conv", "diffusers: how ResnetDownsampleBlock2D and "
                                                            "AttnDownBlock2D down-sample")
    upsample_type: Literal["conv", "resnet"] = _f("conv", "diffusers: how ResnetUpsampleBlock2D and AttnUpBlock2D "
                                                          "up-sample")
    dropout: float = _f(0.0, "diffusers: dropout in the ResNet blocks")
    learn_sigma: bool = _f(False, "learn the reverse variances (improved DDPM hybrid loss; diffusers' learned_range)")
    grad_checkpoint: bool = _f(False, "recompute block activations in backward to save memory")
    num_classes: int = _f(0, "> 0: class-conditional (index num_classes: the null class of classifier-free guidance; "
                             "diffusers' num_class_embeds = num_classes + 1)")
    class_emb_std: float = _f(0.02, "conditional: std of the class embedding's initial weights (DiT: 0.02; ADM: 1)")

    def check_sizes(self) -> None:
        """Sizes and names it can be built from, in one line each (see check_model_sizes)."""
        widths, n = self.block_out_channels, len(self.block_out_channels)
        if not (1 <= n <= 16 and all(1 <= w <= MAX_WIDTH for w in widths)):
            raise DdpmError(f"--block-out-channels must be 1 to 16 widths between 1 and {MAX_WIDTH:,}, "
                            f"got {shorten(widths)}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise DdpmError(f"--down-block-types and --up-block-types need one block per width ({n}), got "
                            f"{len(self.down_block_types)} and {len(self.up_block_types)}")
        for flag, names, known in (("down-block-types", self.down_block_types, DIFFUSERS_DOWN_BLOCKS),
                                   ("up-block-types", self.up_block_types, DIFFUSERS_UP_BLOCKS)):
            bad = [b for b in names if b not in known]
            if bad:
                raise DdpmError(f"--{flag}: unknown block {shorten(bad[0])}; choose among: {', '.join(known)}")
        if self.mid_block_type not in (None, "UNetMidBlock2D"):
            raise DdpmError(f"--mid-block-type must be UNetMidBlock2D or none, got {shorten(self.mid_block_type)}")
        groups = self.norm_num_groups
        if not 1 <= groups <= MAX_WIDTH or any(w % groups for w in widths):
            raise DdpmError(f"--norm-num-groups {shorten(groups)} must divide every width {shorten(widths)}")
        for name in ("layers_per_block", "attention_head_dim", "attn_norm_num_groups", "time_embedding_dim"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= MAX_WIDTH:
                raise DdpmError(f"--{name.replace('_', '-')} must be between 1 and {MAX_WIDTH:,}, got {shorten(v)}")


# The networks' configs, one per architecture, told apart by their ``arch`` (a config without one
# is the U-Net's: every run saved before there was a choice). ddpm.nn.NETWORKS builds each.
AnyModelConfig = typing.Union[ModelConfig, DiTConfig, DiffusersUNetConfig]


def model_configs() -> dict[str, type]:
    """``arch`` -> its config class, read from :data:`AnyModelConfig`."""
    return {c.arch: c for c in get_args(AnyModelConfig)}  # a field's default is its class's attribute


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective."""

    process: ProcessName = _f("vp", "the noise process: vp (DDPM's discrete chain), edm (Karras et al. 2022) or "
                                    "rectified-flow (x_t = (1 - t) x0 + t eps)")
    timesteps: int = _f(200, "T, the number of diffusion steps")
    schedule: ScheduleName = _f("linear", "the beta schedule")
    betas: tuple[float, ...] | None = _f(None, "vp: the T betas themselves, in place of a named schedule (e.g. a "
                                               "diffusers scheduler's)")
    beta_start: float = _f(1e-4, "beta_1 of the linear, quadratic and sigmoid schedules")
    beta_end: float = _f(0.02, "beta_T of the linear, quadratic and sigmoid schedules")
    loss: LossType = _f("huber", "the distance between the target and the prediction")
    objective: Objective = _f("eps", "what the network predicts: the noise, x0, v, the flow's velocity "
                                     "eps - x0, or EDM's preconditioned output")
    loss_weighting: LossWeighting = _f("uniform", "weight per t of the loss (min_snr: Hang et al. 2023; edm: "
                                                  "Karras et al. 2022's lambda(sigma))")
    min_snr_gamma: float = _f(5.0, "gamma of min-SNR weighting")
    t_sampling: TimestepSampling = _f("uniform", "how training draws t: uniform (DDPM), lognormal: ln sigma "
                                                 "normal (EDM, Karras et al. 2022), or logit-normal (SD3)")
    lognormal_mean: float = _f(-1.2, "lognormal t-sampling: mean of ln sigma (EDM's P_mean)")
    lognormal_std: float = _f(1.2, "lognormal t-sampling: std of ln sigma (EDM's P_std)")
    logit_mean: float = _f(0.0, "logit-normal t-sampling: mean of logit t (SD3's m)")
    logit_std: float = _f(1.0, "logit-normal t-sampling: std of logit t (SD3's s)")
    sigma_min: float = _f(0.002, "edm: the lowest noise level sigma")
    sigma_max: float = _f(80.0, "edm: the highest noise level sigma")
    rho: float = _f(7.0, "edm: the grid's rho (sigma^(1/rho) linear in t)")
    sigma_data: float = _f(0.5, "the data's std in EDM's preconditioning and weighting")
    offset_noise: float = _f(0.0, "scale of per-channel offset noise added to eps")
    vlb_weight: float = _f(1e-3, "lambda of the hybrid loss, used with learn-sigma")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are shaped."""

    source: str = _f("fashion-mnist", "fashion-mnist, a folder of PNG/JPEG images (root/<class>/... for classes), "
                                      "an .npz of arrays, or a Hugging Face dataset on disk (ddpm.data.KINDS)")
    test_source: str | None = _f(None, "the images evaluations compare with (default: the source's own test split: "
                                       "fashion-mnist's, a folder's test/, an .npz's test_images, a dataset's test)")
    image_size: int = _f(28, "images are resized to this many pixels a side")
    channels: int = _f(1, "image channels (1: grey, 3: RGB)")
    flip: bool = _f(True, "random horizontal flips")
    data_dir: str | None = _f(None, "folder holding the Fashion-MNIST IDX files")
    class_names: tuple[str, ...] = _f((), "a conditional run's classes, by index (filled in from the data)")
    class_counts: tuple[int, ...] = _f((), "a conditional run's training images per class (filled in from the "
                                           "data): the proportions its default draw of labels follows")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and its budget (the first of epochs/max_steps/minutes to run out)."""

    batch_size: int = _f(128, "images per optimiser step")
    lr: float = _f(1e-3, "Adam's learning rate")
    adam_beta2: float = _f(0.999, "Adam's second-moment decay (0.99 adapts faster in short runs)")
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
    channels_last: bool = _f(True, "channels-last memory layout (faster convolutions on CPU)")
    compile: bool = _f(False, "torch.compile the network")
    precision: Precision = _f("fp32", "fp32 (exact) | bf16 (autocast) | fp16 (CUDA) | auto (on a CPU: "
                                 "bf16 only where a short timed trial finds it faster)")
    tf32: bool = _f(True, "CUDA: TF32 matrix products and convolutions in fp32")
    cond_drop: float = _f(0.1, "conditional runs: P(label -> null class), Ho & Salimans 2022's p_uncond")
    guide_at: float = _f(0.0, "keep the EMA weights at this fraction of the budget in RUN/guide: the guiding "
                              "model of --autoguidance (Karras et al. 2024); 0: none")


Clip = Literal["none", "clip", "dynamic"]  # x0 clipping while sampling (core.diffusion.interpret)
Variance = Literal["beta_tilde", "beta", "learned"]  # sigma_t^2 of the reverse step (DDPM Sec. 3.2)
CLIPS: tuple[str, ...] = get_args(Clip)
VARIANCES: tuple[str, ...] = get_args(Variance)


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples: which sampler, how many steps, how many images."""

    sampler: str = _f("ddpm", "the sampler (ddpm.samplers.SAMPLERS)")
    steps: int | None = _f(None, "sampling steps (default: the sampler's own)")
    # None: not given; the sampler's own default (ddpm.samplers.SAMPLERS), and eta / variance
    # given to a sampler that does not read them are refused, not silently ignored
    spacing: SpacingName | None = _f(None, "which of the T training steps the sampler visits (default: the sampler's own)")
    eta: float | None = _f(None, "ddim only: noise, 0 (deterministic, the default) to 1")
    variance: Variance | None = _f(None, "ddpm only: the reverse step's variance (default beta_tilde)")
    clip: Clip = _f("clip", "x0 clipping")
    n: int = _f(64, "images to draw")
    batch_size: int = _f(256, "images per batch")
    seed: int = _f(0, "seed of the noise")
    use_ema: bool = _f(True, "the EMA weights (else the raw weights)")
    precision: Precision = _f("fp32", "fp32 | bf16 (autocast) | fp16 (CUDA) | auto (on a CPU: bf16 "
                                 "only where a short timed trial finds it faster)")
    classes: str | None = _f(None, "conditional models: a class name or index, a comma list, or 'all' "
                                   "(one grid row per class; several classes share --n evenly, rounded up), "
                                   "or 'none' (the null class: no label); unset, each image's label is drawn "
                                   "in the training set's class proportions")
    guidance: float = _f(0.0, "classifier-free guidance w >= 0: eps = eps_c + w (eps_c - eps_u); 0 is the "
                              "plain conditional model; Ho & Salimans' w; diffusers' guidance_scale = w + 1")
    guidance_interval: tuple[float, ...] | None = _f(
        None, "LO,HI: guide only where the noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) "
              "is in [LO, HI] (Kynkaanniemi et al. 2024; EDM's sigma units, not t)")
    autoguidance: float = _f(0.0, "autoguidance w >= 0 (Karras et al. 2024): out = out + w (out - out_guide), the guide "
                                  "a weaker model of the same kind (RUN/guide, kept by training's guide_at); "
                                  "works unconditionally; 0: off")
    guiding_model: str | None = _f(None, "autoguidance's guiding model: a run or checkpoint folder (default RUN/guide)")
    autoguidance_interval: tuple[float, ...] | None = _f(
        None, "LO,HI: autoguide only where the noise level sigma_t is in [LO, HI] (as guidance_interval); "
              "the guide is not run elsewhere")


def check_sample_config(cfg: SampleConfig) -> None:
    """The checks that need no model: names and counts, one-line errors."""
    for name in ("spacing", "variance", "clip", "precision"):
        _check_value(name, typing.get_type_hints(SampleConfig)[name], getattr(cfg, name))
    if cfg.n < 1 or cfg.batch_size < 1:
        raise DdpmError(f"--n and --batch-size must be at least 1, got {cfg.n} and {cfg.batch_size}")
    check_seed(cfg.seed)


MAX_DEPTH = 1024  # transformer blocks: far above any DiT in use
MAX_SEED = 2**62  # seeds are offset (seed + 1 for training's batches) and must stay inside int64
MAX_WIDTH = 65_536  # channels of any layer: far above any U-Net in use; beyond, torch fails in C++


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed torch can take (an int64, with room for the offsets derived from it)."""
    if not 0 <= seed <= MAX_SEED:
        raise DdpmError(f"{flag} must be between 0 and 2**62, got {shorten(seed)}")


def check_model_sizes(m: AnyModelConfig) -> None:
    """Sizes its network can be built from, in one line each (torch would fail deep in C++ or allocate forever)."""
    m.check_sizes()
    if not (isinstance(m.class_emb_std, (int, float)) and 0 <= m.class_emb_std < float("inf")):
        raise DdpmError(f"--class-emb-std must be a finite number >= 0, got {shorten(m.class_emb_std)}")


def check_model_config(m: AnyModelConfig) -> None:
    """A network that a diffusion run can train and then sample: its sizes, and an output of the
    image's channels (the network predicts eps, x0 or v of the image; doubled by learn_sigma)."""
    check_model_sizes(m)
    out_dim = getattr(m, "out_dim", None)  # the U-Net's alone; the DiT's output is always the image's
    if out_dim is not None and out_dim != m.channels:
        raise DdpmError(f"model.out_dim must be {m.channels} (the image channels; learn_sigma doubles it itself), "
                        f"got {shorten(out_dim)}: a network with other outputs can never be sampled")


def check_patch_size(m: DiTConfig, size: int) -> None:
    """The DiT cuts the image into whole patches."""
    if size % m.patch_size:
        fits = [p for p in (1, 2, 4, 8) if size % p == 0]
        raise DdpmError(f"--patch-size {m.patch_size} does not divide the image size {size} "
                        f"(try --patch-size {max(fits)} or an --image-size that is a multiple of {m.patch_size})")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved as ``config.json`` in the run folder."""

    model: AnyModelConfig = field(default_factory=ModelConfig)
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
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: [[[[... nested too deep
            raise DdpmError(f"cannot read config {path}: {e}") from None
        return from_dict(cls, d)


def _fast() -> RunConfig:
    """Small, quick preset for CPUs: the demo's default. Each choice was measured against the
    others at the demo's 5-minute CPU budget (``bench/ablate.py``; the history page, "A
    faster-converging recipe"): one block per resolution (more steps in the budget, and a better
    FD) and Adam at 4e-3; v beats eps, min-SNR beats uniform weighting, batch 32 beats 64 and
    128 (more updates)."""
    return RunConfig(
        model=ModelConfig(dim=32, init_dim=32, dim_mults=(1, 2, 2), use_convnext=False,
                          resnet_scale_shift=True, linear_attn=False, attn_heads=2, blocks_per_level=1),
        diffusion=DiffusionConfig(timesteps=500, schedule="cosine", loss="l2", objective="v",
                                  loss_weighting="min_snr"),
        train=TrainConfig(batch_size=32, lr=4e-3, lr_schedule="cosine", warmup_steps=100,
                          epochs=None, minutes=5, ema_decay=0.999, sample_every=0,
                          checkpoint_every=500, precision="auto", guide_at=0.2),
        preset="fast",
    )


def _fast_cond() -> RunConfig:
    """The fast recipe, class-conditional on Fashion-MNIST's ten classes (classifier-free
    guidance: 10% of labels dropped to the null class). The class embedding starts at std 1
    (ADM's), not 0.02 (DiT's): side by side at 5 minutes it learned the labels far faster, with
    the better FD (``bench/ablate.py``)."""
    cfg = _fast()
    return replace(cfg, model=replace(cfg.model, num_classes=10, class_emb_std=1.0), preset="fast-cond")


def _fast_rgb() -> RunConfig:
    """The fast recipe for 32x32 colour images (give the data with --dataset: an RGB folder, an
    .npz or a Hugging Face dataset). The same three levels (1, 2, 2): at 32 pixels they end at
    8x8, as the fast recipe's end at 7x7 on 28, so each level sees what it sees there; a fourth
    level (4x4) would add depth the budget cannot train in minutes."""
    cfg = _fast()
    return replace(cfg, model=replace(cfg.model, channels=3),
                   data=replace(cfg.data, image_size=32, channels=3), preset="fast-rgb")


def _rf(cond: bool = False) -> RunConfig:
    """The fast recipe's network and training under rectified flow (flow matching as in Stable
    Diffusion 3, Esser et al. 2024): x_t = (1 - t) x0 + t eps, the velocity eps - x0 as the
    target, t logit-normal (m = 0, s = 1), SD3's unweighted l2 loss; sampled with heun."""
    cfg = _fast_cond() if cond else _fast()
    d = replace(cfg.diffusion, process="rectified-flow", objective="velocity", loss="l2", loss_weighting="uniform",
                t_sampling="logit-normal", timesteps=1000)
    return replace(cfg, diffusion=d, preset="rf-cond" if cond else "rf")


def _edm(cond: bool = False) -> RunConfig:
    """The fast recipe's network and training under EDM (Karras et al. 2022, Table 1): sigma
    from 0.002 to 80, the preconditioned output F as the target (c_in, c_skip, c_out, c_noise),
    ln sigma ~ N(-1.2, 1.2^2), EDM's weighting (1 on F), sigma_data 0.5; sampled with heun on the
    rho = 7 grid."""
    cfg = _fast_cond() if cond else _fast()
    d = replace(cfg.diffusion, process="edm", objective="edm", loss="l2", loss_weighting="uniform",
                t_sampling="lognormal", lognormal_mean=-1.2, lognormal_std=1.2, timesteps=1000)
    return replace(cfg, diffusion=d, preset="edm-cond" if cond else "edm")
def _dit() -> RunConfig:
    """The fast recipe (its diffusion and training settings) with a small DiT in place of the
    U-Net, of about its parameter count. Patch 4 (7x7 tokens at 28x28) rather than 2: on two CPU
    cores a training step of 49 tokens is several times quicker than one of 196, which a run of
    a few minutes needs more than the finer grid."""
    cfg = _fast()
    return replace(cfg, model=DiTConfig(patch_size=4, hidden=96, depth=4, heads=4), preset="dit")


def _dit_cond() -> RunConfig:
    """The DiT recipe, class-conditional on ten classes, as fast-cond is to fast (the class
    embedding at fast-cond's std 1)."""
    cfg = _dit()
    return replace(cfg, model=replace(cfg.model, num_classes=10, class_emb_std=1.0), preset="dit-cond")


def _diffusers_unet(cond: bool = False) -> RunConfig:
    """The fast recipe's diffusion and training with diffusers' UNet2DModel in place of ddpm's U-Net:
    three resolutions (28, 14, 7) of widths 16, 32, 64, attention at 14x14 and in the middle, one
    ResNet layer per down block; small enough to train on two CPU cores. Exports to diffusers
    (``ddpm export RUN --diffusers DIR``)."""
    cfg = _fast_cond() if cond else _fast()
    model = DiffusersUNetConfig(num_classes=10, class_emb_std=1.0) if cond else DiffusersUNetConfig()
    return replace(cfg, model=model, preset="diffusers-unet-cond" if cond else "diffusers-unet")


PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    # The seed's recipe exactly: T=200 linear, huber, eps, Adam 1e-3, batch 128, 6 epochs.
    "seed": lambda: RunConfig(preset="seed"),
    "fast": _fast,
    "fast-cond": _fast_cond,
    "fast-rgb": _fast_rgb,
    "rf": _rf,
    "rf-cond": lambda: _rf(cond=True),
    "edm": _edm,
    "edm-cond": lambda: _edm(cond=True),
    "dit": _dit,
    "dit-cond": _dit_cond,
    "diffusers-unet": _diffusers_unet,
    "diffusers-unet-cond": lambda: _diffusers_unet(cond=True),
}


def preset(name: str) -> RunConfig:
    """The named preset's full config."""
    if name not in PRESETS:
        raise DdpmError(f"unknown preset {shorten(name)}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


T = TypeVar("T")


def _check_value(path: str, tp: Any, value: Any) -> Any:
    """Coerce JSON value to the annotated type, or raise a one-line DdpmError."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise DdpmError(f"unknown {path} {shorten(value)}; choose one of: {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1 and all(dataclasses.is_dataclass(a) for a in inner):
            return _check_value(path, _tagged_member(path, inner, value), value)
        return _check_value(path, inner[0], value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DdpmError(f"{path} must be a list, got {shorten(value)}")
        (elem, _) = get_args(tp)
        return tuple(_check_value(path, elem, v) for v in value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DdpmError(f"{path} must be an object, got {shorten(value)}")
        return _from_dict(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise DdpmError(f"{path} must be true or false, got {shorten(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DdpmError(f"{path} must be an integer, got {shorten(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DdpmError(f"{path} must be a number, got {shorten(value)}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise DdpmError(f"{path} must be a string, got {shorten(value)}")
    return value


def _tagged_member(path: str, members: list[Any], value: Any) -> Any:
    """The member of a union of configs that ``value`` names by its ``arch``; without one, the
    first member (the U-Net: what every config saved before the choice existed describes)."""
    if not isinstance(value, dict):
        raise DdpmError(f"{path} must be an object, got {shorten(value)}")
    by_arch = {m.arch: m for m in members}
    arch = value.get("arch", next(iter(by_arch)))
    if not isinstance(arch, str) or arch not in by_arch:
        raise DdpmError(f"unknown {path}.arch {shorten(arch)}; choose one of: {', '.join(by_arch)}")
    return by_arch[arch]


def _from_dict(cls: type[T], d: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        key = sorted(unknown)[0]
        raise DdpmError(f"unknown config key {prefix}{key if len(key) <= 80 else shorten(key)}")
    kwargs = {k: _check_value(prefix + k, hints[k], v) for k, v in d.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build a (nested) config dataclass from a JSON-style dict, checking every value."""
    if not isinstance(d, dict):
        raise DdpmError(f"a config must be a JSON object, got {type(d).__name__}")
    return _from_dict(cls, d, "")


def override(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that checks the new values' types and choices first. On a model
    config, ``arch`` picks the network: another one starts from its own defaults, keeping the
    fields the two share (channels, classes ...), and a field it lacks is refused in one line."""
    if type(cfg) in get_args(AnyModelConfig):
        return _override_model(cfg, **changes)
    return _override_fields(cfg, **changes)


def _override_model(m: Any, **changes: Any) -> Any:
    configs = model_configs()
    arch = changes.pop("arch", m.arch)
    if arch not in configs:
        raise DdpmError(f"unknown arch {shorten(arch)}; choose one of: {', '.join(configs)}")
    cls = configs[arch]
    names = {f.name for f in fields(cls)}
    if cls is not type(m):
        m = cls(**{f.name: getattr(m, f.name) for f in fields(m) if f.name in names and f.name != "arch"})
    alien = sorted(k for k in changes if k not in names)
    if alien:
        flag = alien[0].replace("_", "-")
        raise DdpmError(f"--{flag} is not an option of the {arch} network (--arch {arch}); "
                        f"ddpm train --help lists each network's options")
    return _override_fields(m, **changes)


def _override_fields(cfg: T, **changes: Any) -> T:
    hints = typing.get_type_hints(type(cfg))
    checked = {k: _check_value(k.replace("_", "-"), hints[k], v) for k, v in changes.items()}
    return replace(cfg, **checked)
