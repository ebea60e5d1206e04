"""Tests for ddpm.diffusion: forward-process moments, the posterior (DDPM Eq. 7) recomputed
independently in float64 and checked by regression, eps/x0/v conversions, the training losses,
and the variational bound against closed forms for Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import helpers
import torch.nn.functional as F
from scipy import integrate, stats
from torch import nn

from ddpm.config import DiffusionConfig
from ddpm.core.diffusion import (
    sample_timesteps,
    Denoiser, discretized_gaussian_log_likelihood, dynamic_threshold, eps_from_x0, extract,
    interpret, loss_weight, normal_kl, p_log_variance, prior_bpd, q_posterior, q_sample,
    sample_noise, snr, target_for, training_losses, v_from, vlb_term, x0_from_eps, x0_from_v,
)
from ddpm.core.schedules import NoiseSchedule, make_betas

LN2 = math.log(2.0)


def np_schedule(name: str, T: int) -> dict[str, np.ndarray]:
    """DDPM Eqs. 4 and 7 in float64 numpy, from the betas alone."""
    b = make_betas(name, T).numpy()
    a = 1 - b
    ab = np.cumprod(a)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return dict(b=b, a=a, ab=ab, ab_prev=ab_prev,
                c1=np.sqrt(ab_prev) * b / (1 - ab), c2=np.sqrt(a) * (1 - ab_prev) / (1 - ab),
                bt=(1 - ab_prev) / (1 - ab) * b)


def tt(t: int, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long)


# ---------------------------------------------------------------- forward process


def test_extract_shape() -> None:
    a = torch.arange(10.0)
    out = extract(a, torch.tensor([1, 7, 3]), 4)
    assert out.shape == (3, 1, 1, 1) and out.flatten().tolist() == [1.0, 7.0, 3.0]


@pytest.mark.parametrize("t", [0, 10, 100, 199])
def test_q_sample_moments(t: int) -> None:
    s = NoiseSchedule.create("linear", 200)
    a = float(s.alpha_bar.double()[t])
    n = 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1, 1, 1), 0.7)
    x0[n // 2:] = -0.4  # two fixed data points, half the draws each
    noise = torch.randn(x0.shape, generator=g)
    xt = q_sample(s, x0, tt(t, n), noise).double().flatten()
    for half, v in [(xt[: n // 2], 0.7), (xt[n // 2:], -0.4)]:
        m = half.numel()
        # standard errors: mean sqrt(var/m); variance var sqrt(2/m); allow 5 of them
        assert abs(half.mean().item() - math.sqrt(a) * v) < 5 * math.sqrt((1 - a) / m)
        assert abs(half.var().item() - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / m)
    # and pathwise it is exactly Eq. 4
    torch.testing.assert_close(xt.float(), (math.sqrt(a) * x0 + math.sqrt(1 - a) * noise).flatten())


def test_sample_noise_offset() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(4000, 3, 4, 4)
    plain = sample_noise(x0, 0.0, generator=g)
    assert abs(plain.var().item() - 1) < 0.02
    off = sample_noise(x0, 0.5, generator=g)
    assert abs(off.var().item() - 1.25) < 0.03  # 1 + offset^2
    # the offset part is constant over each image's channel: the per-(b, c) spatial mean carries it
    chan_mean = off.mean(dim=(2, 3))
    assert abs(chan_mean.var().item() - (0.25 + 1 / 16)) < 0.02


# ---------------------------------------------------------------- posterior


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 7, 50, 99])
def test_posterior_matches_eq7(name: str, t: int) -> None:
    T = 100
    s = NoiseSchedule.create(name, T)
    r = np_schedule(name, T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g)
    xt = torch.randn(5, 2, 3, 3, generator=g)
    post = q_posterior(s, x0, xt, tt(t, 5))
    mean = r["c1"][t] * x0.double().numpy() + r["c2"][t] * xt.double().numpy()
    np.testing.assert_allclose(post.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(post.variance.numpy(), np.full(x0.shape, r["bt"][t]), rtol=1e-5, atol=1e-12)
    clipped = r["bt"][t] if t > 0 else r["bt"][1]
    np.testing.assert_allclose(post.log_variance.numpy(), np.full(x0.shape, np.log(clipped)), rtol=1e-5)
    if t == 0:  # q(x_{-1} | x_0, x0) collapses onto x0
        torch.testing.assert_close(post.mean, x0)


@pytest.mark.parametrize("t", [1, 5, 30])
def test_posterior_by_regression(t: int) -> None:
    """Bayes: x_{t-1} ~ q(x_{t-1}|x0), x_t ~ q(x_t|x_{t-1}); then E[x_{t-1}|x_t, x0] is linear in
    x_t with slope coef2 and intercept coef1 x0, and the residual variance is beta-tilde."""
    T = 50
    s = NoiseSchedule.create("cosine", T)
    r = np_schedule("cosine", T)
    rng = np.random.default_rng(t)
    n = 400_000
    x0 = 0.8
    x_prev = math.sqrt(r["ab_prev"][t]) * x0 + math.sqrt(1 - r["ab_prev"][t]) * rng.standard_normal(n)
    x_t = math.sqrt(r["a"][t]) * x_prev + math.sqrt(r["b"][t]) * rng.standard_normal(n)
    A = np.stack([np.ones(n), x_t], 1)
    (intercept, slope), *_ = np.linalg.lstsq(A, x_prev, rcond=None)
    resid = x_prev - A @ np.array([intercept, slope])
    res_var = resid.var()
    se_slope = math.sqrt(res_var / (n * x_t.var()))
    se_int = math.sqrt(res_var * (1 / n + x_t.mean() ** 2 / (n * x_t.var())))
    post = q_posterior(s, torch.full((1, 1, 1, 1), x0), torch.zeros(1, 1, 1, 1), tt(t, 1))
    coef2 = float(s.posterior_mean_coef2[t])
    assert abs(slope - coef2) < 5 * se_slope + 1e-6
    assert abs(intercept - post.mean.item()) < 5 * se_int + 1e-6  # coef1 * x0
    assert abs(res_var - post.variance.item()) < 5 * res_var * math.sqrt(2 / n)


# ---------------------------------------------------------------- conversions


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_conversions_round_trip(name: str) -> None:
    T = 1000
    s = NoiseSchedule.create(name, T)
    g = torch.Generator().manual_seed(2)
    n = 64
    t = torch.randint(0, T - 1, (n,), generator=g)  # cosine's last alpha_bar is ~1e-8: skip it
    x0 = torch.rand(n, 2, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(n, 2, 4, 4, generator=g)
    xt = q_sample(s, x0, t, eps)
    torch.testing.assert_close(x0_from_eps(s, xt, t, eps), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_from_x0(s, xt, t, x0), eps, atol=2e-3, rtol=1e-3)
    v = v_from(s, x0, t, eps)
    torch.testing.assert_close(x0_from_v(s, xt, t, v), x0, atol=1e-5, rtol=1e-5)
    # v = sqrt(ab) eps - sqrt(1 - ab) x0, independently
    ab = s.alpha_bar.double()[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v.double(), ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double(),
                               atol=1e-6, rtol=1e-6)
    # exact inverses of each other on arbitrary inputs
    torch.testing.assert_close(x0_from_eps(s, xt, t, eps_from_x0(s, xt, t, x0)), x0, atol=1e-4, rtol=1e-4)
    assert target_for("eps", s, x0, t, eps) is eps
    assert target_for("x0", s, x0, t, eps) is x0
    torch.testing.assert_close(target_for("v", s, x0, t, eps), v)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_interpret_exact_targets(objective: str) -> None:
    s = NoiseSchedule.create("cosine", 100)
    g = torch.Generator().manual_seed(3)
    n = 32
    t = torch.randint(0, 95, (n,), generator=g)
    x0 = torch.rand(n, 1, 4, 4, generator=g) * 1.6 - 0.8
    eps = torch.randn(n, 1, 4, 4, generator=g)
    xt = q_sample(s, x0, t, eps)
    out = target_for(objective, s, x0, t, eps)
    p = interpret(s, out, xt, t, objective=objective, learn_sigma=False)
    assert p.var_frac is None
    torch.testing.assert_close(p.x0, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(p.eps, eps, atol=2e-3, rtol=1e-3)
    # clipping an in-range x0 changes nothing; dynamic thresholding neither
    for clip in ["clip", "dynamic"]:
        q = interpret(s, out, xt, t, objective=objective, learn_sigma=False, clip=clip)
        torch.testing.assert_close(q.x0, p.x0.clamp(-1, 1), atol=1e-6, rtol=0)
    # learned sigma: the second half of the channels is the variance interpolation
    vraw = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    q = interpret(s, torch.cat([out, vraw], 1), xt, t, objective=objective, learn_sigma=True)
    torch.testing.assert_close(q.x0, p.x0)
    torch.testing.assert_close(q.eps, p.eps)
    torch.testing.assert_close(q.var_frac, (vraw + 1) / 2)
    # Denoiser passes schedule.timesteps[t] to the network and interprets its output
    seen = []

    def net(x, tn):
        seen.append(tn)
        return out

    d = Denoiser(net, s, objective=objective)
    dp = d(xt, t)
    torch.testing.assert_close(dp.x0, p.x0)
    assert torch.equal(seen[0], t)


def test_interpret_clip_bounds_x0_and_keeps_eps_consistent() -> None:
    s = NoiseSchedule.create("linear", 100)
    g = torch.Generator().manual_seed(4)
    t = torch.randint(1, 100, (16,), generator=g)
    xt = torch.randn(16, 1, 8, 8, generator=g) * 2
    out = torch.randn(16, 1, 8, 8, generator=g) * 3
    for objective in ["eps", "x0", "v"]:
        p = interpret(s, out, xt, t, objective=objective, learn_sigma=False, clip="clip")
        raw = interpret(s, out, xt, t, objective=objective, learn_sigma=False)
        assert p.x0.abs().max() <= 1.0
        assert (raw.x0.abs() > 1).any()
        torch.testing.assert_close(p.x0, raw.x0.clamp(-1, 1))
        # eps is recomputed from the clipped x0, so that x_t = sqrt(ab) x0 + sqrt(1-ab) eps holds
        torch.testing.assert_close(q_sample(s, p.x0, t, p.eps), xt, atol=1e-4, rtol=1e-4)
        d = interpret(s, out, xt, t, objective=objective, learn_sigma=False, clip="dynamic")
        assert d.x0.abs().max() <= 1.0 + 1e-6


def test_dynamic_threshold() -> None:
    g = torch.Generator().manual_seed(5)
    inside = torch.rand(4, 3, 8, 8, generator=g) * 1.8 - 0.9
    torch.testing.assert_close(dynamic_threshold(inside), inside, atol=0, rtol=0)
    big = torch.randn(4, 3, 8, 8, generator=g) * 3
    big[1] = inside[1]  # one image in range: left alone
    out = dynamic_threshold(big, 0.9)
    for i in range(4):
        q = max(np.quantile(big[i].abs().numpy().ravel(), 0.9), 1.0)
        ref = np.clip(big[i].numpy(), -q, q) / q
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], big[1])
    assert out.abs().max() <= 1.0 + 1e-6


# ---------------------------------------------------------------- training losses


def fixed_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x - 0.1 + 1e-3 * t.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss", ["l1", "l2", "huber"])
def test_training_losses_match_torch(objective: str, loss: str) -> None:
    s = NoiseSchedule.create("linear", 200)
    cfg = DiffusionConfig(timesteps=200, loss=loss, objective=objective)
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(8, 1, 6, 6, generator=g) * 2 - 1
    t = torch.randint(0, 200, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    terms = training_losses(fixed_net, s, cfg, x0, t, noise)
    ab = s.alpha_bar.double()[t].reshape(-1, 1, 1, 1)
    xt = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).float()
    target = {"eps": noise, "x0": x0,
              "v": (ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()).float()}[objective]
    fn = {"l1": F.l1_loss, "l2": F.mse_loss, "huber": F.smooth_l1_loss}[loss]
    pred = fixed_net(xt, t)
    torch.testing.assert_close(terms.loss, fn(pred, target), rtol=1e-5, atol=1e-6)
    per = torch.stack([fn(pred[i], target[i]) for i in range(8)])
    torch.testing.assert_close(terms.per_sample, per, rtol=1e-5, atol=1e-6)
    assert terms.vlb is None


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weights(objective: str) -> None:
    T, gamma = 200, 5.0
    s = NoiseSchedule.create("cosine", T)
    cfg = DiffusionConfig(timesteps=T, loss="l2", objective=objective, loss_weighting="min_snr",
                          min_snr_gamma=gamma)
    t = torch.tensor([0, 5, 20, 60, 100, 150, 199])
    ab = np_schedule("cosine", T)["ab"][t.numpy()]
    r = ab / (1 - ab)
    expect = {"eps": np.minimum(r, gamma) / r, "v": np.minimum(r, gamma) / (r + 1),
              "x0": np.minimum(r, gamma)}[objective]
    np.testing.assert_allclose(snr(s, t).double().numpy(), r, rtol=1e-4)
    np.testing.assert_allclose(loss_weight(cfg, s, t).double().numpy(), expect, rtol=1e-4)
    assert (expect[:2] < 1).all() if objective != "x0" else True  # high SNR is down-weighted
    assert loss_weight(DiffusionConfig(objective=objective), s, t) is None
    # and the weights reach the per-sample loss
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(len(t), 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    plain = training_losses(fixed_net, s, DiffusionConfig(loss="l2", objective=objective), x0, t, noise)
    weighted = training_losses(fixed_net, s, cfg, x0, t, noise)
    np.testing.assert_allclose(weighted.per_sample.double().numpy(),
                               plain.per_sample.double().numpy() * expect, rtol=1e-4)
    torch.testing.assert_close(weighted.loss, weighted.per_sample.mean())


class TinyNet(nn.Module):
    def __init__(self, cin: int = 1, cout: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Embedding(200, cout)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t)[:, :, None, None]


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("objective", ["eps", "v"])
def test_training_losses_backprop(learn_sigma: bool, objective: str) -> None:
    torch.manual_seed(0)
    net = TinyNet(1, 2 if learn_sigma else 1)
    s = NoiseSchedule.create("linear", 200)
    cfg = DiffusionConfig(loss="huber", objective=objective, loss_weighting="min_snr")
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    t = torch.randint(0, 200, (16,))
    terms = training_losses(net, s, cfg, x0, t, torch.randn_like(x0), learn_sigma=learn_sigma)
    assert terms.loss.ndim == 0 and torch.isfinite(terms.loss)
    terms.loss.backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert net.conv.weight.grad.abs().sum() > 0
    if learn_sigma:
        assert terms.vlb.shape == (16,) and torch.isfinite(terms.vlb).all()
    assert not terms.per_sample.requires_grad


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_learn_sigma_stop_gradient(objective: str) -> None:
    """Improved DDPM Sec. 3.1: L_vlb only trains the variance; the mean half's gradient is that
    of L_simple alone, and the variance half's gradient is that of lambda T L_vlb."""
    T = 200
    s = NoiseSchedule.create("linear", T)
    cfg = DiffusionConfig(loss="l2", objective=objective, vlb_weight=1e-3)
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 3, 20, 70, 120, 180, 199])
    noise = torch.randn(x0.shape, generator=g)
    raw = (torch.randn(8, 2, 4, 4, generator=g) * 0.5).requires_grad_(True)
    terms = training_losses(lambda x, tn: raw, s, cfg, x0, t, noise, learn_sigma=True)
    terms.loss.backward()
    target = target_for(objective, s, x0, t, noise)
    mean_half = raw.detach()[:, :1].clone().requires_grad_(True)
    F.mse_loss(mean_half, target).backward()
    torch.testing.assert_close(raw.grad[:, :1], mean_half.grad, rtol=1e-5, atol=1e-9)
    # every variance output gets a vlb gradient; at t = 0 (the decoder's variance) only where
    # the decoder's bin probability has not underflowed into its 1e-12 clamp, which is the case
    # for eps and v (x0-hat ~ x_0 ~ x0 there) but not for the random x0 predictions here
    assert raw.grad[1:, 1:].abs().min() > 0
    if objective != "x0":
        assert raw.grad[0, 1:].abs().min() > 0
    # the loss is L_simple + lambda T mean(L_vlb), with L_vlb the learned-variance bound
    xt = q_sample(s, x0, t, noise)
    pred = interpret(s, raw.detach(), xt, t, objective=objective, learn_sigma=True)
    vlb = vlb_term(s, pred, x0, xt, t, variance="learned")
    torch.testing.assert_close(terms.vlb, vlb)
    expect = F.mse_loss(raw.detach()[:, :1], target) + 1e-3 * T * vlb.mean()
    torch.testing.assert_close(terms.loss.detach(), expect)


