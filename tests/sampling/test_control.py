"""Class-conditional models and classifier-free guidance.

The core check is a Gaussian oracle per class: three classes, each N(MU_c, SD^2) per pixel
with its own mean vector, so both the conditional denoisers and the unconditional one (of the
mixture) are known exactly, and every sampler can be checked without training anything.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, preset
from ddpm.core.diffusion import Denoiser
from ddpm.core.schedules import NoiseSchedule
from ddpm.data import FASHION_MNIST_CLASSES, class_names, load_labeled_dataset
from ddpm.errors import DdpmError
from ddpm.evaluation.control import class_agreement
from ddpm.nn import build_network
from ddpm.samplers import SAMPLERS, SamplerOptions, sample
from ddpm.samplers.base import ImageGenerators, _splitmix64, image_seed
from ddpm.sampling.generate import LoadedModel, generate
from ddpm.sampling.guidance import class_labels, resolve_classes
from ddpm.training import train as train_mod
from ddpm.training import trainer as trainer_mod
from helpers import labelled_folder, tiny_config, write_config

K, D, SD = 3, 4, 0.3
MUS = torch.zeros(K, D, dtype=torch.float64)
MUS[0, 0], MUS[1, 1], MUS[2, 2] = 0.6, 0.6, 0.6  # a triangle: each class has two others to leave
# (steps) per sampler: as in test_samplers' oracle cases, where the discretisation error is small
# consistency: under the per-class consistency function (oracle_net's flow) one step is exact
STEPS = {"ddpm": 200, "ddim": 200, "dpm++2m": 50, "heun": 20, "consistency": 1}
FLOW_SAMPLERS = {"consistency"}
N_PER_CLASS = 1500


# ---------------------------------------------------------------- the oracle


def oracle_net(s: NoiseSchedule, calls: list[int] | None = None, flow: bool = False):
    """E[eps | x_t, c] for N(MU_c, SD^2 I), and for the null class c = K the mixture's
    E[eps | x_t] = sum_c p(c | x_t) E[eps | x_t, c] (equal class weights).
    ``flow``: for a class, the eps of its exact consistency function instead (the end of the
    probability-flow ODE, x0 = MU_c + SD (x - sqrt(a) MU_c) / sqrt(a SD^2 + 1 - a)); the null
    class keeps the mixture's E[eps | x_t], as a mixture's flow map has no closed form."""
    ab = s.alpha_bar.double()

    def net(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if calls is not None:
            calls.append(x.shape[0])
        b = x.shape[0]
        a = ab[t].reshape(b, 1, 1)
        xd = x.double().reshape(b, 1, D)
        var = a * SD**2 + 1 - a
        diff = xd - a.sqrt() * MUS  # (B, K, D)
        eps_c = (1 - a).sqrt() * diff / var
        post_eps = eps_c
        if flow:  # x - sqrt(a) x0 = diff - sqrt(a) SD diff / sqrt(var), over sqrt(1 - a)
            eps_c = (1 - a.sqrt() * SD / var.sqrt()) * diff / (1 - a).sqrt()
        post = torch.softmax(-(diff**2).sum(-1) / (2 * var[:, :, 0]), dim=1)  # p(c | x_t), (B, K)
        eps_u = (post[:, :, None] * post_eps).sum(1)
        cond = torch.full((b,), K) if cond is None else cond
        rows = torch.arange(b)
        eps = torch.where((cond == K)[:, None], eps_u, eps_c[rows, cond.clamp(max=K - 1)])
        return eps.reshape(x.shape).float()

    return net


@pytest.fixture(scope="module")
def cosine200() -> NoiseSchedule:
    return NoiseSchedule.create("cosine", 200)


def draw(name: str, s: NoiseSchedule, cond: torch.Tensor | None, w: float = 0.0, n: int | None = None,
         steps: int | None = None) -> torch.Tensor:
    """Samples of the oracle with one sampler, (N, D) in float64 (cond None: unconditioned)."""
    n = len(cond) if n is None else n
    d = Denoiser(oracle_net(s, flow=name in FLOW_SAMPLERS), s, num_classes=K).conditioned(cond, w)
    x_T = torch.randn((n, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    opts = SamplerOptions(eta=0.0) if name == "ddim" else SamplerOptions()
    return sample(name, d, x_T, steps or STEPS[name], options=opts, generator=torch.Generator().manual_seed(1)
                  ).double().reshape(n, D)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_zero_draws_each_class_gaussian(name: str, cosine200: NoiseSchedule) -> None:
    assert set(STEPS) == set(SAMPLERS)
    cond = torch.arange(K).repeat_interleave(N_PER_CLASS)
    x = draw(name, cosine200, cond)
    se_mean, se_std = SD / math.sqrt(N_PER_CLASS), SD / math.sqrt(2 * N_PER_CLASS * D)
    for c in range(K):
        xc = x[cond == c]
        mean = xc.mean(0)
        std = (xc - mean).pow(2).mean().sqrt()  # pooled over the D pixels
        assert (mean - MUS[c]).abs().max() < 4 * se_mean + 0.01, (name, c, mean)
        # discretisation at these steps is under 2% of SD (test_samplers' measurements)
        assert abs(std - SD) < 4 * se_std + 0.02 * SD, (name, c, std)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_null_class_draws_the_mixture(name: str, cosine200: NoiseSchedule) -> None:
    if name in FLOW_SAMPLERS:
        pytest.skip("a mixture's consistency function has no closed form; the oracle's null class is E[x0 | x_t]")
    n = 3 * N_PER_CLASS
    x = draw(name, cosine200, torch.full((n,), K))
    nearest = torch.cdist(x, MUS).argmin(1)
    frac = torch.bincount(nearest, minlength=K).double() / n
    assert (frac - 1 / K).abs().max() < 4 * math.sqrt(2 / 9 / n), frac  # each class a third
    assert (x.mean(0) - MUS.mean(0)).abs().max() < 4 * 0.35 / math.sqrt(n), x.mean(0)
    # unconditioned (cond=None) is the same null class, bit for bit
    assert torch.equal(draw(name, cosine200, None, n=20, steps=10), draw(name, cosine200, torch.full((20,), K), steps=10))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_moves_away_from_the_other_classes(name: str, cosine200: NoiseSchedule) -> None:
    cond = torch.zeros(400, dtype=torch.long)
    dist = []
    for w in (0.0, 0.5, 1.0, 2.0, 4.0):
        m = draw(name, cosine200, cond, w, steps=min(STEPS[name], 50)).mean(0)  # the same seeds: only w changes
        dist.append(float(torch.cdist(m[None], MUS[1:]).min()))
    assert all(b > a + 0.005 for a, b in zip(dist, dist[1:])), (name, dist)


# ---------------------------------------------------------------- the denoiser's guidance


def counting(s: NoiseSchedule) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, oracle_net(s, calls)


def test_guidance_zero_is_the_plain_conditional_pass(cosine200: NoiseSchedule) -> None:
    calls, net = counting(cosine200)
    x, t, cond = torch.randn(6, 1, 2, 2), torch.full((6,), 120), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = Denoiser(net, cosine200, num_classes=K)
    ref = net(x, cosine200.timesteps[t], cond)
    calls.clear()
    p0 = plain.conditioned(cond, 0.0)(x, t)
    assert calls == [6]  # no null pass
    assert torch.equal(p0.eps, ref)
    p2 = plain.conditioned(cond, 2.0)(x, t)
    assert calls == [6, 12]  # conditional and null in one batch of 2B
    eps_u = net(x, cosine200.timesteps[t], torch.full((6,), K))
    torch.testing.assert_close(p2.eps, ref + 2.0 * (ref - eps_u), rtol=1e-6, atol=1e-6)


def test_guidance_interval_in_sigma(cosine200: NoiseSchedule) -> None:
    calls, net = counting(cosine200)
    ab = cosine200.alpha_bar
    sigma = ((1 - ab) / ab).sqrt()
    lo, hi = 0.5, 2.0
    d = Denoiser(net, cosine200, num_classes=K).conditioned(torch.zeros(4, dtype=torch.long), 3.0, (lo, hi))
    plain = Denoiser(net, cosine200, num_classes=K).conditioned(torch.zeros(4, dtype=torch.long), 0.0)
    x = torch.randn(4, 1, 2, 2)
    for t in (5, 100, 190):
        tt = torch.full((4,), t)
        calls.clear()
        out = d(x, tt).eps
        inside = lo <= float(sigma[t]) <= hi
        assert calls == ([8] if inside else [4]), (t, float(sigma[t]))
        assert torch.equal(out, plain(x, tt).eps) != inside


def test_guidance_is_the_same_for_every_objective(cosine200: NoiseSchedule) -> None:
    """eps, x0 and v are affine in each other at fixed x_t: guiding any of them guides eps alike."""
    s, base = cosine200, oracle_net(cosine200)
    ab = s.alpha_bar

    def as_objective(objective: str):
        def net(x, t, cond=None):
            eps = base(x, t, cond).double()
            a = ab[t].double().reshape(-1, 1, 1, 1)
            x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
            return {"x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective].float()
        return net

    x, t, cond = torch.randn(5, 1, 2, 2), torch.full((5,), 60), torch.tensor([0, 1, 2, 1, 0])
    ref = Denoiser(base, s, num_classes=K).conditioned(cond, 1.5)(x, t).eps
    for objective in ("x0", "v"):
        out = Denoiser(as_objective(objective), s, objective=objective, num_classes=K).conditioned(cond, 1.5)(x, t)
        torch.testing.assert_close(out.eps, ref, rtol=1e-4, atol=1e-4)


def test_learned_variance_guides_the_mean_keeps_the_conditional_variance(cosine200: NoiseSchedule) -> None:
    base = oracle_net(cosine200)

    def net(x, t, cond=None):  # the variance channel says which class the pass was
        eps = base(x, t, cond)
        c = torch.full((x.shape[0],), K) if cond is None else cond
        return torch.cat([eps, (c.float() / K).reshape(-1, 1, 1, 1).expand_as(eps)], dim=1)

    x, t, cond = torch.randn(3, 1, 2, 2), torch.full((3,), 80), torch.tensor([0, 1, 2])
    d = Denoiser(net, cosine200, learn_sigma=True, num_classes=K)
    g = d.conditioned(cond, 2.0)(x, t)
    plain = d.conditioned(cond, 0.0)(x, t)
    torch.testing.assert_close(g.var_frac, plain.var_frac)  # the conditional variance, not the null's
    eps_u = base(x, cosine200.timesteps[t], torch.full((3,), K))
    torch.testing.assert_close(g.eps, plain.eps + 2.0 * (plain.eps - eps_u), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- per-image seeds


def oracle_model(s: NoiseSchedule) -> LoadedModel:
    cfg = RunConfig(model=ModelConfig(num_classes=K), diffusion=DiffusionConfig(timesteps=s.T, schedule="cosine"),
                    data=DataConfig(image_size=2, class_names=("alpha", "beta", "gamma")))
    return LoadedModel(oracle_net(s), s, cfg, 0, Path("oracle"))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_image_depends_only_on_seed_and_index(name: str, cosine200: NoiseSchedule) -> None:
    """Every sampler (ddim with eta > 0 too): batch size and --n never change a picture."""
    model = oracle_model(cosine200)
    extra = {"eta": 1.0} if name == "ddim" else {}
    base = SampleConfig(sampler=name, steps=8, n=8, seed=3, clip="none", classes="beta", guidance=1.0, **extra)
    ref = generate(model, base).images
    for bs in (1, 3, 8):
        assert torch.equal(generate(model, replace(base, batch_size=bs)).images, ref), (name, bs)
    assert torch.equal(generate(model, replace(base, n=5, batch_size=2)).images, ref[:5])
    assert not torch.equal(ref[0], ref[1])
    # another seed shares no image (image i is a hash of (seed, i), not seed + i)
    other = generate(model, replace(base, seed=4)).images
    assert not any(torch.equal(a, b) for a in other for b in ref)



@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guided_steps_count_two_evaluations(name: str, cosine200: NoiseSchedule) -> None:
    """The null pass is a network evaluation too: guided everywhere doubles the reported NFE,
    w = 0 does not, and an interval counts only the guided steps."""
    model = oracle_model(cosine200)
    base = SampleConfig(sampler=name, steps=6, n=3, clip="none", classes="beta", guidance=0.0)
    plain = generate(model, base).nfe
    assert generate(model, replace(base, guidance=2.0)).nfe == 2 * plain
    part = generate(model, replace(base, guidance=2.0, guidance_interval=(0.0, 1.0))).nfe
    assert plain < part < 2 * plain

def test_image_generators_draw_per_row() -> None:
    g = ImageGenerators.for_images(10, 2, 3)
    x = g.randn((3, 1, 2, 2))
    for i in range(3):
        want = torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(image_seed(10, 2 + i)))
        assert torch.equal(x[i], want)
    with pytest.raises(ValueError):
        g.randn((2, 1, 2, 2))


def test_image_seeds_are_a_hash_of_seed_and_index() -> None:
    """SplitMix64's published first outputs, and no two (seed, image) pairs sharing a generator
    seed: under seed + i, --seed 1 was --seed 0's images shifted by one."""
    assert _splitmix64(0) == 0xE220A8397B1DCDAF and _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    seeds = [image_seed(s, i) for s in range(64) for i in range(512)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds)  # torch.Generator.manual_seed takes any of them
    assert 0 <= image_seed(2**62, 10**7) < 2**63


