"""Prediction targets, loss weighting, offset noise and learned variances, end to end: a tiny
U-Net trained a few dozen steps through ``ddpm.train.train`` on images the test makes, then
every sampler from the checkpoint; and the exact eps/x0/v round trip through ``interpret``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from ddpm.data import to_model_range
from ddpm.core.diffusion import interpret, q_sample, target_for, training_losses
from ddpm.errors import DdpmError
from ddpm.evaluation.likelihood import nll_bits_per_dim
from ddpm.nn import UNet
from ddpm.samplers import SAMPLERS
from ddpm.samplers import sample as run_sampler
from ddpm.sampling import SampleConfig, generate, load_model
from ddpm.core.schedules import NoiseSchedule
from ddpm.training.train import train

T = 50
STEPS = 30


def make_images(n: int = 64) -> torch.Tensor:
    """Bright rectangles at 16 positions on a black 8x8 background, uint8 (n, 1, 8, 8)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    for i in range(n):
        r, c = i % 4, (i // 4) % 4
        x[i, 0, 1 + r:5 + r, 1 + c:4 + c] = 200 + int(torch.randint(0, 55, (1,), generator=g))
    return x


def tiny_config(objective: str, *, weighting: str = "uniform", offset: float = 0.0,
                learn_sigma: bool = False, t_sampling: str = "uniform", blocks: int = 2) -> RunConfig:
    return RunConfig(
        model=ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=1, attn_dim_head=8, learn_sigma=learn_sigma,
                          blocks_per_level=blocks),
        diffusion=DiffusionConfig(timesteps=T, schedule="cosine", loss="l2", objective=objective,
                                  loss_weighting=weighting, offset_noise=offset, t_sampling=t_sampling),
        data=DataConfig(image_size=8),
        train=TrainConfig(batch_size=16, lr=3e-3, epochs=None, max_steps=STEPS, log_every=1, sample_every=0,
                          checkpoint_every=0, ema_decay=0.9, seed=0),
        preset="tiny",
    )


