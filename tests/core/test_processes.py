"""The processes table against closed forms, for data N(MU, SD^2) per dimension.

For such data the Bayes-optimal prediction at a level (alpha, sigma) is known:
E[x0 | x_t] = MU + alpha SD^2 (x_t - alpha MU) / (alpha^2 SD^2 + sigma^2), and E[eps | x_t] the rest
of x_t; every objective's optimal output is its target of those (targets are affine in (x0, eps)).
Under that oracle:
- every sampler on every process, at its defaults, recovers MU and SD;
- the probability-flow ODE keeps z = (x_t - alpha MU) / sqrt(alpha^2 SD^2 + sigma^2) constant, so the
  deterministic samplers converge pathwise to MU + SD z (rectified flow's exact velocity field,
  EDM's optimal denoiser D(x; sigma) = MU + SD^2 / (SD^2 + sigma^2) (x - MU));
- each objective's conversions invert its target, and its d out / d x0 is the derivative.
"""
from __future__ import annotations

import math

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.core.diffusion import Denoiser, loss_weight, training_losses
from ddpm.core.noise_levels import NOISE_LEVELS
from ddpm.core.objectives import OBJECTIVES, get_objective
from ddpm.core.processes import PROCESSES, VP, make_process
from ddpm.errors import DdpmError
from ddpm.samplers import SAMPLERS, SamplerOptions, default_steps, plan_for, sample

MU, SD = 0.3, 0.5
SHAPE = (4000, 1, 4, 4)
N = math.prod(SHAPE)
SE_MEAN, SE_STD = SD / math.sqrt(N), SD / math.sqrt(2 * N)
CONFIGS = {"vp": DiffusionConfig(process="vp", schedule="cosine", timesteps=200),
           "edm": DiffusionConfig(process="edm"),
           "rectified-flow": DiffusionConfig(process="rectified-flow")}
FITTING = {p: [o for o, c in OBJECTIVES.items() if p not in c.unfit] for p in PROCESSES}


def level_of(process, net_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) float64 (B,) of the levels the network is told ``net_t``."""
    if isinstance(process, VP):
        return process.table.alpha[net_t], process.table.sigma[net_t]
    t = net_t.double() / 1000 if process.name == "rectified-flow" else None
    if process.name == "edm":
        return torch.ones_like(net_t, dtype=torch.float64), torch.exp(4 * net_t.double())
    return process.alpha_sigma(t)


def oracle(process, objective: str, *, flow: bool = False, counter: list[int] | None = None):
    """The optimal network for data N(MU, SD^2): reads the level from what it is told, undoes the
    input scale, and outputs the objective's target of E[x0 | x_t] (``flow``: of the end of the
    probability-flow ODE from x_t, the exact consistency function)."""
    obj = get_objective(objective)

    def net(x_in: torch.Tensor, net_t: torch.Tensor) -> torch.Tensor:
        if counter is not None:
            counter[0] += 1
        a, s = level_of(process, net_t)
        a4, s4 = (v.reshape(-1, 1, 1, 1) for v in (a, s))
        x = x_in.double() / obj.c_in(a, s).reshape(-1, 1, 1, 1)
        var = a4**2 * SD**2 + s4**2
        if flow:
            x0 = MU + SD * (x - a4 * MU) / var.sqrt()
        else:
            x0 = MU + a4 * SD**2 * (x - a4 * MU) / var
        eps = (x - a4 * x0) / s4
        return obj.target(x0, eps, a, s).float()
    return net


def x_T_exact(process, sampler: str, steps: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """x at the grid's noisiest level, from the exact marginal N(alpha MU, alpha^2 SD^2 + sigma^2)."""
    plan = plan_for(sampler, process, steps)
    a, s = float(plan.levels.alpha[plan.timesteps[-1]]), float(plan.levels.sigma[plan.timesteps[-1]])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a * MU + math.sqrt(a * a * SD**2 + s * s) * z).float(), z


