"""Tests for ddpm.samplers, chiefly DESIGN.md's oracle check: for data N(MU, SD^2) per
dimension the optimal predictor is known in closed form, so every sampler driven by it must
recover MU and SD without any training.

Three levels of precision:
- every sampler x objective recovers MU and SD within a tolerance that covers Monte Carlo
  error plus the sampler's own (documented) discretisation error;
- DDPM and DDIM are, under the oracle, linear-Gaussian chains: their output mean and variance
  after any respacing are computed exactly here in float64 and must match within 4-5 standard
  errors (this catches off-by-one timesteps and wrong variances that the first check might not);
- the deterministic samplers are compared pathwise with the exact probability-flow map (which,
  for Gaussian data, keeps the standardised value (x_t - E x_t) / sd(x_t) constant) and must
  converge at their order (DDIM first, Heun and DPM-Solver++(2M) second).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.core.diffusion import Denoiser
from ddpm.errors import DdpmError
from ddpm.samplers import SAMPLERS, SamplerOptions, count_nfe, get_sampler, sample
from ddpm.samplers import ddim as ddim_mod
from ddpm.samplers import dpmpp_2m as dpmpp_2m_mod
from ddpm.core.schedules import NoiseSchedule, space_timesteps

MU, SD = 0.3, 0.5
SHAPE = (4000, 1, 4, 4)  # 64,000 independent values
N_VALUES = math.prod(SHAPE)
SE_MEAN = SD / math.sqrt(N_VALUES)  # ~0.002
SE_STD = SD / math.sqrt(2 * N_VALUES)  # ~0.0014
OBJECTIVES = ["eps", "x0", "v"]


# ---------------------------------------------------------------- the oracle


def oracle_net(s: NoiseSchedule, objective: str, counter: list[int] | None = None, *, flow: bool = False):
    """The Bayes-optimal network output for data N(MU, SD^2), for each objective:
    eps* = sqrt(1-a)(x - sqrt(a) MU)/(a SD^2 + 1 - a), x0* = E[x0|x_t], v* = sqrt(a) eps* - sqrt(1-a) x0*.
    ``flow``: the exact consistency function instead, the end of the probability-flow ODE from
    x_t, x0 = MU + SD z with z = (x - sqrt(a) MU) / sqrt(a SD^2 + 1 - a) (z is constant along the
    flow), and the eps and v that go with that x0 at x_t."""
    ab = s.alpha_bar.double()
    if flow:
        def flow_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if counter is not None:
                counter[0] += 1
            a = ab[t].reshape(-1, 1, 1, 1)
            xd = x.double()
            x0 = MU + SD * (xd - a.sqrt() * MU) / (a * SD**2 + 1 - a).sqrt()
            eps = (xd - a.sqrt() * x0) / (1 - a).sqrt()
            return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective].float()

        return flow_net

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if counter is not None:
            counter[0] += 1
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = ab[t].reshape(-1, 1, 1, 1)
        xd = x.double()
        den = a * SD**2 + 1 - a
        eps = (1 - a).sqrt() * (xd - a.sqrt() * MU) / den
        x0 = MU + a.sqrt() * SD**2 * (xd - a.sqrt() * MU) / den
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective]
        return out.float()

    return net


def x_T_exact(s: NoiseSchedule, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """x_T from the exact marginal q(x_T) = N(sqrt(a_T) MU, a_T SD^2 + 1 - a_T), so that the
    prior mismatch of a schedule whose a_T is not ~0 does not enter."""
    aT = float(s.alpha_bar.double()[-1])
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    return (math.sqrt(aT) * MU + math.sqrt(aT * SD**2 + 1 - aT) * z).float()


def oracle_affine(a: float) -> tuple[float, float, float, float]:
    """x0*(x) = p0 + k0 x and eps*(x) = pe + ke x at alpha_bar = a."""
    den = a * SD**2 + 1 - a
    k0 = math.sqrt(a) * SD**2 / den
    ke = math.sqrt(1 - a) / den
    return MU - k0 * math.sqrt(a) * MU, k0, -ke * math.sqrt(a) * MU, ke


def chain_moments(ab_full: np.ndarray, ts: list[int], kind: str, *, eta: float = 0.0,
                  variance: str = "beta_tilde") -> tuple[float, float, float, float]:
    """Exact output (mean, var) of DDPM (respaced, Improved DDPM Sec. 4) or DDIM (Eq. 12) under
    the oracle, started at the exact q(x_T); also the affine map x_T -> output (A, b) of the
    noise-free part. All float64, written from the papers' formulas."""
    aT = ab_full[ts[-1]]
    m, v = math.sqrt(aT) * MU, aT * SD**2 + 1 - aT
    A_tot, b_tot = 1.0, 0.0
    for i in reversed(range(len(ts))):
        a = ab_full[ts[i]]
        a_prev = ab_full[ts[i - 1]] if i > 0 else 1.0
        p0, k0, pe, ke = oracle_affine(a)
        if kind == "ddpm":
            beta = 1 - a / a_prev
            c1 = math.sqrt(a_prev) * beta / (1 - a)
            c2 = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            A, b = c1 * k0 + c2, c1 * p0
            if i == 0:
                noise = 0.0
            elif variance == "beta":
                noise = beta
            else:
                noise = (1 - a_prev) / (1 - a) * beta
        else:
            sig2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            c = math.sqrt(max(1 - a_prev - sig2, 0.0))
            A = math.sqrt(a_prev) * k0 + c * ke
            b = math.sqrt(a_prev) * p0 + c * pe
            noise = sig2 if i > 0 else 0.0
        m, v = A * m + b, A * A * v + noise
        A_tot, b_tot = A * A_tot, A * b_tot + b
    return m, v, A_tot, b_tot


