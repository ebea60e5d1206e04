"""Whether control works: class agreement and a classifier-free guidance sweep.

Class agreement is the shipped Fashion-MNIST classifier's top-1 accuracy on the class that
was asked for (per class and the mean over classes). A sweep draws the same request at each
guidance w (the same seeds, so only w changes) and reports, for each, the usual FD-FMNIST,
KID and precision/recall against the real set, the agreement, and the sampling speed.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import SampleConfig
from ..errors import DdpmError
from ..pictures.plots import COLOURS, Panel, Series, render
from ..pictures.viz import save_png
from .evaluate import EvalReport, evaluate_images, run_reference
from .features import FeatureNet, default_feature_net


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def classifier_classes(model_names: Sequence[str], net: FeatureNet) -> tuple[int, ...] | None:
    """For each of the model's classes, the classifier's class of the same name (None when some
    model class has no match: agreement is then undefined, e.g. a model of an image folder)."""
    theirs = {_key(n): i for i, n in enumerate(net.meta.class_names if net.meta else ())}
    mapped = tuple(theirs.get(_key(n), -1) for n in model_names)
    return None if not mapped or -1 in mapped else mapped


def class_agreement(logits: torch.Tensor, labels: torch.Tensor, target: Sequence[int]) -> dict[int, float]:
    """Per asked class c: the fraction of its images the classifier calls ``target[c]``."""
    pred = logits.argmax(1)
    want = torch.as_tensor(target)[labels]
    return {int(c): float((pred[labels == c] == want[labels == c]).float().mean()) for c in labels.unique()}


@dataclass(frozen=True)
class GuidanceResult:
    """One guidance w of a sweep."""

    guidance: float
    report: EvalReport  # FD-FMNIST, KID, precision/recall, ...
    agreement: float | None  # mean over the classes asked for
    agreement_per_class: dict[str, float] | None
    images_per_sec: float  # sampling only (not the evaluation)


@dataclass(frozen=True)
class SweepReport:
    """A guidance sweep over one request (same classes, seeds, sampler)."""

    source: str
    sampler: str
    steps: int
    nfe: int  # network evaluations per image per pass; a guided pass runs 2 images per image
    classes: tuple[str, ...]
    per_class: int
    guidance_interval: tuple[float, ...] | None
    results: tuple[GuidanceResult, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        for r, src in zip(d["results"], self.results):
            r["report"] = src.report.to_dict()
        return d

    def best(self) -> GuidanceResult:
        """The guidance with the lowest FD."""
        return min(self.results, key=lambda r: r.report.fd)


def guidance_sweep(model, cfg: SampleConfig, guidances: Sequence[float], *, feature_net: FeatureNet | None = None,
                   reference: str | torch.Tensor | None = None, floor: str | None = None,
                   data_dir: str | Path | None = None, seed: int = 0) -> SweepReport:
    """Draw ``cfg`` (its classes, e.g. 'all') at each guidance w and evaluate each set against
    ``reference`` (default: the run's own test split, its training split the floor)."""
    from ..sampling.generate import check_sample_config, generate
    from ..sampling.guidance import is_null

    if cfg.classes is None or is_null(cfg.classes):
        raise DdpmError("a guidance sweep needs named classes (e.g. --class all)")
    net = feature_net if feature_net is not None else default_feature_net()
    if reference is None:
        reference, floor = run_reference(model.config, net, data_dir=data_dir, what=str(model.source))
    for w in guidances:  # every bad value refused before the first image is drawn
        check_sample_config(model, replace(cfg, guidance=w))
    names = model.config.data.class_names or tuple(map(str, range(model.config.model.num_classes)))
    target = classifier_classes(names, net)
    results, s = [], None
    for w in guidances:
        t0 = time.perf_counter()
        s = generate(model, replace(cfg, guidance=w))
        ips = len(s.images) / (time.perf_counter() - t0)
        report = evaluate_images(s.images, feature_net=net, reference=reference, floor=floor,
                                 data_dir=data_dir, seed=seed)
        report = report.drawn_by(cfg.sampler, s, model.source)
        per = None
        if target is not None:
            agree = class_agreement(net.embed_and_classify(s.images).logits, s.labels, target)
            per = {names[c]: a for c, a in agree.items()}
        mean = None if per is None else float(np.mean(list(per.values())))
        results.append(GuidanceResult(w, report, mean, per, ips))
    asked = tuple(names[c] for c in s.labels.unique_consecutive().tolist())
    return SweepReport(str(model.source), cfg.sampler, s.steps, s.nfe, asked, s.per_class,
                       cfg.guidance_interval, tuple(results))


def sweep_figure(rep: SweepReport, title: str | None = None):
    """FD-FMNIST and class agreement against guidance w, side by side."""
    w = np.array([r.guidance for r in rep.results])
    fd = np.array([r.report.fd for r in rep.results])
    panels = [Panel("Sample quality", "guidance w", "FD-FMNIST (lower is better)",
                    [Series(w, fd, "FD-FMNIST", COLOURS[0], 2.5)],
                    hline=rep.results[0].report.fd_reference,
                    note="dashed: real training images (the floor)")]
    if all(r.agreement is not None for r in rep.results):
        agree = np.array([100 * r.agreement for r in rep.results])
        panels.append(Panel("Control", "guidance w", "class agreement, % (higher is better)",
                            [Series(w, agree, "mean over classes", COLOURS[1], 2.5)],
                            note="the shipped classifier's top-1 on the class asked for"))
    return render(panels, columns=len(panels), size=(700 * len(panels), 520),
                  title=title or f"Classifier-free guidance: {rep.sampler}, {rep.steps} steps, "
                                 f"{rep.per_class} images per class")


def plot_sweep(rep: SweepReport, path: str | Path, title: str | None = None) -> Path:
    return save_png(sweep_figure(rep, title), path)