def run(pname: str, sampler: str, objective: str, steps: int | None = None, *, flow: bool = False,
        shape=SHAPE, options: SamplerOptions = SamplerOptions()):
    p = make_process(CONFIGS[pname])
    steps = default_steps(sampler, p) if steps is None else steps
    d = Denoiser(oracle(p, objective, flow=flow), p.table if isinstance(p, VP) else p.plan(1, "uniform").levels,
                 objective=objective, process=p)
    x_T, z = x_T_exact(p, sampler, steps, shape)
    return sample(sampler, d, x_T, steps, options=options, generator=torch.Generator().manual_seed(1)), z


# Std tolerances at each sampler's defaults, per process: the sampler's own discretisation error
# (measured; in the comments) plus 4 standard errors of the std (0.0056). Means: 4 standard errors
# plus 0.003.
# Measured stds: vp (cosine, T = 200) ddpm 0.491, ddim 0.487, dpm++2m 0.501, heun 0.515; edm ddim
# 0.474 (50 Euler steps on the rho-grid, first order), dpm++2m 0.526 (20), heun 0.53 (18); rectified
# flow ddim 0.487, dpm++2m 0.499, heun 0.505.
DEFAULT_STD_TOL = {
    ("vp", "ddpm"): 0.016, ("vp", "ddim"): 0.02, ("vp", "dpm++2m"): 0.012, ("vp", "heun"): 0.022,
    ("edm", "ddim"): 0.033, ("edm", "dpm++2m"): 0.032, ("edm", "heun"): 0.036,
    ("rectified-flow", "ddim"): 0.019, ("rectified-flow", "dpm++2m"): 0.012, ("rectified-flow", "heun"): 0.012,
}
CASES = [(p, s, o) for p in PROCESSES for s in SAMPLERS if s != "consistency"
         and (SAMPLERS[s].processes is None or p in SAMPLERS[s].processes) for o in FITTING[p]]


def test_every_process_and_sampler_has_a_case() -> None:
    assert {(p, s) for p, s, _ in CASES} == set(DEFAULT_STD_TOL)


@pytest.mark.parametrize("pname,sampler,objective", CASES)
def test_oracle_at_defaults_recovers_gaussian(pname: str, sampler: str, objective: str) -> None:
    x, _ = run(pname, sampler, objective)
    assert torch.isfinite(x).all()
    mean, std = x.double().mean().item(), x.double().std().item()
    assert abs(mean - MU) < 4 * SE_MEAN + 0.003, (pname, sampler, objective, mean)
    assert abs(std - SD) < DEFAULT_STD_TOL[(pname, sampler)], (pname, sampler, objective, std)


@pytest.mark.parametrize("pname", list(PROCESSES))
def test_consistency_under_the_flow_map_is_exact(pname: str) -> None:
    """Multistep consistency sampling under the exact consistency function: exact samples."""
    x, z = run(pname, "consistency", FITTING[pname][-1], flow=True)
    assert abs(x.double().mean().item() - MU) < 4 * SE_MEAN + 1e-3
    assert abs(x.double().std().item() - SD) < 4 * SE_STD + 1e-3


@pytest.mark.parametrize("pname", ["edm", "rectified-flow"])
@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("heun", 2), ("dpm++2m", 2)])
def test_ode_samplers_converge_to_the_exact_flow(pname: str, sampler: str, order: int) -> None:
    """Pathwise: each output against MU + SD z (z of its x_T); halving the step shrinks the error
    at the sampler's order (a factor of at least 1.6 for first order, 3 for second)."""
    obj = "velocity" if pname == "rectified-flow" else "edm"
    errs = []
    for steps in (16, 32):
        x, z = run(pname, sampler, obj, steps, shape=(64, 1, 4, 4))
        errs.append((x.double() - (MU + SD * z)).abs().max().item())
    assert errs[1] < (0.15 if order == 1 else 0.03), (pname, sampler, errs)
    assert errs[0] / errs[1] > (1.6 if order == 1 else 3.0), (pname, sampler, errs)