def fixed_batch_loss(net: torch.nn.Module, cfg: RunConfig) -> float:
    """The training loss on one fixed set of (x0, t, noise): 64 images x 4 timesteps each."""
    g = torch.Generator().manual_seed(123)
    x0 = to_model_range(make_images()).repeat(4, 1, 1, 1)
    t = torch.randint(0, T, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    s = NoiseSchedule.create(cfg.diffusion.schedule, T)
    with torch.no_grad():
        terms = training_losses(net, s, cfg.diffusion, x0, t, noise, learn_sigma=cfg.model.learn_sigma)
    return float(terms.loss)


def initial_net(cfg: RunConfig) -> UNet:
    torch.manual_seed(cfg.train.seed)  # as the Trainer does before building the network
    return UNet(cfg.model).eval()


def train_tiny(cfg: RunConfig, run: Path) -> list[dict]:
    res = train(cfg, run, data=make_images(), progress=False, device="cpu", log=lambda _: None)
    assert res.step == STEPS
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def check_all_samplers(run: Path, learn_sigma: bool) -> None:
    model = load_model(run)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for name in SAMPLERS:
        steps = 3 if name == "heun" else 5
        x = run_sampler(name, model.denoiser("clip"), x_T, steps, generator=torch.Generator().manual_seed(2))
        assert x.shape == x_T.shape and torch.isfinite(x).all(), name
        s = generate(model, SampleConfig(sampler=name, steps=steps, n=3, batch_size=2))
        assert s.images.shape == (3, 1, 8, 8) and s.images.dtype == torch.uint8 and s.steps == steps
    variance = SampleConfig(sampler="ddpm", steps=10, n=2, variance="learned")
    if learn_sigma:
        assert generate(model, variance).images.shape == (2, 1, 8, 8)
    else:
        with pytest.raises(DdpmError, match="learn"):
            generate(model, variance)


@pytest.mark.parametrize(("objective", "weighting", "offset"), [
    ("eps", "uniform", 0.0), ("x0", "uniform", 0.0), ("v", "uniform", 0.0),
    ("eps", "min_snr", 0.1), ("x0", "min_snr", 0.1), ("v", "min_snr", 0.1),
])
def test_train_each_objective_then_sample(tmp_path: Path, objective: str, weighting: str, offset: float) -> None:
    cfg = tiny_config(objective, weighting=weighting, offset=offset)
    logs = train_tiny(cfg, tmp_path / "run")
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    before = fixed_batch_loss(initial_net(cfg), cfg)
    after = fixed_batch_loss(load_model(tmp_path / "run", use_ema=False).net, cfg)
    assert after < 0.9 * before, (before, after)  # ~0.7 (eps, v) and ~0.1 (x0) with these seeds
    if weighting == "uniform":  # the weighting does not change what the samplers see
        check_all_samplers(tmp_path / "run", learn_sigma=False)


def test_train_lognormal_t_one_block_then_sample(tmp_path: Path) -> None:
    """EDM's noise levels and one block per level: the loss falls and every sampler runs."""
    cfg = tiny_config("v", t_sampling="lognormal", blocks=1)
    logs = train_tiny(cfg, tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    before = fixed_batch_loss(initial_net(cfg), cfg)
    after = fixed_batch_loss(load_model(tmp_path / "run", use_ema=False).net, cfg)
    assert after < 0.9 * before, (before, after)
    check_all_samplers(tmp_path / "run", learn_sigma=False)


def test_learned_variance_hybrid_loss(tmp_path: Path) -> None:
    """Improved DDPM: the network outputs 2C channels, the loss is L_simple + lambda T L_vlb
    (present and finite), and ancestral sampling and the NLL use the learned variances."""
    cfg = tiny_config("eps", learn_sigma=True)
    logs = train_tiny(cfg, tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    model = load_model(tmp_path / "run")
    assert model.net(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])).shape == (2, 2, 8, 8)
    assert fixed_batch_loss(model.net, cfg) < 0.9 * fixed_batch_loss(initial_net(cfg), cfg)

    g = torch.Generator().manual_seed(5)
    x0 = to_model_range(make_images(16))
    t = torch.randint(0, T, (16,), generator=g)
    with torch.no_grad():
        terms = training_losses(model.net, model.schedule, cfg.diffusion, x0, t, torch.randn(x0.shape, generator=g),
                                learn_sigma=True)
    assert terms.vlb is not None and terms.vlb.shape == (16,) and torch.isfinite(terms.vlb).all()
    assert (terms.vlb >= 0).all()
    expect = terms.per_sample.mean() + cfg.diffusion.vlb_weight * T * terms.vlb.mean()
    torch.testing.assert_close(terms.loss, expect)

    check_all_samplers(tmp_path / "run", learn_sigma=True)
    r = nll_bits_per_dim(model, make_images(4), timesteps=5)
    assert r.variance == "learned" and r.bits_per_dim > 0


# ---------------------------------------------------------------- eps / x0 / v


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_objectives_round_trip_through_interpret(schedule: str, learn_sigma: bool) -> None:
    """The exact target of each objective, read back by ``interpret``, gives the same (eps, x0)
    for eps, x0 and v, equal to the truth. Tolerances scale with the conditioning: recovering eps
    from x0 divides by sqrt(1/a - 1), recovering x0 from eps multiplies by it."""
    s = NoiseSchedule.create(schedule, 200)
    g = torch.Generator().manual_seed(7)
    n = 200
    x0 = torch.rand(n, 1, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.arange(n)
    x_t = q_sample(s, x0, t, eps)
    v_chan = torch.rand(x0.shape, generator=g) * 2 - 1
    k = (1 / s.alpha_bar.double() - 1).sqrt()[t].reshape(-1, 1, 1, 1)
    got = {}
    for objective in ["eps", "x0", "v"]:
        out = target_for(objective, s, x0, t, eps)
        if learn_sigma:
            out = torch.cat([out, v_chan], 1)
        pred = interpret(s, out, x_t, t, objective=objective, learn_sigma=learn_sigma)
        if learn_sigma:
            torch.testing.assert_close(pred.var_frac, (v_chan + 1) / 2)
        else:
            assert pred.var_frac is None
        got[objective] = pred
        # float32 error ~1e-6 relative, amplified by k (x0 from eps) or 1/k (eps from x0)
        tol = 1e-5 * (1 + k.float() + 1 / k.float())
        assert ((pred.x0 - x0).abs() <= tol).all(), objective
        assert ((pred.eps - eps).abs() <= tol).all(), objective
    # the exact target's own quantity comes back exactly
    assert torch.equal(got["eps"].eps, eps) and torch.equal(got["x0"].x0, x0)