# ---------------------------------------------------------------- classes by name


def test_class_names_and_layout(cosine200: NoiseSchedule) -> None:
    cfg = replace(preset("fast-cond"), data=DataConfig(class_names=FASHION_MNIST_CLASSES))
    assert resolve_classes("sneaker", cfg) == (7,)
    assert resolve_classes("Ankle-Boot, t-shirt,3", cfg) == (9, 0, 3)
    assert resolve_classes("all", cfg) == tuple(range(10))
    assert resolve_classes(None, cfg) is None
    for bad in ("boots", "10", "-1", " , "):
        with pytest.raises(DdpmError):
            resolve_classes(bad, cfg)
    with pytest.raises(DdpmError, match="unconditional"):
        resolve_classes("sneaker", preset("fast"))
    assert class_labels((7, 2), 5).tolist() == [7, 7, 7, 2, 2, 2]  # rounded up, class by class
    s = generate(oracle_model(cosine200), SampleConfig(sampler="ddim", steps=3, n=4, classes="all"))
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2] and s.per_class == 2 and len(s.images) == 6


def test_class_agreement_counts_the_asked_class() -> None:
    logits = torch.eye(3)[[0, 1, 1, 2, 2, 2]] * 5  # predictions 0 1 1 2 2 2
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert class_agreement(logits, labels, (0, 1, 2)) == {0: 0.5, 1: 0.5, 2: 1.0}
    assert class_agreement(logits, labels, (1, 2, 2)) == {0: 0.5, 1: 0.5, 2: 1.0}