def test_rectified_flow_velocity_is_the_path_derivative() -> None:
    """alpha = 1 - t, sigma = t: d x_t / dt = eps - x0, the velocity objective's target, and the
    exact marginal field for Gaussian data, E[eps - x0 | x_t], moves x_t along z = const."""
    p = make_process(CONFIGS["rectified-flow"])
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    a, s = p.alpha_sigma(t)
    assert torch.equal(a, 1 - t) and torch.equal(s, t)
    x0, eps = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    h = 1e-6
    (a1, s1), (a2, s2) = p.alpha_sigma(t + h), p.alpha_sigma(t - h)
    dxdt = ((a1 - a2).reshape(-1, 1, 1, 1) * x0 + (s1 - s2).reshape(-1, 1, 1, 1) * eps) / (2 * h)
    target = get_objective("velocity").target(x0, eps, a, s)
    torch.testing.assert_close(dxdt, target)
    # the exact field: z constant along x_t = alpha MU + sqrt(alpha^2 SD^2 + sigma^2) z
    z = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    a4, s4 = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    x = a4 * MU + (a4**2 * SD**2 + s4**2).sqrt() * z
    c_in = get_objective("velocity").c_in(a, s).reshape(-1, 1, 1, 1)
    v = oracle(p, "velocity")((x * c_in).float(), 1000 * t.float()).double()
    d_path = -MU + (-(1 - t) * SD**2 + t).reshape(-1, 1, 1, 1) / (a4**2 * SD**2 + s4**2).sqrt() * z
    torch.testing.assert_close(v, d_path, atol=1e-5, rtol=1e-5)


def test_edm_preconditioning_is_table_1_and_the_optimal_denoiser() -> None:
    """EDM Table 1 at alpha = 1: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4; EDM's weighting on F is 1; and the
    optimal F gives D(x; sigma) = MU + SD^2 / (SD^2 + sigma^2) (x - MU)."""
    obj, sd = get_objective("edm", 0.5), 0.5
    sig = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    one = torch.ones_like(sig)
    n, c_skip, c_out = obj._parts(one, sig)
    torch.testing.assert_close(c_skip, sd**2 / (sig**2 + sd**2))
    torch.testing.assert_close(c_out, sig * sd / (sig**2 + sd**2).sqrt())
    torch.testing.assert_close(obj.c_in(one, sig), 1 / (sig**2 + sd**2).sqrt())
    p = make_process(CONFIGS["edm"])
    torch.testing.assert_close(p.net_time(one, one, sig), sig.log() / 4)
    cfg = DiffusionConfig(process="edm", objective="edm", loss_weighting="edm")
    torch.testing.assert_close(loss_weight(cfg, obj, one, sig).double(), one, rtol=1e-6, atol=0)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64) * 3
    F = oracle(p, "edm")((x * obj.c_in(one, sig).reshape(-1, 1, 1, 1)).float(), (sig.log() / 4).float())
    D = obj.x0(F.double(), x, one, sig)
    torch.testing.assert_close(D, MU + SD**2 / (SD**2 + sig.reshape(-1, 1, 1, 1) ** 2) * (x - MU),
                               atol=2e-5, rtol=1e-5)


