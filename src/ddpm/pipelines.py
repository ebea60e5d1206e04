"""diffusers pipeline folders: read as a checkpoint, written from a run.

A folder with ``model_index.json``, ``unet/`` (a ``UNet2DModel``: ``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``) and ``scheduler/scheduler_config.json``
(a ``DDPMScheduler`` or ``DDIMScheduler``) is a checkpoint like a run's: the scheduler's betas
become the ``vp`` chain's explicit ``betas``, its ``prediction_type`` the objective, its
``variance_type`` the variances, and the UNet a ``diffusers-unet`` network. What has no
counterpart is refused in one line naming the file and the key. ``num_class_embeds = M``:
classes 0..M-2, and embedding M-1 is the null (unconditional) label.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, _load_weights
from .config import DataConfig, DiffusersUNetConfig, DiffusionConfig, RunConfig, TrainConfig, from_dict
from .errors import DdpmError
from .files import fsync_dir, reason, shorten
from .nn.diffusers_unet import PREFIX, import_diffusers, unet_kwargs

INDEX = "model_index.json"
UNET_CONFIG = "unet/config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin")
UNKNOWN_SOURCE = "unknown (a diffusers pipeline)"  # the data source of images other than 1x28x28 grey
PRESET = "diffusers-pipeline"

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # as diffusers computes them
OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # prediction_type -> objective
# variance_type -> whether the network learns its variances; fixed_large is ddpm's --variance beta
VARIANCE_TYPES = {"fixed_small": False, "fixed_small_log": False, "fixed_large": False, "fixed_large_log": False,
                  "learned_range": True}
# scheduler keys that choose how to sample, not what the model is: ddpm's own flags decide
# (--spacing, --clip); set_alpha_to_one: DDIM's last step, which ddpm always takes to the clean image
SAMPLING_KEYS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "sample_max_value",
                 "dynamic_thresholding_ratio")
NAME_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# UNet2DModel keys with no counterpart here, and the one value that maps
UNET_FIXED = {"time_embedding_type": "positional", "class_embed_type": None}


def is_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (it holds model_index.json)."""
    return (Path(path) / INDEX).is_file()


def _json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise DdpmError(f"cannot read {path}: {reason(e) if isinstance(e, OSError) else shorten(str(e))}") from None
    if not isinstance(d, dict):
        raise DdpmError(f"{path}: expected a JSON object")
    return d


def _unsupported(path: Path, key: str, value: Any, why: str = "") -> DdpmError:
    return DdpmError(f"{path}: {key} {shorten(value)} is not supported{why}")


def diffusion_config(folder: Path) -> DiffusionConfig:
    """The scheduler's config as the vp chain on its betas, its objective and variances' kind."""
    path = folder / SCHEDULER_CONFIG
    s = _json(path)
    name = s.get("_class_name")
    if name not in SCHEDULERS:
        raise _unsupported(path, "_class_name", name, f" (only {' and '.join(SCHEDULERS)} map to ddpm's vp chain)")
    known = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type",
             "prediction_type", "thresholding", "clip_sample_range", "rescale_betas_zero_snr",
             *SAMPLING_KEYS, *NAME_KEYS}
    for key in s:
        if key not in known:
            raise _unsupported(path, key, s[key])
    checks = {"prediction_type": (s.get("prediction_type", "epsilon"), tuple(OBJECTIVES)),
              "variance_type": (s.get("variance_type", "fixed_small"), tuple(VARIANCE_TYPES)),
              "beta_schedule": (s.get("beta_schedule", "linear"), BETA_SCHEDULES),
              "thresholding": (s.get("thresholding", False), (False,)),
              "rescale_betas_zero_snr": (s.get("rescale_betas_zero_snr", False), (False,))}
    if s.get("clip_sample", True):
        checks["clip_sample_range"] = (s.get("clip_sample_range", 1.0), (1, 1.0))  # ddpm's --clip: [-1, 1]
    for key, (value, allowed) in checks.items():
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise _unsupported(path, key, value, f" (ddpm maps {', '.join(map(str, allowed))})")
    betas = _betas(path, s)
    return DiffusionConfig(process="vp", timesteps=len(betas), betas=tuple(betas), loss="l2",
                           objective=OBJECTIVES[checks["prediction_type"][0]])


def _betas(path: Path, s: dict[str, Any]) -> list[float]:
    """The betas exactly as diffusers' scheduler computes them (float32, as it holds them)."""
    diffusers = import_diffusers(f"reading the diffusers pipeline {path.parent.parent}")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    try:
        sched = diffusers.DDPMScheduler(**{k: s[k] for k in keys if k in s})
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        raise DdpmError(f"{path}: {shorten(str(e))}") from None
    b = sched.betas.double()
    if not (len(b) >= 1 and bool(((b > 0) & (b < 1)).all())):
        raise DdpmError(f"{path}: the betas must lie in (0, 1), got {float(b.min()):g} to {float(b.max()):g}")
    return b.tolist()


