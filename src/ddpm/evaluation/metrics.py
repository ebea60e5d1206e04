"""Sample-quality metrics on feature vectors: FD, KID, precision/recall, classifier statistics.

Each takes features (numpy arrays or torch tensors, shape (N, D)) from any embedding; see
:mod:`ddpm.evaluation.features` for ours and :mod:`ddpm.evaluation.evaluate` for the whole report.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..errors import DdpmError

PR_CHUNK = 1024  # rows of a distance block: 1024 x 10k float32 = 40 MB
FD_EPS = 1e-6  # pytorch-fid's diagonal offset for near-singular products


class GaussianStats(NamedTuple):
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64


class KidResult(NamedTuple):
    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


class ClassifierStats(NamedTuple):
    mean_confidence: float
    class_entropy_bits: float
    histogram: tuple[int, ...]


def _features(x, name: str = "features", dtype=torch.float64) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().to(dtype)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise DdpmError(f"{name} must be a non-empty (N, D) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise DdpmError(f"{name} contain NaN or infinite values")
    return t


def gaussian_stats(features) -> GaussianStats:
    """Mean and (unbiased) covariance of (N, D) features in float64, as for FID (Heusel et al. 2017)."""
    f = _features(features).numpy()
    if len(f) < 2:
        raise DdpmError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return GaussianStats(f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 sigma2) as pytorch-fid computes it (scipy sqrtm, offset if singular)."""
    try:
        from scipy import linalg
    except ImportError:  # scipy is optional: the eigenvalue route gives the same trace for PSD inputs
        return _trace_sqrt_product_eigh(sigma1, sigma2)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * FD_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DdpmError(f"Frechet distance: imaginary component {np.abs(covmean.imag).max():.3g} "
                            f"in sqrtm(sigma1 sigma2); are the covariances positive semi-definite?")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(s1 s2) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1))): a symmetric PSD eigenproblem."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), the FID formula of Heusel et al. 2017."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DdpmError(f"Frechet distance: mismatched statistics mu {mu1.shape} / {mu2.shape}, "
                        f"sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2)
    return float(fd)


def _poly_mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018, Eq. 3 of KID)."""
    m, d = x.shape
    z = torch.cat([x, y])
    # One (2m, 2m) kernel holds k_xx, k_xy and k_yy; one addmm and an in-place cube beat three of each.
    k = torch.addmm(torch.ones((), dtype=z.dtype), z, z.T, alpha=1 / d).pow_(3)
    blocks = k.view(2, m, 2, m).sum(dim=(1, 3), dtype=torch.float64)  # [[xx, xy], [yx, yy]]
    diag = k.diagonal().view(2, m).sum(dim=1, dtype=torch.float64)
    off = m * (m - 1)
    return ((blocks[0, 0] - diag[0]) / off + (blocks[1, 1] - diag[1]) / off - 2 * blocks[0, 1] / m ** 2).item()


def kid(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> KidResult:
    """Kernel Inception Distance: mean and std of unbiased MMD^2 over random subsets (Binkowski et al. 2018)."""
    # float32 kernels, float64 sums: faster than float64 throughout, and the error stays far below KID's std
    a, b = _features(feats_a, "feats_a", torch.float32), _features(feats_b, "feats_b", torch.float32)
    if a.shape[1] != b.shape[1]:
        raise DdpmError(f"KID: feature widths differ ({a.shape[1]} vs {b.shape[1]})")
    m = min(subset_size, len(a), len(b))
    if m < 2 or subsets < 1:
        raise DdpmError(f"KID needs at least 2 samples per set and 1 subset (got {m} and {subsets})")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # Each row: a uniformly random m-subset, without replacement (argsort of i.i.d. uniforms).
    pick_a = torch.rand(subsets, len(a), generator=gen).argsort(dim=1)[:, :m]
    pick_b = torch.rand(subsets, len(b), generator=gen).argsort(dim=1)[:, :m]
    mmds = [_poly_mmd2_unbiased(a[i], b[j]) for i, j in zip(pick_a, pick_b)]
    return KidResult(float(np.mean(mmds)), float(np.std(mmds)))


def _kth_nn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the manifold ball radii)."""
    # k + 1 smallest: each point is its own nearest neighbour, at distance 0.
    return torch.cat([torch.cdist(chunk, x).topk(k + 1, dim=1, largest=False).values[:, -1]
                      for chunk in x.split(PR_CHUNK)])


def precision_recall(real, fake, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall via k-NN manifolds (Kynkaanniemi et al. 2019, Eq. 1-2)."""
    r, f = _features(real, "real", torch.float32), _features(fake, "fake", torch.float32)
    if r.shape[1] != f.shape[1]:
        raise DdpmError(f"precision/recall: feature widths differ ({r.shape[1]} vs {f.shape[1]})")
    if k < 1 or k >= min(len(r), len(f)):
        raise DdpmError(f"precision/recall: k={k} needs more than k samples in each set "
                        f"(got {len(r)} real, {len(f)} fake)")
    r_real, r_fake = _kth_nn_radii(r, k), _kth_nn_radii(f, k)
    fake_in_real = torch.zeros(len(f), dtype=torch.bool)
    real_in_fake = torch.zeros(len(r), dtype=torch.bool)
    # One pass over fake-real distances serves both directions.
    for start in range(0, len(f), PR_CHUNK):
        d = torch.cdist(f[start:start + PR_CHUNK], r)  # (chunk, N_real)
        fake_in_real[start:start + PR_CHUNK] = (d <= r_real[None]).any(dim=1)
        real_in_fake |= (d <= r_fake[start:start + PR_CHUNK, None]).any(dim=0)
    return PrecisionRecall(fake_in_real.double().mean().item(), real_in_fake.double().mean().item())


def classifier_stats(logits) -> ClassifierStats:
    """Mean max-softmax confidence and predicted-class entropy (bits) (both halves of IS, Salimans et al. 2016)."""
    z = _features(logits, "logits")
    probs = z.softmax(dim=1)
    hist = torch.bincount(probs.argmax(dim=1), minlength=z.shape[1])
    p = hist[hist > 0].double() / len(z)
    entropy = -(p * p.log2()).sum().item()
    return ClassifierStats(probs.max(dim=1).values.mean().item(), entropy + 0.0, tuple(int(c) for c in hist))


def max_entropy_bits(num_classes: int) -> float:
    """log2(C): the class entropy of a perfectly balanced sample."""
    return math.log2(num_classes)