def exact_flow(s: NoiseSchedule, x_T: torch.Tensor, t_last: int) -> torch.Tensor:
    """The probability-flow ODE from t=T-1 to t_last, then the final denoising x0*(x): for
    Gaussian data the standardised value z is constant along the flow."""
    ab = s.alpha_bar.double()
    aT, a0 = float(ab[-1]), float(ab[t_last])
    z = (x_T.double() - math.sqrt(aT) * MU) / math.sqrt(aT * SD**2 + 1 - aT)
    return MU + math.sqrt(a0) * SD**2 * z / math.sqrt(a0 * SD**2 + 1 - a0)


def run(name: str, s: NoiseSchedule, steps: int, objective: str = "eps", *, spacing: str = "uniform",
        options: SamplerOptions = SamplerOptions(), seed: int = 1, x_T: torch.Tensor | None = None,
        shape=SHAPE, flow: bool | None = None) -> torch.Tensor:
    flow = name in FLOW_SAMPLERS if flow is None else flow
    d = Denoiser(oracle_net(s, objective, flow=flow), s, objective=objective)
    x_T = x_T_exact(s, shape) if x_T is None else x_T
    return sample(name, d, x_T, steps, spacing=spacing, options=options,
                  generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cosine200() -> NoiseSchedule:
    return NoiseSchedule.create("cosine", 200)


@pytest.fixture(scope="module")
def linear1000() -> NoiseSchedule:
    return NoiseSchedule.create("linear", 1000)


# ---------------------------------------------------------------- 1. every sampler recovers MU, SD

# (steps, std tolerance) per sampler on cosine T=200, measured std in the comment.
# - ddpm, all 200 steps (std 0.491): the ancestral step's Gaussian has variance beta-tilde and
#   ignores coef1^2 Var[x0|x_t], so the std comes out ~0.01 low even with every step; with 50
#   steps it is 0.468 (tested exactly, below).
# - ddim eta=0, 200 steps (0.498): first order in the step; 50 steps give 0.487.
# - dpm++2m, 50 uniform steps (0.507): uniform-in-t steps make the step ratio r = h_prev/h very
#   uneven near t=0, so the multistep extrapolation overshoots (20 steps: 0.534).
# - heun, 20 steps (0.505): second order; 10 steps give 0.515.
# Each tolerance is the discretisation error above plus 4 standard errors of the std (0.0056).
# - consistency: its oracle is the exact consistency function (oracle_net's flow), under which
#   one step from the exact q(x_T) is already exact; 3 steps re-noise exact samples, also exact.
#   Under the posterior-mean oracle it is not a sampler of the data (std 0.346 at 200 steps):
#   it needs a consistency model, and test_consistency_needs_a_consistency_model says so.
ORACLE_CASES = {"ddpm": (200, 0.016), "ddim": (200, 0.008), "dpm++2m": (50, 0.013), "heun": (20, 0.011),
                "consistency": (3, 4 * SE_STD)}
FLOW_SAMPLERS = {"consistency"}  # sampled under the exact consistency function, not E[x0 | x_t]


def test_every_sampler_has_an_oracle_case() -> None:
    assert set(ORACLE_CASES) == set(SAMPLERS)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_oracle_recovers_gaussian(name: str, objective: str, cosine200: NoiseSchedule) -> None:
    steps, std_tol = ORACLE_CASES[name]
    x = run(name, cosine200, steps, objective)
    assert x.shape == SHAPE and x.dtype == torch.float32 and torch.isfinite(x).all()
    mean, std = x.double().mean().item(), x.double().std().item()
    # mean: 4 standard errors (0.008) plus 0.002 of discretisation
    assert abs(mean - MU) < 4 * SE_MEAN + 0.002, (name, objective, mean)
    assert abs(std - SD) < std_tol, (name, objective, std)


def test_consistency_one_step_is_the_flow_map(cosine200: NoiseSchedule) -> None:
    """One step under the exact consistency function lands where the probability-flow ODE does,
    MU + SD z, for each image; under the posterior-mean oracle the sampler is not a sampler of
    the data: one step gives E[x0 | x_T] ~ MU, and even 200 steps keep only 0.69 of SD."""
    x_T = x_T_exact(cosine200, (256, 1, 4, 4))
    aT = float(cosine200.alpha_bar.double()[-1])
    z = (x_T.double() - math.sqrt(aT) * MU) / math.sqrt(aT * SD**2 + 1 - aT)
    # the x0 objective: eps's x0 = (x - sqrt(1 - a) eps) / sqrt(a) loses ~1e-3 in float32 where a_T ~ 0
    torch.testing.assert_close(run("consistency", cosine200, 1, "x0", x_T=x_T).double(), MU + SD * z,
                               atol=1e-5, rtol=1e-5)
    assert run("consistency", cosine200, 1, x_T=x_T, flow=False).std() < 0.05 * SD
    assert abs(run("consistency", cosine200, 200, flow=False).std().item() / SD - 0.69) < 0.02


# ---------------------------------------------------------------- 2. DDPM / DDIM as exact chains


@pytest.mark.parametrize(("sched", "steps", "spacing", "variance"), [
    ("cosine", 200, "uniform", "beta_tilde"),
    ("cosine", 50, "uniform", "beta_tilde"),
    ("cosine", 50, "uniform", "beta"),
    ("linear", 50, "uniform", "beta_tilde"),
    ("linear", 10, "trailing", "beta_tilde"),
    ("linear", 20, "quadratic", "beta"),
])
def test_ddpm_matches_exact_chain(sched: str, steps: int, spacing: str, variance: str,
                                  cosine200: NoiseSchedule, linear1000: NoiseSchedule) -> None:
    s = cosine200 if sched == "cosine" else linear1000
    ts = space_timesteps(s.T, steps, spacing)
    m, v, _, _ = chain_moments(s.alpha_bar.double().numpy(), ts, "ddpm", variance=variance)
    x = run("ddpm", s, steps, spacing=spacing, options=SamplerOptions(variance=variance)).double()
    sd = math.sqrt(v)
    assert abs(x.mean().item() - m) < 4 * sd / math.sqrt(N_VALUES), (x.mean().item(), m)
    assert abs(x.std().item() - sd) < 4 * sd / math.sqrt(2 * N_VALUES), (x.std().item(), sd)


@pytest.mark.parametrize(("sched", "steps", "spacing", "eta"), [
    ("cosine", 50, "uniform", 0.0),
    ("cosine", 20, "quadratic", 0.5),
    ("cosine", 200, "uniform", 1.0),
    ("linear", 50, "uniform", 0.0),
    ("linear", 25, "trailing", 1.0),
])
def test_ddim_matches_exact_chain(sched: str, steps: int, spacing: str, eta: float,
                                  cosine200: NoiseSchedule, linear1000: NoiseSchedule) -> None:
    s = cosine200 if sched == "cosine" else linear1000
    ts = space_timesteps(s.T, steps, spacing)
    m, v, A, b = chain_moments(s.alpha_bar.double().numpy(), ts, "ddim", eta=eta)
    x_T = x_T_exact(s)
    x = run("ddim", s, steps, spacing=spacing, options=SamplerOptions(eta=eta), x_T=x_T).double()
    sd = math.sqrt(v)
    assert abs(x.mean().item() - m) < 4 * sd / math.sqrt(N_VALUES), (x.mean().item(), m)
    assert abs(x.std().item() - sd) < 4 * sd / math.sqrt(2 * N_VALUES), (x.std().item(), sd)
    if eta == 0:  # deterministic: the very map x_T -> A x_T + b, sample by sample
        torch.testing.assert_close(x, A * x_T.double() + b, atol=2e-4, rtol=1e-4)


def test_ddim_eta1_step_has_posterior_variance(cosine200: NoiseSchedule) -> None:
    """One DDIM step with eta = 1 between consecutive timesteps draws from N(mu-tilde, beta-tilde):
    Eq. 16's sigma^2 is the DDPM posterior variance."""
    s = cosine200
    n = 50_000
    for t in [1, 10, 100, 190]:
        x = torch.full((n, 1, 2, 2), 0.4)
        d = Denoiser(oracle_net(s, "eps"), s)
        pred = d(x[:1], torch.tensor([t]))
        steps_seen: list[torch.Tensor] = []
        ddim_mod.sample(d, x, [t - 1, t], options=SamplerOptions(eta=1.0),
                        generator=torch.Generator().manual_seed(t),
                        on_step=lambda i, xt, x0: steps_seen.append(xt.clone()) if i == 0 else None)
        x_prev = steps_seen[0].double()
        var = float(s.posterior_variance[t])
        mean = float(s.posterior_mean_coef1[t] * pred.x0.flatten()[0] + s.posterior_mean_coef2[t] * 0.4)
        m = x_prev.numel()
        assert abs(x_prev.mean().item() - mean) < 5 * math.sqrt(var / m) + 1e-5
        assert abs(x_prev.var().item() - var) < 5 * var * math.sqrt(2 / m)


@pytest.mark.parametrize(("steps", "spacing"), [(200, "uniform"), (20, "uniform"), (15, "trailing")])
def test_ddim_eta1_is_ddpm(steps: int, spacing: str, cosine200: NoiseSchedule) -> None:
    """DDIM with eta = 1 is DDPM ancestral sampling with beta-tilde on the same (respaced) steps.
    Statistically (both match the same exact chain above) and here pathwise: both draw one
    standard normal per step but the last from the generator, so with one seed the paths agree."""
    s = cosine200
    x_T = x_T_exact(s, (256, 1, 4, 4))
    a = run("ddim", s, steps, spacing=spacing, options=SamplerOptions(eta=1.0), x_T=x_T, seed=5)
    b = run("ddpm", s, steps, spacing=spacing, x_T=x_T, seed=5)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- 3. ODE samplers against the exact flow


# the plain method, off the table: DPM-Solver++(2M) with a second-order step into the last level
VARIANTS = {"dpm++2m/2nd": partial(dpmpp_2m_mod.sample, lower_order_final=False)}


def flow_error(name: str, s: NoiseSchedule, steps: int, spacing: str = "uniform", objective: str = "eps") -> float:
    x_T = x_T_exact(s, (256, 1, 4, 4), seed=3)
    if name in VARIANTS:
        d = Denoiser(oracle_net(s, objective), s, objective=objective)
        x = VARIANTS[name](d, x_T, space_timesteps(s.T, steps, spacing), options=SamplerOptions()).double()
    else:
        x = run(name, s, steps, objective, spacing=spacing, x_T=x_T).double()
    exact = exact_flow(s, x_T, space_timesteps(s.T, steps, spacing)[0])
    return ((x - exact) ** 2).mean().sqrt().item() / SD


# (sampler, spacing, coarse steps, fine steps, error bound at the fine steps, least error ratio)
# Measured relative RMS errors on cosine T=200: ddim uniform 25 -> 0.060, 50 -> 0.030 (first
# order: ratio 2); heun uniform 10 -> 0.026, 20 -> 0.0069 (ratio 3.8), trailing 0.019 -> 0.0059;
# dpm++2m/2nd (the plain method) quadratic 10 -> 0.022, 20 -> 0.0018, uniform 50 -> 0.0097,
# 100 -> 0.0023 (ratio 4.3). The table's dpm++2m takes its last step first order: quadratic
# 10 -> 0.0150, 20 -> 0.0015 (ratio 10); uniform 50 -> 0.0020, 100 -> 0.00074, smaller errors
# but ratio 2.7, as that one first-order step dominates on fine grids.
# The maps are deterministic given x_T, so these bounds carry no Monte Carlo error.
FLOW_CASES = [
    ("ddim", "uniform", 25, 50, 0.035, 1.7),
    ("heun", "uniform", 10, 20, 0.012, 3.0),
    ("heun", "trailing", 10, 20, 0.012, 3.0),
    ("dpm++2m/2nd", "quadratic", 10, 20, 0.005, 3.0),
    ("dpm++2m/2nd", "uniform", 50, 100, 0.005, 3.0),
    ("dpm++2m", "quadratic", 10, 20, 0.002, 6.0),
    ("dpm++2m", "uniform", 50, 100, 0.001, 2.2),
]


@pytest.mark.parametrize(("name", "spacing", "coarse", "fine", "bound", "ratio"), FLOW_CASES)
def test_ode_samplers_converge_to_exact_flow(name, spacing, coarse, fine, bound, ratio, cosine200) -> None:
    e_coarse = flow_error(name, cosine200, coarse, spacing)
    e_fine = flow_error(name, cosine200, fine, spacing)
    assert e_fine < bound, (e_coarse, e_fine)
    assert e_coarse / e_fine > ratio, (e_coarse, e_fine)  # the sampler's order of convergence


@pytest.mark.parametrize("name", ["ddim", "heun", "dpm++2m"])
def test_ode_samplers_linear1000(name: str, linear1000: NoiseSchedule) -> None:
    """The seed-style linear schedule with T=1000 (sigma_max ~157 > EDM's 80 for Heun)."""
    steps = {"ddim": 100, "heun": 50, "dpm++2m": 100}[name]
    e = flow_error(name, linear1000, steps)
    # measured: ddim 0.028, heun 0.0030, dpm++2m 0.014
    assert e < {"ddim": 0.033, "heun": 0.006, "dpm++2m": 0.018}[name], e


@pytest.mark.parametrize("name", ["ddim", "heun", "dpm++2m"])
def test_ode_samplers_objectives_agree(name: str, cosine200: NoiseSchedule) -> None:
    """eps, x0 and v parametrisations of the same oracle give the same deterministic samples."""
    x_T = x_T_exact(cosine200, (64, 1, 4, 4))
    outs = [run(name, cosine200, 10, obj, x_T=x_T) for obj in OBJECTIVES]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- API


def small(T: int = 30, sched: str = "linear") -> NoiseSchedule:
    return NoiseSchedule.create(sched, T)


def test_reproducible_with_same_seed() -> None:
    s = small()
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for name, opts in [("ddpm", SamplerOptions()), ("ddim", SamplerOptions(eta=0.7))]:
        a = run(name, s, 10, x_T=x_T, seed=11, options=opts)
        b = run(name, s, 10, x_T=x_T, seed=11, options=opts)
        c = run(name, s, 10, x_T=x_T, seed=12, options=opts)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "heun"])