def test_edm_grid_is_eq_5() -> None:
    """EDM Eq. 5: sigma_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0."""
    p = make_process(CONFIGS["edm"])
    plan = p.plan(18, "uniform")
    i = torch.arange(18, dtype=torch.float64)
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(plan.levels.sigma.flip(0), want)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objectives_invert_their_targets(name: str) -> None:
    """x0(target(x0, eps)) = x0 at random levels (and at rectified flow's alpha = 0 where the
    objective is defined there), and out_per_x0 is |d target / d x0| at fixed x_t."""
    obj = get_objective(name)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    s = torch.rand(6, generator=g, dtype=torch.float64) * 2 + 0.05
    if "rectified-flow" not in obj.unfit:
        a, s = torch.cat([a, a.new_zeros(1)]), torch.cat([s, s.new_ones(1)])
    x0 = torch.randn(len(a), 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(len(a), 1, 3, 3, generator=g, dtype=torch.float64)
    x_t = a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * eps
    torch.testing.assert_close(obj.x0(obj.target(x0, eps, a, s), x_t, a, s), x0)
    # at fixed x_t, eps = (x_t - a x0) / s: the target's change per unit change of x0
    h = 1e-6
    moved = obj.target(x0 + h, (x_t - a.reshape(-1, 1, 1, 1) * (x0 + h)) / s.reshape(-1, 1, 1, 1), a, s)
    slope = ((moved - obj.target(x0, eps, a, s)) / h).abs().flatten(1).mean(1)
    torch.testing.assert_close(slope, obj.out_per_x0(a, s), rtol=1e-4, atol=1e-6)


def test_min_snr_weights_are_todays_for_vp() -> None:
    """min-SNR stated in x0 units gives Hang et al.'s min(SNR, g) / SNR for eps, / (SNR + 1) for v."""
    p = make_process(CONFIGS["vp"])
    t = torch.arange(0, 200, 7)
    a, s = p.table.alpha[t], p.table.sigma[t]
    ab = p.schedule.alpha_bar[t]
    snr = ab / (1 - ab)
    for name, want in (("eps", snr.clamp(max=5) / snr), ("v", snr.clamp(max=5) / (snr + 1)), ("x0", snr.clamp(max=5))):
        cfg = DiffusionConfig(objective=name, loss_weighting="min_snr")
        torch.testing.assert_close(loss_weight(cfg, get_objective(name), a, s), want.float())


def test_noise_level_draws_follow_their_laws() -> None:
    """lognormal on edm: ln sigma ~ N(-1.2, 1.2^2) (inside [s_min, s_max]); logit-normal on rectified
    flow: logit t ~ N(0, 1); uniform on vp: torch.randint's stream, as runs always drew it."""
    g = torch.Generator().manual_seed(0)
    edm = make_process(DiffusionConfig(process="edm"))
    d = edm.draw(200_000, "lognormal", generator=g)
    ls = torch.log(d.sigma)
    assert abs(ls.mean().item() + 1.2) < 0.01 and abs(ls.std().item() - 1.2) < 0.01
    rf = make_process(DiffusionConfig(process="rectified-flow"))
    d = rf.draw(200_000, "logit-normal", generator=torch.Generator().manual_seed(1))
    lt = torch.logit(d.t)
    assert abs(lt.mean().item()) < 0.01 and abs(lt.std().item() - 1) < 0.01
    torch.testing.assert_close(d.alpha, 1 - d.t)
    vp = make_process(CONFIGS["vp"])
    idx = vp.draw(64, "uniform", generator=torch.Generator().manual_seed(2)).index
    assert torch.equal(idx, torch.randint(0, 200, (64,), generator=torch.Generator().manual_seed(2)))
    assert set(NOISE_LEVELS) == {"uniform", "lognormal", "logit-normal"}


@pytest.mark.parametrize("pname", list(PROCESSES))
def test_training_loss_is_zero_at_the_oracle_only_in_expectation(pname: str) -> None:
    """The training loss at the oracle is the irreducible one: for velocity and eps-like targets
    on Gaussian data it equals E Var[target | x_t], computed here in closed form (l2, unweighted)."""
    obj_name = {"vp": "eps", "edm": "edm", "rectified-flow": "velocity"}[pname]
    cfg = DiffusionConfig(**{**CONFIGS[pname].__dict__, "objective": obj_name, "loss": "l2"})
    p = make_process(cfg)
    g = torch.Generator().manual_seed(3)
    x0 = MU + SD * torch.randn(20_000, 1, 2, 2, generator=g)
    draw = p.draw(len(x0), "uniform", generator=g)
    t_fixed = draw._replace(alpha=draw.alpha[:1].expand(len(x0)).clone(), sigma=draw.sigma[:1].expand(len(x0)).clone(),
                            net_t=draw.net_t[:1].expand(len(x0)).clone(),
                            index=None if draw.index is None else draw.index[:1].expand(len(x0)).clone())
    noise = torch.randn(x0.shape, generator=g)
    terms = training_losses(oracle(p, obj_name), getattr(p, "table", None), cfg, x0, t_fixed, noise,
                            objective=get_objective(obj_name))
    a, s = float(t_fixed.alpha[0]), float(t_fixed.sigma[0])
    var_x0 = SD**2 * s * s / (a * a * SD**2 + s * s)  # Var[x0 | x_t]
    k = float(get_objective(obj_name).out_per_x0(t_fixed.alpha[:1], t_fixed.sigma[:1])[0])
    assert abs(terms.loss.item() - k * k * var_x0) < 0.03 * k * k * var_x0 + 1e-6, (pname, terms.loss.item())


def test_bad_names_and_fits_are_one_line() -> None:
    with pytest.raises(DdpmError, match="unknown process"):
        make_process(DiffusionConfig(process="ve"))  # type: ignore[arg-type]
    with pytest.raises(DdpmError, match="does not fit the rectified-flow"):
        get_objective("eps", process="rectified-flow")
    with pytest.raises(DdpmError, match="unknown objective"):
        get_objective("score")
    with pytest.raises(DdpmError, match="defined on the vp process only"):
        plan_for("ddpm", make_process(CONFIGS["edm"]))
    with pytest.raises(DdpmError, match="edm needs"):
        make_process(DiffusionConfig(process="edm", sigma_min=5.0, sigma_max=1.0))


@pytest.mark.parametrize("pname", list(PROCESSES))
def test_ddim_eta_one_is_a_sampler_of_the_data_on_every_process(pname: str) -> None:
    """DDIM with eta = 1 (the posterior variance of q(x_prev | x_t, x0) in alpha and sigma), the
    stochastic sampler off the discrete chain: at 200 steps it recovers MU and SD as the
    ancestral sampler does on vp (std 0.487 on edm, 0.493 on rectified flow, 0.491 on vp)."""
    x, _ = run(pname, "ddim", FITTING[pname][-1], 200, options=SamplerOptions(eta=1.0))
    assert abs(x.double().mean().item() - MU) < 4 * SE_MEAN + 0.003
    assert abs(x.double().std().item() - SD) < 0.016


@pytest.mark.parametrize("pname", list(PROCESSES))
def test_generate_starts_from_the_process_prior(pname: str) -> None:
    """Through ``generate`` (x_T drawn there, at the top level's sqrt(alpha^2 + sigma^2): EDM's
    sigma_max, 1 elsewhere), the oracle's uint8 images have the spread of N(MU, SD^2) quantised
    as images are; x_T drawn at unit scale on EDM collapses every image onto the mean."""
    from pathlib import Path

    from ddpm.config import DataConfig, ModelConfig, RunConfig
    from ddpm.core.schedules import make_schedule
    from ddpm.data.readers import from_model_range
    from ddpm.sampling.generate import LoadedModel, SampleConfig, generate

    obj = {"vp": "eps", "edm": "edm", "rectified-flow": "velocity"}[pname]
    d = DiffusionConfig(**{**CONFIGS[pname].__dict__, "objective": obj})
    cfg = RunConfig(model=ModelConfig(channels=1), diffusion=d, data=DataConfig(image_size=4, channels=1))
    p = make_process(d)
    net = oracle(p, obj)

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            return net(x, t)

    lm = LoadedModel(Oracle(), make_schedule(cfg), cfg, 0, Path("."))
    sampler = "ddim" if pname == "vp" else "heun"
    images = generate(lm, SampleConfig(sampler=sampler, steps=64 if pname == "vp" else 32, n=2000, batch_size=500,
                                       clip="none")).images.double()
    want = from_model_range(MU + SD * torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(5))).double()
    assert abs(images.mean().item() - want.mean().item()) < 1.5, (images.mean(), want.mean())
    assert abs(images.std().item() - want.std().item()) < 0.04 * want.std().item(), (images.std(), want.std())