def model_config(folder: Path, learned: bool) -> tuple[DiffusersUNetConfig, int]:
    """The UNet2DModel's config.json as a diffusers-unet config, and its image size."""
    path = folder / UNET_CONFIG
    u = _json(path)
    if u.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _unsupported(path, "_class_name", u.get("_class_name"), " (only UNet2DModel)")
    diffusers = import_diffusers(f"reading the diffusers pipeline {folder}")
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    full = {k: p.default for k, p in params.items() if k != "self"} | {k: v for k, v in u.items() if k not in NAME_KEYS}
    for key in u:
        if key not in params and key not in NAME_KEYS:
            raise _unsupported(path, key, u[key])
    for key, value in UNET_FIXED.items():
        if full[key] != value:
            raise _unsupported(path, key, full[key])
    size, c, out, m = full["sample_size"], full["in_channels"], full["out_channels"], full["num_class_embeds"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _unsupported(path, "sample_size", full["sample_size"], " (a square image size is needed)")
    if out != c * (2 if learned else 1):
        raise _unsupported(path, "out_channels", out, f" with in_channels {c} and the scheduler's variance_type "
                           f"({'learned_range: 2 x in_channels' if learned else 'fixed: in_channels'})")
    if m is not None and (not isinstance(m, int) or m < 2):
        raise _unsupported(path, "num_class_embeds", m, " (at least 2: the classes and the null label)")
    own = {k: full[k] for k in full if k not in ("sample_size", "in_channels", "out_channels", "num_class_embeds",
                                                   "num_train_timesteps", *UNET_FIXED)}
    own |= {"channels": c, "learn_sigma": learned, "num_classes": (m or 1) - 1,
            "mid_block_scale_factor": float(own["mid_block_scale_factor"]), "norm_eps": float(own["norm_eps"])}
    try:
        cfg = from_dict(DiffusersUNetConfig, own)
        cfg.check_sizes()
    except DdpmError as e:
        raise DdpmError(f"{path}: {e}") from None
    return cfg, size


def pipeline_config(folder: str | Path) -> RunConfig:
    """A pipeline folder's run config (nothing of the weights is read)."""
    folder = Path(folder)
    index = _json(folder / INDEX)
    for part in ("unet", "scheduler"):
        if part not in index:
            raise DdpmError(f"{folder / INDEX} names no {part} (a DDPMPipeline or DDIMPipeline folder is expected)")
    diffusion = diffusion_config(folder)
    variance = _json(folder / SCHEDULER_CONFIG).get("variance_type", "fixed_small")
    model, size = model_config(folder, VARIANCE_TYPES[variance])
    source = "fashion-mnist" if (model.channels, size) == (1, 28) else UNKNOWN_SOURCE
    k = model.num_classes
    data = DataConfig(source=source, image_size=size, channels=model.channels, flip=False,
                      class_names=tuple(str(i) for i in range(k)), class_counts=(1,) * k)
    return RunConfig(model=model, diffusion=diffusion, data=data, train=TrainConfig(channels_last=False),
                     preset=PRESET)


def load_pipeline(folder: str | Path) -> Checkpoint:
    """A pipeline folder as a checkpoint (its weights as the model's; no EMA, no training state, step 0)."""
    folder = Path(folder)
    cfg = pipeline_config(folder)
    f = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if f is None:
        raise DdpmError(f"{folder / 'unet'} holds no weights ({' or '.join(Path(w).name for w in WEIGHTS)})")
    if f.suffix == ".bin":
        try:
            weights = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise DdpmError(f"cannot read weights {f}: {shorten(str(e))}") from None
    else:
        weights = _load_weights(f)
    return Checkpoint(folder, cfg, {PREFIX + k: v for k, v in weights.items()}, None, None, 0)


# ---------------------------------------------------------------- out: a run as a pipeline

def check_exportable(cfg: RunConfig) -> None:
    """One line for a run diffusers has no pipeline for (before anything is loaded or written)."""
    from .nn import NETWORKS

    d, arch = cfg.diffusion, cfg.model.arch
    if arch != "diffusers-unet":
        title = NETWORKS[arch].title if arch in NETWORKS else arch
        raise DdpmError(f"export --diffusers: the {arch} network ({title}) is not a diffusers model; only "
                        "--arch diffusers-unet runs (presets diffusers-unet, diffusers-unet-cond) export")
    if d.process != "vp":
        raise DdpmError(f"export --diffusers: diffusers has no DDPMScheduler for the {d.process} process; "
                        "only vp runs export")
    if d.objective not in OBJECTIVES.values():
        raise DdpmError(f"export --diffusers: the {d.objective} objective has no diffusers prediction_type "
                        f"(eps, x0 or v map)")


def scheduler_config(cfg: RunConfig, betas: torch.Tensor) -> dict[str, Any]:
    """DDPMScheduler's arguments for the run: its betas as trained_betas, its prediction type and variances."""
    prediction = {v: k for k, v in OBJECTIVES.items()}[cfg.diffusion.objective]
    return {"num_train_timesteps": len(betas), "trained_betas": betas.tolist(), "prediction_type": prediction,
            "variance_type": "learned_range" if cfg.model.learn_sigma else "fixed_small", "clip_sample": True}


def check_pipeline_out(out: Path) -> None:
    """The folder export writes: new or empty, its parent a folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DdpmError(f"{out} already exists and is not an empty folder: give a new --diffusers folder")
    if not out.parent.is_dir():
        raise DdpmError(f"cannot write {out}: its folder {out.parent} does not exist")


def write_pipeline(out: str | Path, cfg: RunConfig, net: torch.nn.Module, betas: torch.Tensor,
                   check: Callable[[Path], None] | None = None) -> Path:
    """Write ``net`` (a DiffusersUNet) and the run's chain as a DDPMPipeline folder: into a hidden
    folder beside ``out``, ``check``-ed there (it raises to keep nothing), then one rename (never a
    half-written or unchecked pipeline)."""
    diffusers = import_diffusers("export --diffusers")
    out = Path(out)
    check_exportable(cfg)
    check_pipeline_out(out)
    unet = diffusers.UNet2DModel(**unet_kwargs(cfg.model, cfg.data.image_size))
    unet.load_state_dict({k: v.contiguous() for k, v in net.unet.state_dict().items()})
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler_config(cfg, betas)))
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(str(tmp))
        if check is not None:
            check(tmp)
        fsync_dir(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked): a folder cannot be renamed over a full one
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DdpmError(f"cannot write {out}: {reason(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out