def test_deterministic_samplers_ignore_generator(name: str) -> None:
    s = small()
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = run(name, s, 7, x_T=x_T, seed=1)
    b = run(name, s, 7, x_T=x_T, seed=2)
    assert torch.equal(a, b)
    # and they do not consume the global RNG either
    torch.manual_seed(0)
    before = torch.get_rng_state()
    run(name, s, 7, x_T=x_T, seed=1)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_on_step_called_once_per_step(name: str) -> None:
    s = small(40)
    calls: list[tuple[int, torch.Size, torch.Size]] = []
    last: list[torch.Tensor] = []

    def cb(i, x, x0):
        calls.append((i, x.shape, x0.shape))
        last[:] = [x.clone()]

    x_T = torch.randn(3, 2, 4, 4)
    d = Denoiser(oracle_net(s, "eps"), s)
    out = sample(name, d, x_T, 9, generator=torch.Generator().manual_seed(0), on_step=cb)
    assert [c[0] for c in calls] == list(range(9))
    assert all(c[1] == x_T.shape and c[2] == x_T.shape for c in calls)
    torch.testing.assert_close(last[0], out)


def counted(s: NoiseSchedule, seen: list[int] | None = None):
    counter = [0]
    base = oracle_net(s, "eps", counter)

    def net(x, t):
        if seen is not None:
            seen.append(int(t[0]))
        return base(x, t)

    return net, counter


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 30])
def test_nfe_table_matches_network_calls(name: str, steps: int) -> None:
    # linear T=30: sigma_max = sqrt((1 - a_T) / a_T) ~ 0.4, Heun corrects every step
    s = small(30)
    net, counter = counted(s)
    sample(name, Denoiser(net, s), torch.randn(2, 1, 2, 2), steps, generator=torch.Generator().manual_seed(0))
    assert counter[0] == count_nfe(name, s.alpha_bar, steps)
    if name == "heun":
        assert count_nfe(name, s.alpha_bar, steps) == 2 * steps - 1


