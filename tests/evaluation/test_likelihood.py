"""Tests for ddpm.likelihood: the variational bound (DDPM Eq. 5) against closed forms.

For data x0 ~ N(MU, SD^2) per dimension the optimal denoiser is known (DESIGN.md's oracle),
and with it every KL term has a closed-form expectation: with the reverse variance beta-tilde,
    E[L_t] = coef1_t^2 Var[x0 | x_t] / (2 beta-tilde_t) nats per dimension,
    Var[x0 | x_t] = SD^2 (1 - a) / (a SD^2 + 1 - a),  a = alpha_bar_t,
(and with variance beta, KL(N(0, bt) || N(0, b)) + coef1^2 Var / (2 b)). The data are continuous,
so the decoder term L_0 (a discretised Gaussian, meaningful for 8-bit data only) is not
compared: the checks are on ``kl_bpd`` (t > 0) and ``prior_bpd``, which do not involve it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers

from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from ddpm.core.diffusion import Denoiser, prior_bpd
from ddpm.errors import DdpmError
from ddpm.evaluation.likelihood import (
    NllReport, format_nll, kl_strata, nll_bits_per_dim, stratified_timesteps, term_bins, variational_bound,
)
from ddpm.nn import build_network
from ddpm.sampling import LoadedModel
from ddpm.core.schedules import NoiseSchedule

MU, SD = 0.3, 0.5
LN2 = math.log(2.0)


def oracle_eps_net(s: NoiseSchedule):
    return helpers.oracle_eps_net(s, MU, SD)


def closed_form_terms(T: int, variance: str) -> np.ndarray:
    """E[L_t] for t = 1..T-1 under the oracle, bits/dim, from linear betas recomputed in float64."""
    b = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    ab = np.cumprod(1 - b)
    abp = np.concatenate([[1.0], ab[:-1]])
    b, ab, abp = b[1:], ab[1:], abp[1:]
    bt = b * (1 - abp) / (1 - ab)
    c1 = b * np.sqrt(abp) / (1 - ab)
    var_post = SD**2 * (1 - ab) / (ab * SD**2 + 1 - ab)
    if variance == "beta_tilde":
        nats = c1**2 * var_post / (2 * bt)
    else:
        nats = 0.5 * (-1 + np.log(b / bt) + bt / b) + c1**2 * var_post / (2 * b)
    return nats / LN2


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    return MU + SD * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_kl_sum_matches_closed_form(variance: str) -> None:
    """All T terms under the oracle: sum_{t>0} E[L_t] within 5 Monte-Carlo standard errors. The
    standard error is the report's own (std over images / sqrt(N)); it is also checked against
    the worst case sqrt(2) * sum / sqrt(N * D) (each term per dimension is a scaled chi^2_1,
    variance 2 m_t^2; perfectly correlated terms at most add their standard deviations)."""
    T, n = 100, 2000
    s = NoiseSchedule.create("linear", T)
    r = variational_bound(Denoiser(oracle_eps_net(s), s), gaussian_data(n, 1), variance=variance,
                          batch_size=1000, seed=2)
    ref = closed_form_terms(T, variance)
    assert r.exact and r.timesteps == T and r.n_images == n and r.sampling == "all"
    worst_se = math.sqrt(2) * ref.sum() / math.sqrt(n * 16)
    assert 0 < r.kl_bpd_stderr < 1.05 * worst_se
    assert abs(r.kl_bpd - ref.sum()) < 5 * r.kl_bpd_stderr, (r.kl_bpd, ref.sum(), r.kl_bpd_stderr)
    # per term: each within 6 of its own worst-case standard errors (99 terms)
    terms = np.array(r.terms[1:])
    se_t = math.sqrt(2) * ref / math.sqrt(n * 16)
    assert np.all(np.abs(terms - ref) < 6 * se_t), np.max(np.abs(terms - ref) / se_t)
    # the parts add up
    assert r.terms[0] == pytest.approx(r.decoder_bpd, rel=1e-9)
    assert math.fsum(r.terms[1:]) == pytest.approx(r.kl_bpd, rel=1e-9)
    assert r.bits_per_dim == pytest.approx(r.prior_bpd + r.decoder_bpd + r.kl_bpd, rel=1e-9)


def test_prior_matches_closed_form() -> None:
    """E[L_T] = (-1 - log(1 - a) + (1 - a) + a (MU^2 + SD^2)) / 2 nats, a = alpha_bar_{T-1}; and
    the report's prior is exactly the mean of diffusion.prior_bpd over the images."""
    T, n = 100, 2000
    s = NoiseSchedule.create("linear", T)
    x0 = gaussian_data(n, 3)
    r = variational_bound(Denoiser(oracle_eps_net(s), s), x0, timesteps=3, seed=0)
    a = float(np.prod(1 - np.linspace(1e-4, 0.02, T)))
    ref = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * (MU**2 + SD**2)) / LN2
    se = 0.5 * a * math.sqrt(4 * MU**2 * SD**2 + 2 * SD**4) / LN2 / math.sqrt(n * 16)  # from Var[x0^2]
    assert abs(r.prior_bpd - ref) < 5 * se
    assert r.prior_bpd == pytest.approx(prior_bpd(s, x0).double().mean().item(), rel=1e-9)


# ---------------------------------------------------------------- the subset estimate