# ---------------------------------------------------------------- the network and the data


def test_unconditional_unet_unchanged_and_conditional_embedding() -> None:
    cfg = ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=1, attn_dim_head=8)
    torch.manual_seed(0)
    plain = build_network(cfg)
    assert not any("class_emb" in k for k in plain.state_dict())  # old checkpoints load as they were
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    assert torch.equal(plain(x, t), plain(x, t, torch.tensor([1, 0])))
    cond = build_network(replace(cfg, num_classes=4))
    assert cond.class_emb.num_embeddings == 5  # four classes and the null class
    with torch.no_grad():
        cond.class_emb.weight.normal_()
        assert torch.equal(cond(x, t), cond(x, t, torch.tensor([4, 4])))  # None is the null class
        assert not torch.allclose(cond(x, t, torch.tensor([0, 0])), cond(x, t, torch.tensor([1, 1])))
    assert preset("fast-cond") == replace(preset("fast"), model=replace(preset("fast").model, num_classes=10,
                                                                        class_emb_std=1.0),
                                          preset="fast-cond")


def test_folder_labels_from_first_level_subfolders(tmp_path: Path) -> None:
    root = labelled_folder(tmp_path / "data", n=3)
    (root / "Bag" / "deeper").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "Bag" / "deeper" / "x.png")
    lab = load_labeled_dataset(str(root), size=8, channels=1)
    assert lab.class_names == class_names(str(root)) == ("Bag", "Sneaker")
    assert lab.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert (lab.images[lab.labels == 1].float().mean() > lab.images[lab.labels == 0].float().mean())
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "stray.png")
    with pytest.raises(DdpmError, match="not inside a class subfolder"):
        load_labeled_dataset(str(root), size=8, channels=1)


