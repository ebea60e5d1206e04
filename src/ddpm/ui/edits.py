"""The Edit panel's work: RePaint inpainting and SDEdit through ddpm.sampling.editing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..config import RunConfig, SampleConfig
from ..data.readers import to_model_range
from ..errors import DdpmError
from ..pictures.viz import make_grid
from ..sampling.generate import LoadedModel, Samples
from .jobs import Shown, Work
from .limits import repaint_descents


@dataclass(frozen=True)
class EditRequest:
    """What the page asked for besides the sampling fields."""

    mode: str  # "inpaint" (RePaint) or "edit" (SDEdit)
    source: dict[str, Any]  # {"index": k} (the run's data) or {"upload": id}
    keep: list[int] | None  # inpaint: H*W flags, row by row, 1 = keep the input's pixel
    strength: float
    jump_length: int
    resample: int


def parse_edit(body: dict[str, Any]) -> EditRequest:
    """Take the edit fields out of ``body`` (the rest are SampleConfig's); one-line errors."""
    mode = body.pop("mode", "inpaint")
    if mode not in ("inpaint", "edit"):
        raise DdpmError(f"unknown edit mode {mode!r}; choose inpaint or edit")
    source = body.pop("image", {"index": 0})
    if not (isinstance(source, dict) and len(source) == 1 and
            (isinstance(source.get("index"), int) or isinstance(source.get("upload"), str))):
        raise DdpmError('image must be {"index": K} or {"upload": ID}')
    keep = body.pop("keep", None)
    nums = {k: body.pop(k, d) for k, d in (("strength", 0.5), ("jump_length", 10), ("resample", 10))}
    if not isinstance(nums["strength"], (int, float)) or isinstance(nums["strength"], bool):
        raise DdpmError(f"strength must be a number, got {nums['strength']!r}")
    for k in ("jump_length", "resample"):
        if not isinstance(nums[k], int) or isinstance(nums[k], bool):
            raise DdpmError(f"{k} must be a whole number, got {nums[k]!r}")
    return EditRequest(mode, source, keep, float(nums["strength"]), nums["jump_length"], nums["resample"])


def descents(req: EditRequest, steps: int) -> int | None:
    """The sampler steps an inpainting runs over ``steps`` grid levels (None: the grid's own,
    or a resample editing.check_repaint refuses)."""
    if req.mode != "inpaint" or req.jump_length < 1 or req.resample < 1:
        return None
    return repaint_descents(steps, req.jump_length, req.resample)


def keep_mask(keep: Any, size: int) -> torch.Tensor:
    """The page's painted flags -> bool (size, size), True = keep."""
    if not isinstance(keep, list) or len(keep) != size * size or any(v not in (0, 1) for v in keep):
        raise DdpmError(f"the mask must be {size}x{size} flags of 0 (fill in) or 1 (keep)")
    m = torch.tensor(keep, dtype=torch.bool).reshape(size, size)
    if m.all():
        raise DdpmError("the mask keeps every pixel: paint the part to fill in")
    return m


def edit_work(model: LoadedModel, cfg: SampleConfig, req: EditRequest, image: torch.Tensor
              ) -> tuple[Work, Shown | None, Callable[[Samples], np.ndarray]]:
    """(the work, what the page sees of x_t, the result grid) of an inpainting or an edit,
    validated now so that a bad request is a 400 before any thread starts."""
    from ..sampling import editing

    rc: RunConfig = model.config
    if req.mode == "edit":
        editing.check_strength(req.strength)
        work: Work = lambda hook: editing.edit(model, image, req.strength, cfg, on_step=hook)
        return work, None, lambda s: _comparison(editing, image, s.images, None)
    keep = keep_mask(req.keep, rc.data.image_size)
    rp = editing.RePaintConfig(req.jump_length, req.resample)
    editing.check_repaint(rp)
    dev = model.schedule.alpha_bar.device
    known, m = to_model_range(image).to(dev), keep.to(dev)

    def shown(x: torch.Tensor) -> torch.Tensor:  # the known pixels as they will end: the input's
        return torch.where(m, known, x)

    work = lambda hook: editing.inpaint(model, image, keep, cfg, rp, on_step=hook)
    return work, shown, lambda s: _comparison(editing, image, s.images, keep)


def _comparison(editing: Any, image: torch.Tensor, results: torch.Tensor, keep: torch.Tensor | None) -> np.ndarray:
    tiles, per_row = editing.comparison_grid(image, results[:32], keep)
    return make_grid(tiles, nrow=per_row)


def editing_available() -> bool:
    """Whether this ddpm has the editing functions (RePaint, SDEdit) the panel calls."""
    try:
        from ..sampling import editing  # noqa: F401
    except ImportError:
        return False
    return True
