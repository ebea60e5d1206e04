"""Tests for ddpm.metrics against closed forms and direct, independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm.evaluation import metrics
from ddpm.errors import DdpmError
from ddpm.evaluation.metrics import classifier_stats, frechet_distance, gaussian_stats, kid, precision_recall


def random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Frechet distance

def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_fd_full_covariance_matches_symmetric_formula():
    # tr sqrtm(S1 S2) = tr sqrtm(S1^1/2 S2 S1^1/2): an independent route through a symmetric matrix.
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), random_cov(rng, d), random_cov(rng, d)
    r1 = scipy.linalg.sqrtm(s1).real
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_numpy_fallback_agrees_with_scipy():
    rng = np.random.default_rng(2)
    s1, s2 = random_cov(rng, 20), random_cov(rng, 20)
    assert metrics._trace_sqrt_product_eigh(s1, s2) == pytest.approx(
        metrics._trace_sqrt_product(s1, s2), rel=1e-9)


def test_fd_of_identical_stats_is_zero_even_when_singular():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((5, 10))  # 5 points in 10-D: a rank-4 covariance
    mu, sigma = gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fd_1d_and_mismatch():
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)
    with pytest.raises(DdpmError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_gaussian_stats_float64_unbiased():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    xn = x.double().numpy()
    np.testing.assert_allclose(sigma, (xn - xn.mean(0)).T @ (xn - xn.mean(0)) / 49, rtol=1e-12)
    with pytest.raises(DdpmError, match="at least 2"):
        gaussian_stats(x[:1])
    with pytest.raises(DdpmError, match="NaN"):
        gaussian_stats(np.full((3, 2), np.nan))


# ---------------------------------------------------------------- KID

def mmd2_unbiased_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, written as the paper's double sums."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
    # One subset of the full size is a permutation of each set: the estimate is exact.
    result = kid(x, y, subsets=1, subset_size=12)
    assert result.mean == pytest.approx(mmd2_unbiased_direct(x, y), rel=1e-5, abs=1e-7)
    assert result.std == 0


def test_kid_same_distribution_is_near_zero_and_shift_is_not():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same = kid(a, b, subsets=10, subset_size=200, generator=torch.Generator().manual_seed(0))
    assert abs(same.mean) < 3 * same.std + 1e-4
    shifted = kid(a, b + 1.0, subsets=10, subset_size=200)
    assert shifted.mean > 10 * max(same.std, 1e-4)


def test_kid_caps_subset_size_and_is_reproducible():
    a, b = torch.randn(30, 4), torch.randn(20, 4)
    r1 = kid(a, b, subsets=5, generator=torch.Generator().manual_seed(1))
    r2 = kid(a, b, subsets=5, generator=torch.Generator().manual_seed(1))
    assert r1 == r2 and math.isfinite(r1.mean)
    with pytest.raises(DdpmError, match="widths differ"):
        kid(a, torch.randn(20, 5))


# ---------------------------------------------------------------- precision / recall

def grid(n: int, offset: float = 0.0) -> torch.Tensor:
    xs = torch.arange(n, dtype=torch.float32)
    return torch.cartesian_prod(xs, xs) + offset


def test_precision_recall_identical_sets():
    pts = grid(6)
    assert precision_recall(pts, pts, k=3) == (1.0, 1.0)


def test_precision_recall_far_fake_cluster():
    assert precision_recall(grid(6), grid(6, offset=100.0), k=3) == (0.0, 0.0)


def test_precision_recall_half_covered():
    # Real: the unit grid 6 x 6 (1-NN radius 1 each). Fake: every other point of it in both
    # directions (a 3 x 3 grid of spacing 2, 1-NN radius 2) and as many points 1000 away.
    # Half the fakes sit on real points (precision 1/2); every real point is within sqrt(2) < 2
    # of an on-grid fake (recall exactly 1). No distance lies on a ball's edge.
    real = grid(6)
    on = real.view(6, 6, 2)[::2, ::2].reshape(-1, 2)
    fake = torch.cat([on, on + 1000.0])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # Swapped roles: all 36 grid points fall inside the spacing-2 balls; of the 18, half are covered.
    assert precision_recall(fake, real, k=1) == (1.0, 0.5)


def test_precision_recall_chunking_matches(monkeypatch):
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(250, 4, generator=g) * 1.3
    whole = precision_recall(real, fake, k=3)
    monkeypatch.setattr(metrics, "PR_CHUNK", 7)
    assert precision_recall(real, fake, k=3) == whole


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(DdpmError, match="k=3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


# ---------------------------------------------------------------- classifier statistics

def test_classifier_stats():
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [10.0, 0, 0]])
    stats = classifier_stats(logits)
    assert stats.histogram == (2, 1, 1)
    assert stats.class_entropy_bits == pytest.approx(1.5)  # -(1/2 log 1/2 + 2 * 1/4 log 1/4)
    p = math.exp(10) / (math.exp(10) + 2)
    assert stats.mean_confidence == pytest.approx(p)


def test_classifier_stats_uniform_and_single_class():
    assert classifier_stats(torch.zeros(5, 4)).mean_confidence == pytest.approx(0.25)
    one = classifier_stats(torch.tensor([[0.0, 5.0]] * 3))
    assert one.class_entropy_bits == 0 and one.histogram == (0, 3)
    balanced = classifier_stats(torch.eye(10) * 5)
    assert balanced.class_entropy_bits == pytest.approx(metrics.max_entropy_bits(10))