def test_label_dropout_rate_measured_on_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The labels the loss sees: the image's own class, or the null class at rate --cond-drop."""
    root = labelled_folder(tmp_path / "data", n=16, size=8)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = trainer_mod.training_losses

    def spy(net, s, cfg, x0, t, noise, **kw):
        seen.append((x0.mean((1, 2, 3)), kw["cond"].clone()))
        return real(net, s, cfg, x0, t, noise, **kw)

    monkeypatch.setattr(trainer_mod, "training_losses", spy)
    cfg = tiny_config(root, max_steps=25, batch_size=32, checkpoint_every=0, cond_drop=0.25)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=2))
    train_mod.train(cfg, tmp_path / "run", progress=False, log=lambda _: None, tensorboard=False)
    bright = torch.cat([b for b, _ in seen]) > 0  # class 1 (Sneaker) is the bright one
    cond = torch.cat([c for _, c in seen])
    dropped = cond == 2
    rate, n = float(dropped.float().mean()), len(cond)
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), (rate, n)
    assert torch.equal(cond[~dropped], bright[~dropped].long())  # each kept label is its image's
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["class_names"] == ["Bag", "Sneaker"] and saved["model"]["num_classes"] == 2


# ---------------------------------------------------------------- the command, end to end


def test_cli_conditional_train_sample_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = labelled_folder(tmp_path / "data", n=6)
    cfg = tiny_config(root, max_steps=3, checkpoint_every=0)
    cfg = replace(cfg, data=replace(cfg.data, image_size=28))
    conf = write_config(tmp_path / "c.json", cfg)
    run = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--cond", "--out", str(run), "--no-progress",
                 "--no-tensorboard"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["num_classes"] == 2 and saved["data"]["class_names"] == ["Bag", "Sneaker"]

    out = tmp_path / "s"
    common = ["--sampler", "ddim", "--steps", "3", "--out", str(out)]
    assert main(["sample", str(run), "--class", "sneaker", "--n", "3", "--guidance", "1.5", *common]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (3, 1, 28, 28) and z["labels"].tolist() == [1, 1, 1]
    assert main(["sample", str(run), "--class", "all", "--n", "5", *common]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["labels"].tolist() == [0, 0, 0, 1, 1, 1]  # 5 over 2 classes: 3 each
    with Image.open(out / "grid.png") as g:  # one row per class, three per row
        assert g.size[1] < g.size[0]

    ev = tmp_path / "ev"
    assert main(["eval", str(run), "--class", "all", "--guidance", "0,2", "--n", "8", "--sampler", "ddim",
                 "--steps", "3", "--reference", str(root / "Bag"), "--out", str(ev)]) == 0
    rep = json.loads((ev / "eval-control-ddim-3.json").read_text())
    assert [r["guidance"] for r in rep["results"]] == [0.0, 2.0]
    for r in rep["results"]:
        assert set(r["agreement_per_class"]) == {"Bag", "Sneaker"}
        assert 0 <= r["agreement"] <= 1 and r["report"]["n_samples"] == 8 and r["images_per_sec"] > 0
        # each report says what drew its images (it said nothing before: found reading GPU figures)
        assert {k: r["report"][k] for k in ("sampler", "steps", "arithmetic")} == \
            {"sampler": "ddim", "steps": 3, "arithmetic": "fp32"}
        assert r["report"]["nfe"] == (3 if r["guidance"] == 0 else 6)
    assert (ev / "eval-control-ddim-3.png").stat().st_size > 1000

    # bad input: one line, exit 2, nothing new on disk
    before = sorted(p for p in tmp_path.rglob("*"))
    bad = [["sample", str(run), "--class", "boots"], ["sample", str(run), "--class", "7"],
           ["sample", str(run), "--class", "bag", "--guidance", "-1"],
           ["sample", str(run), "--class", "none", "--guidance", "2"],  # the null class: nothing to guide to
           ["sample", str(run), "--class", "bag", "--guidance", "1", "--guidance-interval", "3,1"],
           ["eval", str(run), "--class", "all", "--guidance", "0,-1", "--n", "8"],
           ["train", "--config", str(conf), "--cond", "--cond-drop", "1.5", "--out", str(tmp_path / "r2")]]
    for argv in bad:
        capsys.readouterr()
        assert main(argv + (["--out", str(tmp_path / "new")] if argv[0] != "train" else [])) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_class_on_an_unconditional_run(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    conf = write_config(tmp_path / "c.json", tiny_config(image_dir, max_steps=1, checkpoint_every=0))
    assert main(["train", "--config", str(conf), "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--class", "0", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --class needs a class-conditional model; this one is unconditional "
        "(train one with --cond or --preset fast-cond)")
    assert not (tmp_path / "s").exists()
