"""Which classes to draw, and the checks of a guided request (classifier-free guidance and
autoguidance).

The guidance itself lives in :class:`ddpm.core.diffusion.Denoiser` (``conditioned``); here are
the names: a class is asked for by name (case and punctuation ignored, "sneaker", "ankle-boot",
"t-shirt" all work) or by index, several by a comma list, every one by ``all``.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from ..config import RunConfig, SampleConfig
from ..errors import DdpmError


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _one_class(token: str, names: Sequence[str], k: int) -> int:
    if re.fullmatch(r"-?\d+", token):
        i = int(token)
        if not 0 <= i < k:
            raise DdpmError(f"class index {i} is out of range: this model has classes 0..{k - 1}")
        return i
    want = _key(token)
    for i, name in enumerate(names):
        # the whole name, or one part of a name like "T-shirt/top"
        if want and (want == _key(name) or want in (_key(p) for p in name.split("/"))):
            return i
    shown = ", ".join(names) if names else f"indices 0..{k - 1}"
    raise DdpmError(f"unknown class {token!r}; this model's classes: {shown}")


def resolve_classes(spec: str | None, config: RunConfig) -> tuple[int, ...] | None:
    """'sneaker' / '7' / 'bag,sneaker' / 'all' -> class indices; None -> None (unconditional)."""
    if spec is None:
        return None
    k, names = config.model.num_classes, config.data.class_names
    if k == 0:
        raise DdpmError("--class needs a class-conditional model; this one is unconditional "
                        "(train one with --cond or --preset fast-cond)")
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise DdpmError("--class is empty: give a class name or index, a comma list, or 'all'")
    if [t.lower() for t in tokens] == ["all"]:
        return tuple(range(k))
    return tuple(_one_class(t, names, k) for t in tokens)


def class_labels(classes: tuple[int, ...], n: int) -> torch.Tensor:
    """(N,) labels, class by class: ceil(n / len(classes)) images of each, in the order asked,
    so a grid with that many per row has one row per class."""
    per = math.ceil(n / len(classes))
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(per)


def check_guidance(cfg: SampleConfig, config: RunConfig) -> None:
    """One-line errors for guidance settings that cannot work with this model."""
    ag = cfg.autoguidance
    if not (isinstance(ag, (int, float)) and math.isfinite(ag) and ag >= 0):
        raise DdpmError(f"--autoguidance must be a finite number >= 0 (0: off), got {ag}")
    if cfg.guiding_model is not None and not ag:
        raise DdpmError("--guiding-model needs --autoguidance W (how strongly to guide away from it)")
    if cfg.autoguidance_interval is not None:
        if not ag:
            raise DdpmError("--autoguidance-interval needs --autoguidance W")
        _check_interval("--autoguidance-interval", cfg.autoguidance_interval)
    w = cfg.guidance
    if not (math.isfinite(w) and w >= 0):
        raise DdpmError(f"--guidance must be a finite number >= 0 (0: the plain conditional model), got {w}")
    if w and cfg.classes is None:
        raise DdpmError("--guidance needs --class (what to guide towards)")
    iv = cfg.guidance_interval
    if iv is not None:
        if cfg.classes is None:
            raise DdpmError("--guidance-interval needs --class and --guidance")
        _check_interval("--guidance-interval", iv)
    resolve_classes(cfg.classes, config)


def _check_interval(flag: str, iv: tuple[float, ...]) -> None:
    if len(iv) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in iv) \
            or iv[0] > iv[1]:
        raise DdpmError(f"{flag} must be LO,HI with 0 <= LO <= HI (noise levels sigma), got "
                        f"{','.join(map(str, iv))}")


def parse_guidances(text: str) -> tuple[float, ...]:
    """'0,1,2,4' -> (0.0, 1.0, 2.0, 4.0) for a guidance sweep; each must be finite and >= 0."""
    try:
        ws = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DdpmError(f"--guidance expects numbers separated by commas, got {text!r}") from None
    bad = [w for w in ws if not (math.isfinite(w) and w >= 0)]
    if not ws or bad:
        raise DdpmError(f"--guidance must be numbers >= 0 (0: the plain conditional model), got {text!r}")
    return ws