# ---------------------------------------------------------------- KL and likelihood


@pytest.mark.parametrize(("m1", "v1", "m2", "v2"), [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0),
                                                  (1.5, 0.01, 1.4, 0.02), (-2.0, 3.0, 0.5, 0.7)])
def test_normal_kl_against_integral(m1, v1, m2, v2) -> None:
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    lo, hi = m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1)
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)
    got = normal_kl(torch.tensor(m1, dtype=torch.float64), torch.tensor(math.log(v1), dtype=torch.float64),
                    torch.tensor(m2, dtype=torch.float64), torch.tensor(math.log(v2), dtype=torch.float64))
    assert got.item() == pytest.approx(ref, abs=1e-8, rel=1e-6)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.1), (0.37, 0.02), (-0.9, 0.5), (0.99, 0.003),
                                             (0.2, 2.0), (1.3, 0.3)])
def test_discretized_likelihood_sums_to_one(mean: float, scale: float) -> None:
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (ll <= 0).all()
    # an inner bin is the Gaussian mass over [x - 1/255, x + 1/255]; the edges extend to infinity
    d = stats.norm(mean, scale)
    k = 100
    xk = float(x[k])
    assert ll[k].exp().item() == pytest.approx(d.cdf(xk + 1 / 255) - d.cdf(xk - 1 / 255), abs=1e-9, rel=1e-6)
    assert ll[0].exp().item() == pytest.approx(d.cdf(-1 + 1 / 255), abs=1e-9, rel=1e-6)
    assert ll[-1].exp().item() == pytest.approx(d.sf(1 - 1 / 255), abs=1e-9, rel=1e-6)