@pytest.mark.parametrize(("T", "k"), [(100, 1), (100, 7), (20, 19), (200, 50)])
def test_strata_cover_each_t_once_in_expectation(T: int, k: int) -> None:
    """sum_j size_j 1[t_j = t] has expectation 1 for every t in 1..T-1 (what makes the estimate
    unbiased); strata are contiguous, disjoint and of near-equal size."""
    edges = kl_strata(T, k)
    sizes = edges[1:] - edges[:-1]
    assert edges[0] == 1 and edges[-1] == T and sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    n = 20000
    ts, w = stratified_timesteps(T, k, n, torch.Generator().manual_seed(0))
    assert ts.shape == (n, k) and w.shape == (k,) and w.sum().item() == T - 1
    assert ((ts >= edges[:-1]) & (ts < edges[1:])).all()
    hits = torch.zeros(T, dtype=torch.float64).index_add_(0, ts.flatten(), w.repeat(n)) / n
    # each count is Binomial(n, 1/size): relative sd sqrt((size - 1) / n)
    tol = 5 * math.sqrt(max(sizes.max().item() - 1, 0) / n) + 1e-12
    assert hits[0] == 0 and torch.all((hits[1:] - 1).abs() <= tol)


def test_subset_estimate_is_unbiased() -> None:
    """The mean of the k-term estimate over many seeds matches the closed-form full sum within
    5 standard errors of that mean (300 seeds; T=100, k=7: strata of 14 and 15 terms)."""
    T, k, seeds = 100, 7, 300
    s = NoiseSchedule.create("linear", T)
    den = Denoiser(oracle_eps_net(s), s)
    x0 = gaussian_data(32, 4)
    est = np.array([variational_bound(den, x0, timesteps=k, seed=i).kl_bpd for i in range(seeds)])
    ref = closed_form_terms(T, "beta_tilde").sum()
    se = est.std(ddof=1) / math.sqrt(seeds)
    assert abs(est.mean() - ref) < 5 * se, (est.mean(), ref, se)
    assert est.std() > 0.01  # it is an estimate: different seeds, different t


def test_subset_report_fields_and_exact_limit() -> None:
    T = 30
    s = NoiseSchedule.create("linear", T)
    den = Denoiser(oracle_eps_net(s), s)
    x0 = gaussian_data(40, 5)
    r = variational_bound(den, x0, timesteps=5, batch_size=16, seed=1)
    assert not r.exact and r.timesteps == 6 and r.sampling == "stratified" and r.T == T
    assert math.fsum(r.terms[1:]) == pytest.approx(r.kl_bpd, rel=1e-9)
    # k >= T-1 is the full sum, and matches timesteps=None draw for draw
    full = variational_bound(den, x0, batch_size=16, seed=1)
    same = variational_bound(den, x0, timesteps=T - 1, batch_size=16, seed=1)
    assert same.exact and same == full
    # seeded: reproducible
    assert variational_bound(den, x0, timesteps=5, batch_size=16, seed=1) == r
    with pytest.raises(DdpmError):
        variational_bound(den, x0, timesteps=0)


# ---------------------------------------------------------------- the run-level wrapper


def tiny_model(learn_sigma: bool, T: int = 10) -> LoadedModel:
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=1, attn_dim_head=8,
                                      learn_sigma=learn_sigma),
                    diffusion=DiffusionConfig(timesteps=T, schedule="cosine"),
                    data=DataConfig(image_size=8))
    net = build_network(cfg.model).eval()
    return LoadedModel(net, NoiseSchedule.create("cosine", T), cfg, 0, Path("nowhere"))


def uint8_images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_nll_bits_per_dim_on_a_model(learn_sigma: bool) -> None:
    """Discrete data: every part of the bound is a KL or a -log of a probability, so >= 0."""
    model = tiny_model(learn_sigma)
    r = nll_bits_per_dim(model, uint8_images(6), batch_size=4)
    assert isinstance(r, NllReport) and r.exact and r.n_images == 6 and r.T == 10
    assert r.variance == ("learned" if learn_sigma else "beta_tilde")
    assert all(math.isfinite(v) for v in (r.bits_per_dim, r.prior_bpd, r.decoder_bpd, r.kl_bpd))
    assert r.prior_bpd >= 0 and r.decoder_bpd > 0 and r.kl_bpd > 0 and min(r.terms) >= 0
    est = nll_bits_per_dim(model, uint8_images(6), timesteps=3, variance="beta")
    assert not est.exact and est.variance == "beta" and math.isfinite(est.bits_per_dim)
    text = format_nll(r)
    assert "total" in text and "prior" in text and "decoder" in text
    assert len(term_bins(r)) == 9  # T-1 = 9 terms: one per bin
    assert len(term_bins(nll_bits_per_dim(tiny_model(False, T=50), uint8_images(2)))) == 10


def test_nll_bad_input() -> None:
    model = tiny_model(False)
    with pytest.raises(DdpmError, match="learn_sigma"):
        nll_bits_per_dim(model, uint8_images(2), variance="learned")
    with pytest.raises(DdpmError, match="uint8"):
        nll_bits_per_dim(model, uint8_images(2).float())
    with pytest.raises(DdpmError):
        nll_bits_per_dim(model, torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(DdpmError, match="variance"):
        nll_bits_per_dim(model, uint8_images(2), variance="large")  # type: ignore[arg-type]
    with pytest.raises(DdpmError, match="clip"):
        nll_bits_per_dim(model, uint8_images(2), clip="tanh")
