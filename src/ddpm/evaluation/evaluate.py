"""Sample-quality evaluation that works offline: FD, KID, precision/recall and class statistics.

Images are embedded by a small Fashion-MNIST classifier (:mod:`ddpm.evaluation.features`, shipped with
the package), so the numbers are "FD-FMNIST", not Inception FID: comparable between our runs,
not with published CIFAR/ImageNet FIDs. Each report carries ``fd_reference``, the FD of as many
real *training* images against the same reference: the floor a perfect model would reach.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ..files import atomic_write_bytes
from ..data.sources import DEFAULT_FLOOR, DEFAULT_REFERENCE, describe, load_dataset, reference_images, split_names
from ..errors import DdpmError
from .features import FeatureNet, default_feature_net, weights_digest
from .metrics import classifier_stats, frechet_distance, gaussian_stats, kid, precision_recall

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


@dataclass(frozen=True)
class EvalReport:
    """The numbers of one evaluation; sampler/steps/nfe/source are the caller's (dataclasses.replace)."""

    n_samples: int
    fd: float  # FD-FMNIST of the samples against the reference set
    fd_reference: float | None  # the same for n_samples real training images: the floor
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    mean_confidence: float
    class_entropy_bits: float  # log2(10) = 3.32 for a perfectly balanced sample
    class_histogram: tuple[int, ...]
    feature_net_accuracy: float | None
    reference: str
    n_reference: int
    seconds: float
    seed: int
    sampler: str | None = None
    steps: int | None = None
    nfe: int | None = None
    source: str | None = None
    arithmetic: str | None = None  # the sampler's --precision: fp32, bf16, ... ("precision" is the metric's)

    def drawn_by(self, sampler: str, samples, source: object) -> EvalReport:
        """This report with what drew its images: ``samples`` is a sampling result (its steps,
        network evaluations and arithmetic), ``source`` the model's run or checkpoint."""
        return replace(self, sampler=sampler, steps=samples.steps, nfe=samples.nfe, source=str(source),
                       arithmetic=samples.arithmetic)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_histogram"] = list(self.class_histogram)
        return d

    def summary(self) -> str:
        """One line for logs and the command's output."""
        floor = "" if self.fd_reference is None else f" (real-data floor {self.fd_reference:.2f})"
        return (f"n={self.n_samples} FD={self.fd:.2f}{floor} KID={self.kid_mean * 1e3:.2f}e-3"
                f"±{self.kid_std * 1e3:.2f}e-3 precision={self.precision:.3f} recall={self.recall:.3f}"
                f" confidence={self.mean_confidence:.3f} class-entropy={self.class_entropy_bits:.3f} bits")


class ReferenceStats(NamedTuple):
    features: torch.Tensor  # (N, D) float32
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64


# ---------------------------------------------------------------- reference statistics and their cache