def test_discretized_likelihood_float32() -> None:
    x = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(x, torch.full_like(x, 0.1), torch.full_like(x, math.log(0.2)))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- variational bound, closed forms

MU, SD = 0.3, 0.5


def oracle_eps_net(s: NoiseSchedule):
    return helpers.oracle_eps_net(s, MU, SD)


@pytest.mark.parametrize("t", [1, 5, 40, 150])
def test_vlb_term_closed_form_gaussian_data(t: int) -> None:
    """For x0 ~ N(MU, SD^2) and the optimal predictor, E[L_{t-1}] (beta-tilde variance) is
    coef1^2 Var[x0|x_t] / (2 beta-tilde) nats per dimension, and with variance beta it is
    KL(N(0, bt) || N(0, b)) + coef1^2 Var[x0|x_t] / (2 b)."""
    T = 200
    s = NoiseSchedule.create("linear", T)
    r = np_schedule("linear", T)
    n = 4000
    g = torch.Generator().manual_seed(9 + t)
    x0 = MU + SD * torch.randn(n, 1, 4, 4, generator=g)
    xt = q_sample(s, x0, tt(t, n), torch.randn(x0.shape, generator=g))
    pred = Denoiser(oracle_eps_net(s), s, objective="eps")(xt, tt(t, n))
    a, c1, bt, b = r["ab"][t], r["c1"][t], r["bt"][t], r["b"][t]
    var_post = SD**2 * (1 - a) / (a * SD**2 + 1 - a)
    expect = {"beta_tilde": c1**2 * var_post / (2 * bt) / LN2,
              "beta": (0.5 * (-1 + math.log(b / bt) + bt / b) + c1**2 * var_post / (2 * b)) / LN2}
    for variance, ref in expect.items():
        vals = vlb_term(s, pred, x0, xt, tt(t, n), variance=variance).double()
        assert vals.shape == (n,)
        se = vals.std().item() / math.sqrt(n)  # Monte Carlo standard error of the mean
        assert abs(vals.mean().item() - ref) < 5 * se + 1e-4 * ref, (variance, vals.mean().item(), ref, se)