# cosine (sigma_max ~4000 at T=200) and linear T=1000 (~157): Heun skips the correction out
# of sigma > 80, so it makes 2s - 2 calls, and the table must say so
@pytest.mark.parametrize(("sched", "T"), [("cosine", 200), ("linear", 1000)])
def test_heun_nfe_with_large_sigma_max(sched: str, T: int) -> None:
    s = NoiseSchedule.create(sched, T)
    net, counter = counted(s)
    sample("heun", Denoiser(net, s), torch.randn(2, 1, 2, 2), 10)
    assert counter[0] == count_nfe("heun", s.alpha_bar, 10) == 18


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_network_sees_the_spaced_timesteps(name: str) -> None:
    T = 100
    s = small(T)
    for spacing in ["uniform", "trailing", "quadratic"]:
        seen: list[int] = []
        net, _ = counted(s, seen)
        sample(name, Denoiser(net, s), torch.randn(2, 1, 2, 2), 5, spacing=spacing,
               generator=torch.Generator().manual_seed(0))
        ts = space_timesteps(T, 5, spacing)
        if name == "heun":  # evaluation at t_k, then the correction at t_{k+1}
            expect = [t for k, t in enumerate(ts[::-1]) for t in ([t] if k == 4 else [t, ts[::-1][k + 1]])]
        else:
            expect = ts[::-1]
        assert seen == expect, (spacing, seen, expect)


