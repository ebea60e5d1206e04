"""The forward process figure: one image noised at several t (the seed's illustration)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data.readers import GREY_MODES, from_model_range, load_image, read_image_header, to_model_range
from ..data.sources import first_image
from ..core.diffusion import q_sample
from ..errors import DdpmError
from ..core.schedules import NoiseSchedule
from ..config import check_seed
from ..files import check_writable_file, shorten
from .viz import noise_strip, save_png

MAX_TIMESTEPS = 1_000_000  # as training's limit; beyond, the schedule's tables alone fill memory
MAX_SIZE = 1024  # pixels per side of each tile
MAX_TILES = 64


def noise_figure(image: str | Path | None = None, *, out: str | Path = "noise.png", ts: Sequence[int] = (0, 50, 100, 150, 199),
                 schedule: str = "linear", timesteps: int = 200, size: int = 28, data_dir: str | None = None,
                 seed: int = 0, source: str = "fashion-mnist") -> Path:
    """q_sample of one image (default: the first of the data source ``source``) at each t in
    ``ts``, side by side, written to ``out``."""
    if not 1 <= timesteps <= MAX_TIMESTEPS:
        raise DdpmError(f"--timesteps must be between 1 and {MAX_TIMESTEPS:,}, got {shorten(timesteps)}")
    if not 1 <= size <= MAX_SIZE:
        raise DdpmError(f"--size must be between 1 and {MAX_SIZE}, got {shorten(size)}")
    check_seed(seed)
    bad = [t for t in ts if not 0 <= t < timesteps]
    if bad or not 1 <= len(ts) <= MAX_TILES:
        raise DdpmError(f"give 1 to {MAX_TILES} --t values, each in [0, {timesteps - 1}] for T={timesteps}; "
                        f"got {shorten(list(ts))}")
    check_writable_file(out, "figure")  # before any data is read
    sched = NoiseSchedule.create(schedule, timesteps)
    if image is None:
        x = first_image(source, size=size, data_dir=data_dir)
    else:
        x = load_image(image, size, 3 if _is_colour(image) else 1)
    x0 = to_model_range(x)[None].expand(len(ts), -1, -1, -1)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    noise = noise[:1].expand_as(x0)  # the same noise at every t, so only the level changes
    xt = q_sample(sched, x0, torch.as_tensor(list(ts)), noise)
    return save_png(noise_strip(from_model_range(xt), list(ts)), out)


def _is_colour(path: str | Path) -> bool:
    return read_image_header(path).mode not in GREY_MODES
