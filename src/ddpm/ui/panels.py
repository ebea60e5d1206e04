"""What the Forward-process and Training panels show, computed with the library (no web code here)."""
from __future__ import annotations

import functools
import io
import math
import typing
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, ScheduleName
from ..core.diffusion import q_sample
from ..core.processes import make_process
from ..core.schedules import NoiseSchedule, make_betas, make_schedule
from ..data.readers import check_image_channels, decode_image, from_model_range, read_image_header, to_model_range
from ..data.sources import load_dataset
from ..errors import DdpmError
from ..pictures.viz import make_grid
from ..training.runlog import read_log
from .limits import MAX_UPLOAD_PIXELS
from .runs import NotFound, Run, inside

SCHEDULE_NAMES: tuple[str, ...] = typing.get_args(ScheduleName)
CURVE_POINTS = 400  # the page draws at most this many points per curve


def schedule_curves(cfg: RunConfig) -> dict[str, object]:
    """alpha_bar(t) and SNR(t) = alpha_bar / (1 - alpha_bar) (Kingma et al. 2021) of the run's
    schedule and of the other named schedules at the same T, thinned to CURVE_POINTS."""
    d = cfg.diffusion
    T = d.timesteps
    t = np.unique(np.linspace(0, T - 1, min(T, CURVE_POINTS)).round().astype(int))
    curves = {}
    if d.process != "vp":  # a continuous process at t = (i + 1) / T: its variance-preserving alpha_bar and SNR
        a, s = make_process(cfg).alpha_sigma(torch.as_tensor((t + 1) / T, dtype=torch.float64))
        ab = (a**2 / (a**2 + s**2)).numpy()
        curves[d.process] = {"alpha_bar": ab.tolist(), "snr": (ab / (1 - ab)).tolist()}
        return {"T": T, "t": t.tolist(), "schedule": d.process, "curves": curves}
    own = "explicit betas" if d.betas is not None else d.schedule
    names = SCHEDULE_NAMES if d.betas is None else (own, *SCHEDULE_NAMES)
    for name in names:  # the run's own betas (its beta_start, beta_end or explicit list), the others at defaults
        betas = make_schedule(d).betas if name == own else make_betas(name, T)
        ab = np.cumprod(1 - betas.numpy())[t]  # float64: SNR reaches 1e-9
        curves[name] = {"alpha_bar": ab.tolist(), "snr": (ab / (1 - ab)).tolist()}
    return {"T": T, "t": t.tolist(), "schedule": own, "curves": curves}


@functools.lru_cache(maxsize=4)
def _source(source: str, size: int, channels: int, data_dir: str | None) -> torch.Tensor:
    # The page never downloads: a run trained here has its data here.
    return load_dataset(source, size=size, channels=channels, data_dir=data_dir, download=False)


def data_image(cfg: RunConfig, index: int) -> torch.Tensor:
    """Image ``index`` (modulo the set's size) of the run's own data, uint8 (C, H, W) at its size
    and channels."""
    d = cfg.data
    x = _source(d.source, d.image_size, d.channels, d.data_dir)
    if len(x) == 0:
        raise DdpmError(f"the run's data {d.source} holds no images")
    return x[index % len(x)]


class Upload(typing.NamedTuple):
    """An image the user dropped on the page, decoded once at the size and channels of the run
    it was sent for (the bytes are not kept)."""

    image: torch.Tensor  # uint8 (C, size, size)
    size: int
    channels: int


def decode_upload(data: bytes, cfg: RunConfig) -> Upload:
    """The image bytes, read like a data folder's files, at most MAX_UPLOAD_PIXELS in the file."""
    size, channels = cfg.data.image_size, cfg.data.channels
    check_image_channels(read_image_header(io.BytesIO(data), "the uploaded image"), channels, "the uploaded image")
    image = decode_image(data, size, channels, name="the uploaded image", max_pixels=MAX_UPLOAD_PIXELS)
    return Upload(image, size, channels)


def upload_for(upload: Upload | None, cfg: RunConfig) -> torch.Tensor:
    """The uploaded image for a run of ``cfg``'s size and channels."""
    if upload is None:
        raise NotFound("no such uploaded image (the server restarted?)")
    if (upload.size, upload.channels) != (cfg.data.image_size, cfg.data.channels):
        raise DdpmError("the uploaded image was read for a run of another size or colour: drop it again")
    return upload.image


def forward_grid(cfg: RunConfig, x: torch.Tensor, t: int, seed: int = 0) -> np.ndarray:
    """x0 | x_t ~ q(x_t | x0) (DDPM Eq. 4) | the noise, side by side, with the run's schedule."""
    sched: NoiseSchedule = make_schedule(cfg)
    if not 0 <= t < sched.T:
        raise DdpmError(f"t must be in [0, {sched.T - 1}], got {t}")
    x0 = to_model_range(x)[None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    if cfg.diffusion.process == "vp":
        xt = q_sample(sched, x0, torch.tensor([t]), noise)
    else:  # t = (i + 1) / T of the continuous process, shown at unit scale: x_t / sqrt(alpha^2 + sigma^2)
        a, s = make_process(cfg).alpha_sigma(torch.tensor([(t + 1) / sched.T], dtype=torch.float64))
        xt = ((a * x0.double() + s * noise.double()) / (a**2 + s**2).sqrt()).float()
    shown = torch.cat([x0, xt, noise.clamp(-1, 1)])
    return make_grid(from_model_range(shown), nrow=3)


def training_records(run: Run, after: int = -1) -> list[dict[str, object]]:
    """The run's log.jsonl records with step > ``after`` (empty while it has none)."""
    try:
        log = inside(run, "log.jsonl")
    except NotFound:
        return []
    return [{k: _json_number(v) for k, v in r.items()} for r in read_log(log)
            if int(r["step"]) > after]  # type: ignore[arg-type]


def _json_number(v: object) -> object:
    """A NaN or infinite loss (a diverged step) as null: JSON has no such numbers."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def latest_sample(run: Run) -> tuple[int, Path] | None:
    """The newest sample grid the training loop wrote (samples/step-N.png), with its step."""
    folder = run.path / "samples"
    if not folder.is_dir():
        return None
    for p in sorted(folder.glob("step-*.png"), reverse=True):
        try:
            return int(p.stem.split("-")[1]), inside(run, f"samples/{p.name}")
        except (NotFound, ValueError, IndexError):
            continue
    return None