def test_vlb_term_t0_is_decoder_nll() -> None:
    s = NoiseSchedule.create("linear", 200)
    g = torch.Generator().manual_seed(10)
    x0 = (torch.randint(0, 256, (8, 1, 4, 4), generator=g).float() / 255) * 2 - 1
    xt = q_sample(s, x0, tt(0, 8), torch.randn(x0.shape, generator=g))
    pred = Denoiser(oracle_eps_net(s), s)(xt, tt(0, 8))
    got = vlb_term(s, pred, x0, xt, tt(0, 8), variance="beta_tilde")
    logvar = p_log_variance(s, tt(0, 8), 4, variance="beta_tilde")
    ll = discretized_gaussian_log_likelihood(x0, pred.x0, 0.5 * logvar)  # mean at t=0 is x0-hat
    torch.testing.assert_close(got, -ll.flatten(1).mean(1) / LN2)
    assert (got > 0).all()


def test_p_log_variance_choices() -> None:
    s = NoiseSchedule.create("linear", 100)
    r = np_schedule("linear", 100)
    t = torch.tensor([0, 1, 50, 99])
    lo = p_log_variance(s, t, 2, variance="beta_tilde").flatten().double().numpy()
    hi = p_log_variance(s, t, 2, variance="beta").flatten().double().numpy()
    np.testing.assert_allclose(lo, np.log([r["bt"][1], r["bt"][1], r["bt"][50], r["bt"][99]]), rtol=1e-5)
    np.testing.assert_allclose(hi, np.log([r["bt"][1], r["b"][1], r["b"][50], r["b"][99]]), rtol=1e-5)
    frac = torch.tensor([0.0, 1.0, 0.25, 0.5]).reshape(4, 1)
    mid = p_log_variance(s, t, 2, variance="learned", var_frac=frac).flatten().double().numpy()
    np.testing.assert_allclose(mid, frac.flatten().double().numpy() * hi + (1 - frac.flatten().double().numpy()) * lo,
                               rtol=1e-5)


