"""Whether inpainting works: FD-FMNIST of completed test images against the real set.

The first n test images get a region masked (the right half, or a centre square of half the
side), the model fills it in (RePaint, :func:`ddpm.sampling.editing.inpaint`), and the
completions are scored like samples. Two anchors come with each figure, from the same n images:
the originals themselves (a perfect completion's FD, the floor) and the masked images with the
hole left black (what no model at all gets).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import SampleConfig
from ..errors import DdpmError
from ..sampling.editing import MaskShape, RePaintConfig, inpaint, region_mask
from ..sampling.generate import LoadedModel
from .evaluate import EvalReport, evaluate_images, reference_stats, resolve_images, run_reference, run_test_images
from .features import FeatureNet, default_feature_net
from .metrics import frechet_distance, gaussian_stats


@dataclass(frozen=True)
class InpaintReport:
    """One inpainting evaluation: the completions' report and its two anchors."""

    mask: str  # right | center
    sampler: str
    steps: int
    jump_length: int
    resample: int
    nfe: int  # network evaluations per image, jumps included
    seconds: float  # the inpainting alone (not the evaluation)
    report: EvalReport  # FD-FMNIST, KID, ... of the completions
    fd_originals: float  # the same n images uncompleted: the floor
    fd_hole_black: float  # the masked images, hole left black: the ceiling

    def to_dict(self) -> dict:
        d = asdict(self)
        d["report"] = self.report.to_dict()
        return d

    def summary(self) -> str:
        return (f"{self.mask} mask, {self.sampler} {self.steps} steps, j={self.jump_length} r={self.resample}: "
                f"FD {self.report.fd:.2f} (originals {self.fd_originals:.2f}, hole black {self.fd_hole_black:.2f}); "
                f"{self.nfe} NFE per image, {self.seconds:.1f}s for {self.report.n_samples} images")


def inpainting_report(model: LoadedModel, cfg: SampleConfig, repaint_cfg: RePaintConfig, mask: MaskShape, *,
                      images: torch.Tensor | None = None, feature_net: FeatureNet | None = None,
                      reference: str | torch.Tensor | None = None, data_dir: str | Path | None = None,
                      seed: int = 0) -> InpaintReport:
    """Complete ``images`` (default: the first ``cfg.n`` images of the run's test split) with
    ``mask`` unknown and score the completions against ``reference`` (default: that test split)."""
    net = feature_net if feature_net is not None else default_feature_net()
    if reference is None:
        reference = run_reference(model.config, net, data_dir=data_dir, what=str(model.source)).reference
    originals = run_test_images(model.config, cfg.n, data_dir) if images is None else images
    keep = region_mask(mask, originals.shape[-1])
    t0 = time.perf_counter()
    s = inpaint(model, originals, keep, cfg, repaint_cfg)
    seconds = time.perf_counter() - t0
    report = evaluate_images(s.images, feature_net=net, reference=reference, floor=None, data_dir=data_dir, seed=seed)
    report = report.drawn_by(cfg.sampler, s, model.source)
    ref = reference_stats(net, resolve_images(reference, net, data_dir)[1])

    def fd(x: torch.Tensor) -> float:
        return frechet_distance(*gaussian_stats(net.embed_and_classify(x).features), ref.mu, ref.sigma)

    return InpaintReport(mask, cfg.sampler, s.steps, repaint_cfg.jump_length, repaint_cfg.resample, s.nfe, seconds,
                         report, fd(originals), fd(originals * keep))
