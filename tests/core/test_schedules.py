"""Tests for ddpm.schedules: beta schedules against their formulas (recomputed independently in
numpy float64), the derived NoiseSchedule quantities, respacing and space_timesteps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.errors import DdpmError
from ddpm.core.schedules import NoiseSchedule, cosine_betas, make_betas, space_timesteps

B0, B1 = 1e-4, 0.02
TS = [1, 2, 10, 200, 1000]
NAMES = ["linear", "quadratic", "sigmoid", "cosine"]


def ref_betas(name: str, T: int, b0: float = B0, b1: float = B1) -> np.ndarray:
    """Each schedule written out from its paper's formula, in numpy float64."""
    if name == "linear":
        return np.linspace(b0, b1, T)
    if name == "quadratic":
        return np.linspace(np.sqrt(b0), np.sqrt(b1), T) ** 2
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (b1 - b0) + b0
    assert name == "cosine"  # Nichol & Dhariwal Eq. 17, s = 0.008, betas clipped at 0.999
    s = 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    ab = np.array([f(t) / f(0) for t in range(T + 1)])
    return np.minimum(1.0 - ab[1:] / ab[:-1], 0.999)


# ---------------------------------------------------------------- betas


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", TS)
def test_betas_match_formula(name: str, T: int) -> None:
    got = make_betas(name, T)
    assert got.dtype == torch.float64 and got.shape == (T,)
    np.testing.assert_allclose(got.numpy(), ref_betas(name, T), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "quadratic", "sigmoid"])
def test_betas_custom_range(name: str) -> None:
    got = make_betas(name, 50, 5e-4, 0.05).numpy()
    np.testing.assert_allclose(got, ref_betas(name, 50, 5e-4, 0.05), rtol=1e-12)
    if name in ("linear", "quadratic"):  # these hit both end points exactly
        assert got[0] == pytest.approx(5e-4, rel=1e-12) and got[-1] == pytest.approx(0.05, rel=1e-12)


def test_cosine_properties() -> None:
    T = 1000
    b = cosine_betas(T).numpy()
    assert b.max() == pytest.approx(0.999)  # the last beta hits the clip
    assert (b > 0).all() and (b <= 0.999).all()
    # alpha_bar(t) = f(t)/f(0) before clipping: check the cumulative product at a mid step
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = np.cumprod(1 - b)
    assert ab[499] == pytest.approx(f(500) / f(0), rel=1e-10)


def test_make_betas_errors() -> None:
    with pytest.raises(DdpmError):
        make_betas("nope", 10)
    for name in NAMES:
        with pytest.raises(DdpmError):
            make_betas(name, 0)
        with pytest.raises(DdpmError):
            make_betas(name, -3)
    with pytest.raises(DdpmError):
        make_betas("linear", 10, 0.02, 1e-4)  # start > end
    with pytest.raises(DdpmError):
        make_betas("linear", 10, 1e-4, 1.0)
    with pytest.raises(DdpmError):
        NoiseSchedule.create("nope", 10)


# ---------------------------------------------------------------- derived quantities


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [2, 10, 200, 1000])
def test_schedule_derived_quantities(name: str, T: int) -> None:
    s = NoiseSchedule.create(name, T)
    b = ref_betas(name, T)
    a = 1 - b
    ab = np.cumprod(a)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)
    c1 = b * np.sqrt(ab_prev) / (1 - ab)
    c2 = (1 - ab_prev) * np.sqrt(a) / (1 - ab)
    expect = {
        "betas": b, "alphas": a, "alpha_bar": ab, "alpha_bar_prev": ab_prev,
        "sqrt_alpha_bar": np.sqrt(ab), "sqrt_one_minus_alpha_bar": np.sqrt(1 - ab),
        "sqrt_recip_alphas": np.sqrt(1 / a), "sqrt_recip_alpha_bar": np.sqrt(1 / ab),
        "sqrt_recipm1_alpha_bar": np.sqrt(1 / ab - 1), "posterior_variance": post_var,
        "posterior_mean_coef1": c1, "posterior_mean_coef2": c2,
    }
    for key, ref in expect.items():
        got = getattr(s, key)
        assert got.dtype == torch.float64, key  # stored in float64, cast at use (diffusion.extract)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-300, err_msg=key)
    # improved-diffusion: log beta-tilde with its t=0 value (0) replaced by the t=1 one
    np.testing.assert_allclose(s.posterior_log_variance_clipped.numpy(),
                               np.log(np.concatenate([post_var[1:2], post_var[1:]])), rtol=1e-5)
    assert s.T == T
    assert torch.equal(s.timesteps, torch.arange(T))
    for key in ["betas", "alphas", "alpha_bar", "alpha_bar_prev", "posterior_variance",
                "posterior_mean_coef1", "posterior_mean_coef2"]:
        v = getattr(s, key)
        assert (v >= 0).all() and (v <= 1 + 1e-12).all(), key  # float64 rounding: coef1[0] = b / (1 - (1 - b))
    assert s.posterior_variance[0] == 0
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()  # strictly decreasing
    # the posterior mean interpolates: c1 sqrt(ab_prev)... at t=0 it returns x0 exactly
    assert s.posterior_mean_coef1[0] == pytest.approx(1.0) and s.posterior_mean_coef2[0] == 0