@pytest.mark.parametrize(("name", "default"), [("ddpm", 30), ("ddim", 30), ("dpm++2m", 20), ("heun", 10)])
def test_default_steps(name: str, default: int) -> None:
    s = small(30)  # ddim's default 50 is capped at T
    n: list[int] = []
    sample(name, Denoiser(oracle_net(s, "eps"), s), torch.randn(1, 1, 2, 2),
           generator=torch.Generator().manual_seed(0), on_step=lambda i, x, x0: n.append(i))
    assert len(n) == default
    assert get_sampler(name) is SAMPLERS[name]


def test_ddpm_learned_variance_interpolates() -> None:
    """variance="learned" with v = -1 is beta-tilde and with v = +1 is beta (Improved DDPM Eq. 15)."""
    s = small(50)
    base = oracle_net(s, "eps")
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = {}
    for v in [-1.0, 1.0]:
        net = lambda x, t, v=v: torch.cat([base(x, t), torch.full_like(x, v)], 1)  # noqa: E731
        d = Denoiser(net, s, learn_sigma=True)
        outs[v] = sample("ddpm", d, x_T, 10, options=SamplerOptions(variance="learned"),
                         generator=torch.Generator().manual_seed(4))
    for variance, v in [("beta_tilde", -1.0), ("beta", 1.0)]:
        ref = sample("ddpm", Denoiser(base, s), x_T, 10, options=SamplerOptions(variance=variance),
                     generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(outs[v], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[-1.0], outs[1.0])


def test_bad_input() -> None:
    s = small(20)
    d = Denoiser(oracle_net(s, "eps"), s)
    x = torch.randn(2, 1, 2, 2)
    for name in SAMPLERS:
        with pytest.raises(DdpmError):
            sample(name, d, x, 0)
        with pytest.raises(DdpmError):
            sample(name, d, x, 21)
        with pytest.raises(DdpmError):
            sample(name, d, x, 5, spacing="linear")
    with pytest.raises(DdpmError):
        sample("euler", d, x, 5)
    with pytest.raises(DdpmError):
        get_sampler("DDPM")
    for eta in [-0.1, 1.01]:
        with pytest.raises(DdpmError):
            sample("ddim", d, x, 5, options=SamplerOptions(eta=eta))
    with pytest.raises(DdpmError):
        sample("ddpm", d, x, 5, options=SamplerOptions(variance="learned"))
    sample("ddim", d, x, 20, options=SamplerOptions(eta=1.0))  # the bounds themselves are fine
    sample("ddim", d, x, 1, options=SamplerOptions(eta=0.0))


# ---------------------------------------------------------------- every sampler at its CLI defaults


def cli_sample_config(*argv: str):
    """The SampleConfig `ddpm sample RUN ARGV...` builds from its parser's defaults."""
    from ddpm.cli import _sample_config, build_parser

    return _sample_config(build_parser().parse_args(["sample", "RUN", *argv]))


def affine_moments(name: str, s: NoiseSchedule, cfg) -> tuple[float, float]:
    """(mean, std) of a deterministic sampler's output under the oracle, exactly: the sampler is
    an affine map b + A z of the standardised x_T = m_T + s_T z, so a least-squares line through
    65 points z in [-2, 2] gives b (the mean) and |A| (the std); no Monte Carlo error."""
    aT = float(s.alpha_bar.double()[-1])
    z = torch.linspace(-2, 2, 65, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_T = (math.sqrt(aT) * MU + math.sqrt(aT * SD**2 + 1 - aT) * z).float()
    x = sample(name, Denoiser(oracle_net(s, "eps"), s), x_T, cfg.steps, spacing=cfg.spacing,
               options=SamplerOptions(cfg.eta, cfg.variance)).double().flatten()
    zf = z.flatten()
    slope = ((zf * (x - x.mean())).sum() / (zf * zf).sum()).item()
    assert (x - x.mean() - slope * zf).abs().max() < 1e-2  # affine, up to float32 rounding
    return x.mean().item(), abs(slope)


# The tolerances on std / SD - 1 at each sampler's defaults, from bench/sampler_oracle.py
# (bench/results/samplers/sampler_oracle.json; exact for the deterministic samplers). Measured at the
# defaults over the cases below (worst over the 12 of four schedules x T = 200, 500, 1000):
# - ddim 50 uniform: -1.8% ... -5.6% (linear 1000); quadratic, the oracle's best, -3.6%;
# - dpm++2m 20 uniform, last step first order: -4.7% (linear 1000), within 1.3% elsewhere;
#   quadratic, the oracle's best, +2.0%; the plain method's second-order last step on the uniform
#   grid is +24%, trailing (first order) -9.0%;
# - heun 10 uniform: +1.2% ... +8.7% (linear and sigmoid 1000); trailing -13%, quadratic +19%,
#   first-order last step -14%.
# ddim and dpm++2m default to uniform, not to the oracle's quadratic: on trained networks uniform
# scores the better FD-FMNIST (samplers/__init__.py). Each bound is the measured worst plus 1
# point (float32 rounding is < 0.1%): wide enough to hold on every schedule, tight enough that a
# regression to the rejected alternatives named above (second order into t = 0, trailing for
# dpm++2m and heun, quadratic for heun) fails. The mean is exact for all three (measured |error|
# < 0.003% of SD), bound 0.1% of SD.
STD_TOL = {"ddim": 0.066, "dpm++2m": 0.057, "heun": 0.097}
DEFAULT_CASES = [("linear", 200), ("cosine", 500)] + [(name, 1000) for name in ("linear", "cosine", "quadratic", "sigmoid")]


@pytest.mark.parametrize(("sched", "T"), DEFAULT_CASES)
@pytest.mark.parametrize("name", sorted(STD_TOL))
def test_deterministic_sampler_at_cli_defaults_recovers_gaussian(name: str, sched: str, T: int) -> None:
    cfg = cli_sample_config("--sampler", name)
    mean, std = affine_moments(name, NoiseSchedule.create(sched, T), cfg)
    assert abs(mean - MU) < 1e-3 * SD, (mean, cfg)
    assert abs(std / SD - 1) < STD_TOL[name], (std / SD - 1, cfg)


@pytest.mark.parametrize(("sched", "T"), [("linear", 200), ("cosine", 500)])  # the seed and fast presets
def test_ddpm_at_cli_defaults_recovers_gaussian(sched: str, T: int) -> None:
    """ddpm's default is all T steps: exactly -1.6% (linear 200) and -0.8% (cosine 500) in std
    (beta-tilde ignores Var[x0 | x_t]; the exact chain, section 2). 16,000 draws: standard errors
    0.56% of SD for the std and 0.79% for the mean; bounds = the exact error + 4 of them."""
    cfg = cli_sample_config()
    assert cfg.sampler == "ddpm"
    s = NoiseSchedule.create(sched, T)
    x = sample(cfg.sampler, Denoiser(oracle_net(s, "eps"), s), x_T_exact(s, (1000, 1, 4, 4)), cfg.steps,
               spacing=cfg.spacing, options=SamplerOptions(cfg.eta, cfg.variance),
               generator=torch.Generator().manual_seed(0)).double()
    assert abs(x.mean().item() - MU) < 0.032 * SD, x.mean().item()
    assert abs(x.std().item() / SD - 1) < 0.019 + 0.023, x.std().item() / SD - 1


def test_table_defaults_are_the_measured_ones() -> None:
    """The CLI reads the table (SampleConfig's None), and the table holds the measured choice."""
    cfg = cli_sample_config()
    assert (cfg.spacing, cfg.eta, cfg.variance) == (None, None, None)
    got = {n: (s.default_steps, s.default_spacing) for n, s in SAMPLERS.items()}
    assert got == {"ddpm": (None, "quadratic"), "ddim": (50, "uniform"), "dpm++2m": (20, "uniform"),
                   "heun": (10, "uniform"), "consistency": (4, "trailing")}
    assert SAMPLERS["dpm++2m"].fn.keywords == {"lower_order_final": True}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing", None])
def test_one_step_starts_at_the_noisiest_level(name: str, spacing: str | None) -> None:
    """`--steps 1` takes its step from t = T-1 (pure noise), not t = 0: under the oracle one step
    from x_T ~ q(x_T) gives E[x0 | x_T] ~ MU, not x_T itself."""
    s = small(40, "cosine")
    seen: list[int] = []
    net, _ = counted(s, seen)
    x_T = x_T_exact(s, (64, 1, 2, 2))
    out = sample(name, Denoiser(net, s), x_T, 1, spacing=spacing, generator=torch.Generator().manual_seed(0))
    assert seen == [s.T - 1]
    assert out.std() < 0.05 * x_T.std()


@pytest.mark.parametrize(("sampler", "flag"), [("ddpm", ["--eta", "0.5"]), ("dpm++2m", ["--eta", "0"]),
                                                ("heun", ["--eta", "1"]), ("ddim", ["--variance", "beta"]),
                                                ("dpm++2m", ["--variance", "beta_tilde"])])
def test_cli_refuses_an_option_the_sampler_ignores(sampler, flag, tiny_run, capsys) -> None:
    from ddpm.cli import main

    assert main(["sample", str(tiny_run), "--sampler", sampler, *flag, "--n", "1", "--steps", "2",
                 "--out", str(tiny_run.parent / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag[0] in err[0] and sampler in err[0], err
    assert not (tiny_run.parent / "never" / "samples.npz").exists()


def test_cli_accepts_the_options_its_sampler_reads(tiny_run, tmp_path) -> None:
    from ddpm.cli import main

    for sampler, flag in [("ddim", ["--eta", "0.5"]), ("ddpm", ["--variance", "beta"]), ("ddim", []), ("heun", [])]:
        assert main(["sample", str(tiny_run), "--sampler", sampler, *flag, "--n", "1", "--steps", "2",
                     "--out", str(tmp_path / sampler)]) == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, image_dir) -> Path:
    """A run folder holding one checkpoint of an untrained tiny network (sampling needs no training)."""
    from helpers import tiny_config

    from ddpm.checkpoint import save_checkpoint
    from ddpm.nn import UNet

    cfg = tiny_config(image_dir)
    run = tmp_path_factory.mktemp("run")
    weights = UNet(cfg.model).state_dict()
    save_checkpoint(run, config=cfg, step=1, model=weights, ema=weights, state={})
    return run