def stats_cache_dir() -> Path:
    """Where reference features are cached: $XDG_CACHE_HOME/ddpm/eval-stats (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm" / "eval-stats"


def _images_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256(f"{images.dtype}:{tuple(images.shape)};".encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _stats_digest(stats: ReferenceStats) -> str:
    return hashlib.sha256(stats.mu.tobytes() + stats.sigma.tobytes()).hexdigest()


def _cache_path(kind: str, suffix: str, *parts: object) -> Path:
    key = hashlib.sha256(":".join(map(str, (CACHE_VERSION, *parts))).encode()).hexdigest()[:24]
    return stats_cache_dir() / f"{kind}-{key}{suffix}"


def _read_cached(path: Path) -> ReferenceStats | None:
    try:
        t = load_safetensors_bytes(path.read_bytes())
        return ReferenceStats(t["features"], t["mu"].numpy(), t["sigma"].numpy())
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError, KeyError) as e:  # a damaged cache is rebuilt, never fatal
        log.warning("ignoring unreadable statistics cache %s: %s", path, e)
        return None


def _write_cached(path: Path, blob: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
    except OSError as e:  # a read-only home must not stop an evaluation
        log.warning("could not cache evaluation statistics in %s: %s", path, e)


def reference_stats(net: FeatureNet, images: torch.Tensor, *, cache: bool = True) -> ReferenceStats:
    """Features, mean and covariance of the reference images, cached by (weights, data) digest."""
    net.check_images(images)
    path = _cache_path("ref", ".safetensors", weights_digest(net), _images_digest(images)) if cache else None
    if path is not None and (hit := _read_cached(path)) is not None:
        return hit
    feats = net.embed_and_classify(images).features
    stats = ReferenceStats(feats, *gaussian_stats(feats))
    if path is not None:
        tensors = {"features": feats.contiguous(), "mu": torch.from_numpy(stats.mu),
                   "sigma": torch.from_numpy(stats.sigma)}
        _write_cached(path, save_safetensors_bytes(tensors))
    return stats


class Reference(NamedTuple):
    """Images to compare with, under the name a report gives them (a run's own test split)."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)


def resolve_images(spec: str | torch.Tensor | Reference, net: FeatureNet, data_dir: str | Path | None = None
                   ) -> tuple[str, torch.Tensor]:
    """A named split of a data source (``fashion-mnist-test``), an image folder, a uint8 tensor
    or a :class:`Reference` -> (name, images) at the feature net's size."""
    if isinstance(spec, torch.Tensor):
        return "tensor", spec
    if isinstance(spec, Reference):
        return spec
    return spec, reference_images(spec, size=net.config.size, channels=net.config.channels, data_dir=data_dir)


def default_floor(reference: str | torch.Tensor) -> str | None:
    """The real-data floor for a named test split: the same source's training split; else none."""
    named = split_names()
    if isinstance(reference, str) and reference in named and named[reference][1] == "test":
        return f"{named[reference][0]}-train"
    return None


def fits_features(net: FeatureNet, source: str, data_dir: str | Path | None = None) -> bool:
    """Whether ``net`` measures images of ``source``: Fashion-MNIST features fit only a source whose
    evaluation is FD-FMNIST; a net fitted elsewhere (``--features``) is the caller's choice."""
    return not _is_fmnist(net) or describe(source, data_dir).evaluation == "fd-fmnist"


def _is_fmnist(net: FeatureNet) -> bool:
    return net.meta is None or net.meta.dataset == "fashion-mnist"


def no_features_message(cfg, what: str) -> str:
    """One line: why ``what`` (a run) cannot be measured by the shipped features, and what can."""
    d = cfg.data
    return (f"{what} draws {d.channels}x{d.image_size}x{d.image_size} images of {d.source}: the shipped FD-FMNIST "
            f"features measure only Fashion-MNIST's 1x28x28 grey clothes (an FD of these with them would be a wrong "
            f"number): give --features NET fitted to this data (tools/fit_features.py), or --inception-weights PATH "
            f"for Inception FID alone")


class RunReference(NamedTuple):
    reference: str | Reference
    floor: str | Reference | None


def run_reference(cfg, net: FeatureNet, reference: str | None = None, data_dir: str | Path | None = None,
                  what: str = "the run") -> RunReference:
    """What a run's samples are compared with: ``reference`` when given (its source's training
    split the floor), else the run's own test split (its training split the floor). Refused in
    one line, before anything is sampled, when the features cannot measure the run's images."""
    d = cfg.data
    data_dir = data_dir if data_dir is not None else d.data_dir
    c, s = net.config.channels, net.config.size
    if (d.channels, d.image_size) != (c, s) or (reference is None and not fits_features(net, d.source, data_dir)):
        if _is_fmnist(net):
            raise DdpmError(no_features_message(cfg, what))
        raise DdpmError(f"the feature net takes {c}x{s}x{s} images; {what} draws "
                        f"{d.channels}x{d.image_size}x{d.image_size}")
    if reference is not None:
        return RunReference(reference, default_floor(reference))
    name = d.source.lower()
    if name in {n for n, _ in split_names().values()} and not d.test_source:
        return RunReference(f"{name}-test", f"{name}-train")
    test = load_dataset(d.source, size=s, channels=c, data_dir=data_dir, split="test", test_source=d.test_source)
    train = load_dataset(d.source, size=s, channels=c, data_dir=data_dir)
    return RunReference(Reference(f"{d.test_source or d.source} (test)", test), Reference(f"{d.source} (train)", train))


def run_test_images(cfg, n: int, data_dir: str | Path | None = None) -> torch.Tensor:
    """The first n images of a run's test split (its source's, or its data.test_source) at the
    run's size and channels."""
    if n < 1:
        raise DdpmError(f"--n must be at least 1, got {n}")
    d = cfg.data
    return load_dataset(d.source, size=d.image_size, channels=d.channels,
                        data_dir=data_dir if data_dir is not None else d.data_dir, split="test",
                        test_source=d.test_source)[:n]


def real_images(n: int, net: FeatureNet, *, reference: str = DEFAULT_REFERENCE, seed: int = 0,
                data_dir: str | Path | None = None) -> tuple[str, torch.Tensor]:
    """(pool, n real images) drawn (seeded by seed + 1, without replacement) from the training split
    of the reference's source (the default reference's for a folder): what ``ddpm eval --real``
    scores, the floor any model is measured against."""
    if n < 1:  # a negative n would slice all but the last images
        raise DdpmError(f"--n must be at least 1, got {n}")
    pool = default_floor(reference) or default_floor(DEFAULT_REFERENCE)
    images = resolve_images(pool, net, data_dir)[1]
    return pool, images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 1))[:n]]


def report_name(sampler: str | None = None, steps: int | None = None, arithmetic: str = "fp32",
                autoguidance: float = 0.0, autoguidance_interval: tuple[float, ...] | None = None,
                labels: str | None = None) -> str:
    """The report's file name: ``eval-SAMPLER-STEPS[-ARITH][-agW[-sigmaLO-HI]][-null|-cfgW].json``
    for sampled images (``labels``: "null" for a conditional model's null class, "drawn-cfgW" for
    its default draw guided at W), else ``eval.json``."""
    if steps is None:
        return "eval.json"
    tag = "-null" if labels == "null" else f"-{labels.split('-', 1)[1]}" if labels and "-" in labels else ""
    ag = f"-ag{autoguidance:g}" if autoguidance else ""
    if autoguidance and autoguidance_interval is not None:
        ag += "-sigma{:g}-{:g}".format(*autoguidance_interval)
    return f"eval-{sampler or 'samples'}-{steps}{'' if arithmetic == 'fp32' else '-' + arithmetic}{ag}{tag}.json"