def test_schedule_T1() -> None:
    s = NoiseSchedule.create("linear", 1)
    assert s.T == 1
    assert s.alpha_bar.item() == pytest.approx(1 - 1e-4)
    assert torch.isfinite(s.posterior_log_variance_clipped).all()


def test_schedule_to_device() -> None:
    s = NoiseSchedule.create("cosine", 10).to("cpu")
    assert s.alpha_bar.device.type == "cpu" and s.timesteps.dtype == torch.long
    assert s.alpha_bar.dtype == torch.float64 and s.respace([0, 5, 9]).betas.dtype == torch.float64


# ---------------------------------------------------------------- respacing


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_respace_keeps_alpha_bar(name: str, spacing: str, steps: int) -> None:
    T = 200
    s = NoiseSchedule.create(name, T)
    keep = space_timesteps(T, steps, spacing)
    r = s.respace(keep)
    assert r.T == steps
    assert r.timesteps.tolist() == keep
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar[keep], rtol=1e-6, atol=1e-9)
    # the respaced schedule is itself consistent: betas = 1 - ab / ab_prev
    ab = s.alpha_bar.double()[keep].numpy()
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(r.betas.numpy(), 1 - ab / ab_prev, rtol=1e-5)
    assert (r.posterior_variance >= 0).all() and (r.posterior_variance <= r.betas + 1e-7).all()


@pytest.mark.parametrize("name", NAMES)
def test_respace_all_steps_is_identity(name: str) -> None:
    s = NoiseSchedule.create(name, 100)
    r = s.respace(list(range(100)))
    torch.testing.assert_close(r.betas, s.betas, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r.posterior_variance, s.posterior_variance, rtol=1e-3, atol=1e-8)
    assert torch.equal(r.timesteps, s.timesteps)


def test_respace_twice_composes_timesteps() -> None:
    s = NoiseSchedule.create("linear", 100)
    r1 = s.respace(list(range(0, 100, 2)))  # 0, 2, ..., 98
    r2 = r1.respace([0, 10, 49])
    assert r2.timesteps.tolist() == [0, 20, 98]
    torch.testing.assert_close(r2.alpha_bar, s.alpha_bar[[0, 20, 98]], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- space_timesteps


SHAPE_CASES = sorted({(T, steps) for T in [1, 2, 10, 50, 200, 1000]
                      for steps in [1, 2, 3, 5, 10, 50, 199, T - 1, T] if 1 <= steps <= T})


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
@pytest.mark.parametrize(("T", "steps"), SHAPE_CASES)
def test_space_timesteps_shape(T: int, steps: int, spacing: str) -> None:
    ts = space_timesteps(T, steps, spacing)
    assert len(ts) == steps
    assert all(isinstance(t, int) for t in ts)
    assert all(a < b for a, b in zip(ts, ts[1:])), ts
    assert 0 <= ts[0] and ts[-1] <= T - 1
    if steps == T:
        assert ts == list(range(T))
    assert ts[-1] == T - 1  # sampling starts from the noisiest step
    if spacing in ("uniform", "quadratic") and steps > 1:
        assert ts[0] == 0


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
def test_every_grid_starts_at_the_noisiest_step(spacing: str) -> None:
    """Issue 10: `--steps 1` took its one step at t = 0 and returned clipped noise. Every grid,
    for every steps in 1..T, ends (sampling starts) at t = T-1, with distinct steps in [0, T)."""
    for T in [1, 2, 3, 7, 64, 200, 500]:
        for steps in range(1, T + 1):
            ts = space_timesteps(T, steps, spacing)
            assert ts[-1] == T - 1 and ts[0] >= 0 and len(ts) == steps, (T, steps, ts)
            assert all(a < b for a, b in zip(ts, ts[1:])), (T, steps, ts)


def test_space_timesteps_values() -> None:
    assert space_timesteps(1000, 5, "uniform") == [0, 250, 500, 749, 999]
    assert space_timesteps(1000, 4, "trailing") == [249, 499, 749, 999]
    assert space_timesteps(10, 1, "trailing") == [9]
    assert space_timesteps(10, 1, "uniform") == space_timesteps(10, 1, "quadratic") == [9]
    q = space_timesteps(1000, 11, "quadratic")
    assert q[0] == 0 and q[-1] == 999
    assert q[5] == round(0.25 * 999)  # (i / (steps - 1))^2 (T - 1) at i = 5
    # quadratic is denser near t = 0: its gaps grow
    gaps = np.diff(q)
    assert (np.diff(gaps) >= 0).all()


def test_space_timesteps_uniform_is_evenly_spaced() -> None:
    ts = space_timesteps(1000, 50, "uniform")
    gaps = np.diff(ts)
    assert gaps.min() >= 20 and gaps.max() <= 21


def test_space_timesteps_errors() -> None:
    for spacing in ["uniform", "quadratic", "trailing"]:
        with pytest.raises(DdpmError):
            space_timesteps(100, 0, spacing)
        with pytest.raises(DdpmError):
            space_timesteps(100, 101, spacing)
        with pytest.raises(DdpmError):
            space_timesteps(100, -1, spacing)
    with pytest.raises(DdpmError):
        space_timesteps(100, 10, "linear")
    with pytest.raises(DdpmError):
        space_timesteps(100, 10, "")
