"""Which classes to draw, and the checks of a guided request (classifier-free guidance and
autoguidance).

The guidance itself lives in :class:`ddpm.core.diffusion.Denoiser` (``conditioned``); here are
the names: a class is asked for by name (case and punctuation ignored, "sneaker", "ankle-boot",
"t-shirt" all work) or by index, several by a comma list, every one by ``all``, the null class
(no label) by ``none``. A conditional model asked for no class draws each image's label from
that image's own generator, in the proportions of its training set: the same distribution
p(x) as the null class, from the stronger conditional model.
"""
from __future__ import annotations

import math
import re
import sys
from typing import NamedTuple, Sequence

import torch

from ..config import RunConfig, SampleConfig
from ..errors import DdpmError
from ..samplers.base import image_seed

NULL = "none"  # --class none: the null class, the model without a label
LABEL_STREAM = 1  # image_seed's stream of an image's drawn label (stream 0: its noise)


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


def is_null(spec: str | None) -> bool:
    """Whether ``spec`` asks for the null class (``none``)."""
    return spec is not None and spec.strip().lower() == NULL


def resolve_classes(spec: str | None, config: RunConfig) -> tuple[int, ...] | None:
    """'sneaker' / '7' / 'bag,sneaker' / 'all' -> class indices; None or 'none' -> None (no class
    asked for: see :func:`draws_labels`)."""
    if spec is None:
        return None
    k, names = config.model.num_classes, config.data.class_names
    if k == 0:
        raise DdpmError("--class needs a class-conditional model; this one is unconditional "
                        "(train one with --cond or --preset fast-cond)")
    if is_null(spec):
        return None
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


def draws_labels(cfg: SampleConfig, config: RunConfig) -> bool:
    """A conditional model asked for no class: each image's label is drawn (the default)."""
    return cfg.classes is None and config.model.num_classes > 0


def has_labels(cfg: SampleConfig, config: RunConfig) -> bool:
    """Whether the request's images carry labels (asked for, or drawn): what guidance needs."""
    return config.model.num_classes > 0 and not is_null(cfg.classes)


class Proportions(NamedTuple):
    """The class probabilities a default draw follows, and where they come from (for the user)."""

    probs: torch.Tensor  # float64 (K,)
    source: str


def class_proportions(config: RunConfig) -> Proportions:
    """The run's training-set proportions: stored with the run (``data.class_counts``), else
    counted from its data source when it can be read here, else uniform."""
    from ..data.sources import class_counts

    k, d = config.model.num_classes, config.data
    counts, source = d.class_counts, "the run's training set"
    if len(counts) != k or sum(counts) <= 0:
        try:
            counts, source = class_counts(d.source, d.data_dir), f"its data ({d.source}), counted now"
        except DdpmError:
            counts, source = (1,) * k, "uniform: the run does not record them and its data is not readable here"
        if len(counts) != k or sum(counts) <= 0:
            counts, source = (1,) * k, "uniform: its data's classes are not the run's"
    c = torch.tensor(counts, dtype=torch.float64)
    return Proportions(c / c.sum(), source)


def drawn_labels(seed: int, start: int, count: int, probs: torch.Tensor) -> torch.Tensor:
    """(count,) labels of images start .. start + count - 1: image i's from its own generator
    (:func:`image_seed` stream LABEL_STREAM), by inverting the CDF of ``probs`` at one uniform."""
    cdf = torch.cumsum(probs.to(torch.float64), 0)
    cdf = cdf / cdf[-1]
    u = torch.tensor([torch.rand((), generator=torch.Generator().manual_seed(image_seed(seed, i, LABEL_STREAM)),
                                 dtype=torch.float64).item() for i in range(start, start + count)],
                     dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp(max=len(probs) - 1)


def request_labels(cfg: SampleConfig, config: RunConfig, n: int, *,
                   say=lambda line: print(line, file=sys.stderr)) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """(the labels of a request's images, the classes asked for): class by class for named
    classes, drawn per image for a conditional model asked for none (``say`` gets one line when
    the proportions are not the run's own), None for the null class or an unconditional model."""
    classes = resolve_classes(cfg.classes, config)
    if classes is not None:
        return class_labels(classes, n), classes
    if not draws_labels(cfg, config):
        return None, None
    props = class_proportions(config)
    if props.source != "the run's training set":
        say(f"note: labels drawn in the class proportions of {props.source}")
    return drawn_labels(cfg.seed, 0, n, props.probs), None


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
    if w and not has_labels(cfg, config):
        raise DdpmError("--guidance needs labels to guide towards: a class-conditional model, and a --class "
                        "other than none" if config.model.num_classes else
                        "--guidance needs a class-conditional model (train one with --cond or --preset fast-cond)")
    iv = cfg.guidance_interval
    if iv is not None:
        if not has_labels(cfg, config):
            raise DdpmError("--guidance-interval needs a class-conditional model and --guidance")
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