# ---------------------------------------------------------------- the report

def floor_fd(net: FeatureNet, pool: torch.Tensor, n: int, ref: ReferenceStats, *, seed: int = 0,
             cache: bool = True) -> float:
    """FD of n real images drawn (seeded, without replacement) from `pool` against the reference."""
    net.check_images(pool)
    if n > len(pool):
        log.warning("the real-data floor uses all %d pool images, fewer than the %d samples", len(pool), n)
    path = None
    if cache:  # the floor depends on everything below; recomputing it costs as much as the samples' features
        path = _cache_path("floor", ".txt", weights_digest(net), _images_digest(pool), _stats_digest(ref), n, seed)
    if path is not None:
        try:
            return float(path.read_text())
        except (OSError, ValueError):  # absent or damaged: compute (again)
            pass
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    fd = frechet_distance(*gaussian_stats(net.embed_and_classify(pool[idx]).features), ref.mu, ref.sigma)
    if path is not None:
        _write_cached(path, f"{fd!r}\n".encode())
    return fd


def evaluate_images(images: torch.Tensor, *, feature_net: FeatureNet | None = None,
                    reference: str | torch.Tensor = DEFAULT_REFERENCE,
                    floor: str | torch.Tensor | None = DEFAULT_FLOOR,
                    data_dir: str | Path | None = None, seed: int = 0, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, pr_k: int = 3, cache: bool = True) -> EvalReport:
    """FD, KID, precision/recall and class statistics of uint8 images against a reference set
    (images with no run to name their data: Fashion-MNIST's, unless told; a run's own test split
    is :func:`run_reference`'s)."""
    t0 = time.perf_counter()
    net = feature_net if feature_net is not None else default_feature_net()
    net.check_images(images)
    if len(images) <= pr_k:
        raise DdpmError(f"need more than {pr_k} images to evaluate, got {len(images)}")
    ref_name, ref_images = resolve_images(reference, net, data_dir)
    ref = reference_stats(net, ref_images, cache=cache)
    fake = net.embed_and_classify(images)
    # Each random choice below has its own generator: skipping the floor changes no other number.
    pool = None if floor is None else resolve_images(floor, net, data_dir)[1]
    fd_floor = None if pool is None else floor_fd(net, pool, len(images), ref, seed=seed, cache=cache)
    # P/R radii depend on set size (denser sets, smaller balls): compare equal numbers of points.
    pick = torch.randperm(len(ref.features), generator=torch.Generator().manual_seed(seed))[:len(images)]
    pr = precision_recall(ref.features[pick], fake.features, k=pr_k)
    kid_result = kid(fake.features, ref.features, subsets=kid_subsets, subset_size=kid_subset_size,
                     generator=torch.Generator().manual_seed(seed))
    cls = classifier_stats(fake.logits)
    return EvalReport(
        n_samples=len(images), fd=frechet_distance(*gaussian_stats(fake.features), ref.mu, ref.sigma),
        fd_reference=fd_floor, kid_mean=kid_result.mean, kid_std=kid_result.std,
        precision=pr.precision, recall=pr.recall, mean_confidence=cls.mean_confidence,
        class_entropy_bits=cls.class_entropy_bits, class_histogram=cls.histogram,
        feature_net_accuracy=net.meta.test_accuracy if net.meta else None, reference=ref_name,
        n_reference=len(ref.features), seconds=round(time.perf_counter() - t0, 3), seed=seed)


# ---------------------------------------------------------------- Inception FID (optional)

def _inception_help(reason: str) -> str:
    return (f"Inception FID needs the Inception weights on disk: pass --inception-weights PATH "
            f"({reason}; download {INCEPTION_WEIGHTS_URL} on a machine with internet, and "
            f"`pip install torchmetrics[image]`, which brings torch-fidelity)")


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DdpmError(f"Inception FID expects uint8 (N, 1 or 3, H, W) images, got "
                        f"{images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def check_inception_weights(weights_path: str | Path | None) -> None:
    """The Inception weights are on disk: checked before minutes of sampling, not after."""
    if weights_path is None or not Path(weights_path).is_file():
        raise DdpmError(_inception_help("none given" if weights_path is None else f"{weights_path} not found"))


def inception_fid(images: torch.Tensor, ref_images: torch.Tensor, weights_path: str | Path | None,
                  *, batch_size: int = 100) -> float:
    """Classic FID on Inception-v3 pool3 features (Heusel et al. 2017) via torchmetrics, offline."""
    check_inception_weights(weights_path)
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise DdpmError(_inception_help("torchmetrics with torch-fidelity is not installed")) from None
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path))
    for batch, real in [(b, True) for b in _as_rgb(ref_images).split(batch_size)] + \
                       [(b, False) for b in _as_rgb(images).split(batch_size)]:
        metric.update(batch, real=real)
    return float(metric.compute())