def test_learned_variance_at_t0() -> None:
    """Improved DDPM Eq. 15 as improved-diffusion's LEARNED_RANGE: max_log is log(beta_t) at every
    t, t=0 included, so the decoder's variance is learned in [beta-tilde_1, beta_0]."""
    s = NoiseSchedule.create("linear", 100)
    r = np_schedule("linear", 100)
    t = torch.tensor([0, 0])
    frac = torch.tensor([1.0, 0.5]).reshape(2, 1)
    got = p_log_variance(s, t, 2, variance="learned", var_frac=frac).flatten().double().numpy()
    lo, hi = math.log(r["bt"][1]), math.log(r["b"][0])
    np.testing.assert_allclose(got, [hi, 0.5 * (hi + lo)], rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_prior_bpd_closed_form(name: str) -> None:
    T = 200
    s = NoiseSchedule.create(name, T)
    aT = np_schedule(name, T)["ab"][-1]
    g = torch.Generator().manual_seed(11)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    xd = x0.double().numpy()
    kl = 0.5 * (-1 - math.log(1 - aT) + (1 - aT) + aT * xd**2)  # KL(N(sqrt(aT) x0, 1-aT) || N(0,1))
    ref = kl.reshape(6, -1).mean(1) / LN2
    np.testing.assert_allclose(prior_bpd(s, x0).double().numpy(), ref, rtol=1e-4, atol=1e-9)
    assert (prior_bpd(s, x0) >= 0).all()


# ---------------------------------------------------------------- drawing t


def test_uniform_timesteps_are_ddpm_draws() -> None:
    """The default draws exactly torch.randint's t (so runs and their resumes are unchanged)."""
    cfg = DiffusionConfig(timesteps=50)
    s = NoiseSchedule.create("linear", 50)
    got = sample_timesteps(cfg, s, 1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(("name", "mean", "std"), [("cosine", -1.2, 1.2), ("linear", 0.5, 0.8)])
def test_lognormal_timesteps_closed_form(name: str, mean: float, std: float) -> None:
    """P(t = k) is the normal mass of ln sigma between the midpoints (in ln sigma) to k's
    neighbours, the tails going to t = 0 and t = T-1: a chi-square test of 200,000 draws."""
    T = 100
    cfg = DiffusionConfig(timesteps=T, schedule=name, t_sampling="lognormal", lognormal_mean=mean,
                          lognormal_std=std)
    s = NoiseSchedule.create(name, T)
    t = sample_timesteps(cfg, s, 200_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= T - 1
    ls = (0.5 * torch.log((1 - s.alpha_bar) / s.alpha_bar)).numpy()
    edges = np.concatenate([[-np.inf], (ls[1:] + ls[:-1]) / 2, [np.inf]])
    p = np.diff(stats.norm.cdf(edges, loc=mean, scale=std))
    counts = np.bincount(t.numpy(), minlength=T)
    keep = p * len(t) >= 5  # chi-square needs expected counts of 5 or more; pool the rest
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(p[keep], p[~keep].sum()) * len(t)
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert stats.chi2.sf(chi2, len(obs) - 1) > 1e-4, chi2
