"""Autoguidance (Karras et al. 2024): guiding a model away from a weaker version of itself.

The combination is checked call by call against its formula, on Gaussian oracles whose
denoisers are known exactly: guided away from a broader Gaussian, samples concentrate; guided
by the model itself, nothing changes. Training keeps the guiding model (RUN/guide) at the
asked fraction of its budget, and the commands take it, or refuse bad settings in one line.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import GUIDE, load_checkpoint
from ddpm.cli import main
from ddpm.core.diffusion import Denoiser
from ddpm.core.schedules import NoiseSchedule
from ddpm.samplers import SamplerOptions, sample
from ddpm.training.train import train
from helpers import oracle_eps_net, tiny_config

MU, SD = 0.4, 0.3


@pytest.fixture(scope="module")
def cosine200() -> NoiseSchedule:
    return NoiseSchedule.create("cosine", 200)


def counted(net, calls: list[int]):
    def f(x, t, *cond):
        calls.append(x.shape[0])
        return net(x, t, *cond)
    return f


def test_one_call_is_the_formula(cosine200: NoiseSchedule) -> None:
    good, bad = oracle_eps_net(cosine200, MU, SD), oracle_eps_net(cosine200, MU, 2 * SD)
    calls_g, calls_b = [], []
    d = Denoiser(counted(good, calls_g), cosine200).autoguided(counted(bad, calls_b), 1.5)
    x, t = torch.randn(5, 1, 2, 2), torch.full((5,), 90)
    step = cosine200.timesteps[t]
    eg, eb = good(x, step), bad(x, step)
    torch.testing.assert_close(d(x, t).eps, eg + 1.5 * (eg - eb), rtol=1e-6, atol=1e-6)
    assert calls_g == [5] and calls_b == [5] and d.guide_passes == 1
    # w = 0 or no guide: off, and the guide is never called
    calls_b.clear()
    for off in (Denoiser(good, cosine200).autoguided(counted(bad, calls_b), 0.0),
                Denoiser(good, cosine200).autoguided(None, 2.0)):
        assert torch.equal(off(x, t).eps, eg) and off.guide_passes == 0
    assert calls_b == []


def test_composes_with_classifier_free_guidance(cosine200: NoiseSchedule) -> None:
    """out = c + w_cfg (c - u) + w_auto (c - b): both guidance terms added to the conditional output."""
    def net(x, t, cond=None):  # class k shifts by k; the null class (2) by 0.5
        return x * 0.5 + cond.reshape(-1, 1, 1, 1).float().where(cond.reshape(-1, 1, 1, 1) < 2,
                                                                 torch.tensor(0.5))

    def guide(x, t, cond=None):
        return x * 0.3 - 0.2

    x, t, cond = torch.randn(4, 1, 2, 2), torch.full((4,), 50), torch.tensor([0, 1, 0, 1])
    d = Denoiser(net, cosine200, num_classes=2).conditioned(cond, 2.0).autoguided(guide, 0.7)
    step = cosine200.timesteps[t]
    c, u, b = net(x, step, cond), net(x, step, torch.full_like(cond, 2)), guide(x, step, cond)
    torch.testing.assert_close(d(x, t).eps, c + 2.0 * (c - u) + 0.7 * (c - b), rtol=1e-6, atol=1e-6)
    assert d.null_passes == 1 and d.guide_passes == 1


def test_interval_guides_only_its_noise_levels(cosine200: NoiseSchedule) -> None:
    """Inside [lo, hi] (sigma units) the formula; outside the plain output, and a call wholly
    outside never runs the guide. A batch that straddles the edge is guided image by image."""
    good, bad = oracle_eps_net(cosine200, MU, SD), oracle_eps_net(cosine200, MU, 2 * SD)
    ab = cosine200.alpha_bar
    sigma = ((1 - ab) / ab).sqrt()
    lo, hi = float(sigma[60]), float(sigma[120])
    calls = []
    d = Denoiser(good, cosine200).autoguided(counted(bad, calls), 1.5, (lo, hi))
    x = torch.randn(4, 1, 2, 2)
    t = torch.tensor([30, 60, 120, 150])
    step = cosine200.timesteps[t]
    eg, eb = good(x, step), bad(x, step)
    inside = torch.tensor([False, True, True, False]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d(x, t).eps, torch.where(inside, eg + 1.5 * (eg - eb), eg), rtol=1e-6, atol=1e-6)
    assert calls == [4] and d.guide_passes == 1
    out = d(x, torch.full((4,), 150))  # wholly outside: no guide pass at all
    torch.testing.assert_close(out.eps, good(x, cosine200.timesteps[torch.full((4,), 150)]))
    assert calls == [4] and d.guide_passes == 1
    everywhere = Denoiser(good, cosine200).autoguided(bad, 1.5, (0.0, float("inf")))
    assert torch.equal(everywhere(x, t).eps, Denoiser(good, cosine200).autoguided(bad, 1.5)(x, t).eps)


def test_learned_variance_guides_the_mean_only(cosine200: NoiseSchedule) -> None:
    def net(x, t):
        return torch.cat([x * 0.5, torch.full_like(x, 0.25)], 1)

    def guide(x, t):
        return torch.cat([x * 0.1, torch.full_like(x, 0.9)], 1)

    x, t = torch.randn(3, 1, 2, 2), torch.full((3,), 100)
    plain = Denoiser(net, cosine200, learn_sigma=True)
    d = plain.autoguided(guide, 1.0)
    p, p0 = d(x, t), plain(x, t)
    torch.testing.assert_close(p.eps, x * 0.5 + 1.0 * (x * 0.5 - x * 0.1))
    assert torch.equal(p.var_frac, p0.var_frac)  # the model's own variance, not the guide's


def _draw(s: NoiseSchedule, guide_sd: float | None, w: float, n: int = 4000) -> torch.Tensor:
    good = oracle_eps_net(s, MU, SD)
    guide = None if guide_sd is None else (good if guide_sd == SD else oracle_eps_net(s, MU, guide_sd))
    d = Denoiser(good, s).autoguided(guide, w)
    x_T = torch.randn((n, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    return sample("ddim", d, x_T, 50, options=SamplerOptions(eta=0.0),
                  generator=torch.Generator().manual_seed(1)).double().flatten()


def test_guided_away_from_a_broader_model_samples_concentrate(cosine200: NoiseSchedule) -> None:
    """The guide's errors are the model's own, larger (here: too much spread): extrapolating
    away from it removes spread, more with larger w, and keeps the mean (both agree on it)."""
    plain = _draw(cosine200, None, 0.0)
    assert abs(plain.std() - SD) < 0.02 * SD + 4 * SD / math.sqrt(2 * plain.numel())
    stds = [float(_draw(cosine200, 2 * SD, w).std()) for w in (0.5, 1.0, 2.0)]
    assert stds[0] < 0.95 * SD and all(b < a - 0.005 for a, b in zip(stds, stds[1:])), stds
    for w in (1.0, 2.0):
        assert abs(float(_draw(cosine200, 2 * SD, w).mean()) - MU) < 4 * SD / math.sqrt(16000) + 0.005


def test_the_model_as_its_own_guide_changes_nothing(cosine200: NoiseSchedule) -> None:
    assert torch.equal(_draw(cosine200, SD, 3.0, n=200), _draw(cosine200, None, 0.0, n=200))


# ---------------------------------------------------------------- training keeps the guide


def test_training_keeps_the_guide_at_its_fraction(image_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(image_dir, max_steps=10, guide_at=0.3, checkpoint_every=1, keep=20)
    train(cfg, tmp_path / "r", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    guide = load_checkpoint(tmp_path / "r" / GUIDE)
    assert guide.step == 3 and guide.ema is None and guide.config == cfg  # ceil(0.3 * 10)
    at3 = load_checkpoint(tmp_path / "r" / "checkpoints" / "step-00000003")
    assert all(torch.equal(guide.model[k], at3.ema[k]) for k in at3.ema)  # the EMA weights of that step
    assert (tmp_path / "r" / "latest").read_text().strip() == "step-00000010"  # never named latest
    assert load_checkpoint(tmp_path / "r").step == 10


def test_guide_survives_pruning_and_resume(image_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(image_dir, max_steps=4, guide_at=0.5, checkpoint_every=1, keep=1)
    run = tmp_path / "r"
    train(cfg, run, device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    first = (run / GUIDE / "model.safetensors").read_bytes()
    assert load_checkpoint(run / GUIDE).step == 2
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000004"]
    # a longer budget on resume: the guide of the first budget stays as it was
    cfg8 = tiny_config(image_dir, max_steps=8, guide_at=0.5, checkpoint_every=1, keep=1)
    (run / "config.json").write_text(cfg8.to_json())
    train(cfg8, run, resume=True, device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    assert (run / GUIDE / "model.safetensors").read_bytes() == first and load_checkpoint(run).step == 8


def test_no_guide_without_guide_at(image_dir: Path, tmp_path: Path) -> None:
    train(tiny_config(image_dir), tmp_path / "r", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    assert not (tmp_path / "r" / GUIDE).exists()


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def guided_run(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ag") / "r"
    train(tiny_config(image_dir, max_steps=6, guide_at=0.5), run, device="cpu", progress=False,
          tensorboard=False, log=lambda s: None)
    return run


def test_cli_sample_with_autoguidance(guided_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    import re

    import numpy as np

    base = ["sample", str(guided_run), "--sampler", "ddim", "--steps", "4", "--n", "3", "--device", "cpu",
            "--no-progress"]
    nfe = {}
    for name, extra in [("plain", []), ("ag", ["--autoguidance", "1"]),
                        ("ag4", ["--autoguidance", "1", "--guiding-model",
                                 str(guided_run / "checkpoints" / "step-00000004")])]:
        capsys.readouterr()
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        nfe[name] = int(re.search(r"(\d+) network evaluations per image", capsys.readouterr().out).group(1))
    assert nfe == {"plain": 4, "ag": 8, "ag4": 8}  # one more pass per step
    imgs = {k: np.load(tmp_path / k / "samples.npz")["images"] for k in nfe}
    assert not np.array_equal(imgs["plain"], imgs["ag"]) and not np.array_equal(imgs["ag"], imgs["ag4"])
    assert main([*base, "--autoguidance", "0", "--out", str(tmp_path / "w0")]) == 0
    assert np.array_equal(np.load(tmp_path / "w0" / "samples.npz")["images"], imgs["plain"])  # w = 0: off
    # an interval that holds every noise level is autoguidance everywhere; one that holds none is off
    for name, iv in [("all", "0,1e9"), ("none", "1e8,1e9"), ("part", "0,0.1")]:
        capsys.readouterr()
        assert main([*base, "--autoguidance", "1", "--autoguidance-interval", iv, "--out", str(tmp_path / name)]) == 0
        nfe[name] = int(re.search(r"(\d+) network evaluations per image", capsys.readouterr().out).group(1))
        imgs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert nfe["all"] == 8 and np.array_equal(imgs["all"], imgs["ag"])
    assert nfe["none"] == 4 and np.array_equal(imgs["none"], imgs["plain"])
    assert 4 < nfe["part"] < 8  # the guide runs at the low-noise steps only


@pytest.mark.parametrize("extra, msg", [
    (["--autoguidance", "-1"], ">= 0"),
    (["--autoguidance", "nan"], ">= 0"),
    (["--guiding-model", "x"], "needs --autoguidance"),
    (["--autoguidance", "1", "--guiding-model", "/no/such/run"], "no run or checkpoint"),
    (["--autoguidance-interval", "0,1"], "needs --autoguidance"),
    (["--autoguidance", "1", "--autoguidance-interval", "2,1"], "0 <= LO <= HI"),
    (["--autoguidance", "1", "--autoguidance-interval", "0"], "0 <= LO <= HI"),
    (["--autoguidance", "1", "--autoguidance-interval", "a,b"], "must be LO,HI"),
])
def test_cli_bad_autoguidance(guided_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                              extra: list[str], msg: str) -> None:
    assert main(["sample", str(guided_run), "--n", "1", "--steps", "2", "--sampler", "ddim", "--device", "cpu",
                 "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_cli_run_without_guide_and_guide_of_another_kind(image_dir: Path, guided_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "plain"
    train(tiny_config(image_dir, max_steps=2), plain, device="cpu", progress=False, tensorboard=False,
          log=lambda s: None)
    other = tmp_path / "other"
    cfg = tiny_config(image_dir, max_steps=2)
    train(replace(cfg, diffusion=replace(cfg.diffusion, timesteps=30)), other,
          device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    for argv, msg in [
        (["sample", str(plain), "--autoguidance", "1"], "has no guiding model"),
        (["sample", str(guided_run), "--autoguidance", "1", "--guiding-model", str(other)], "timesteps 20 vs 30"),
    ]:
        assert main([*argv, "--n", "1", "--steps", "2", "--sampler", "ddim", "--device", "cpu",
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_guide_at_out_of_range(image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from helpers import write_config
    for v in ("1", "-0.1", "nan"):
        cfg = write_config(tmp_path / "c.json", tiny_config(image_dir))
        assert main(["train", "--config", str(cfg), "--guide-at", v, "--out", str(tmp_path / "r"),
                     "--device", "cpu", "--no-progress"]) == 2
        assert "--guide-at must be in [0, 1)" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()


def test_inpaint_and_edit_take_autoguidance(guided_run: Path) -> None:
    from ddpm.config import SampleConfig
    from ddpm.sampling.editing import RePaintConfig, edit, inpaint, region_mask
    from ddpm.sampling.generate import load_model

    model = load_model(guided_run)
    image = torch.full((1, 8, 8), 128, dtype=torch.uint8)
    mask = region_mask("right", 8)
    base = SampleConfig(sampler="ddim", steps=4, n=2)
    ag = SampleConfig(sampler="ddim", steps=4, n=2, autoguidance=1.0)
    plain_i, ag_i = (inpaint(model, image, mask, c, RePaintConfig(resample=1)) for c in (base, ag))
    assert ag_i.nfe == 2 * plain_i.nfe and not torch.equal(plain_i.images, ag_i.images)
    assert torch.equal(ag_i.images[:, :, :, :4], plain_i.images[:, :, :, :4])  # the kept half is the input's
    plain_e, ag_e = (edit(model, image, 0.5, c) for c in (base, ag))
    assert ag_e.nfe == 2 * plain_e.nfe and not torch.equal(plain_e.images, ag_e.images)


def test_cli_eval_writes_its_own_report(tmp_path: Path) -> None:
    from helpers import make_images

    imgs = make_images((tmp_path / "imgs").mkdir() or tmp_path / "imgs", n=8, size=28)
    cfg = tiny_config(imgs, max_steps=4, guide_at=0.5)
    train(replace(cfg, data=replace(cfg.data, image_size=28)), tmp_path / "r", device="cpu", progress=False,
          tensorboard=False, log=lambda s: None)
    ev = tmp_path / "ev"
    common = ["eval", str(tmp_path / "r"), "--n", "8", "--sampler", "ddim", "--steps", "3", "--reference", str(imgs),
              "--out", str(ev), "--device", "cpu", "--no-progress"]
    assert main(common) == 0 and main([*common, "--autoguidance", "1"]) == 0
    assert main([*common, "--autoguidance", "1", "--autoguidance-interval", "0,1e9"]) == 0
    plain, ag = (json.loads((ev / f).read_text()) for f in ("eval-ddim-3.json", "eval-ddim-3-ag1.json"))
    part = json.loads((ev / "eval-ddim-3-ag1-sigma0-1e+09.json").read_text())  # its own report, not ag1's
    assert part["autoguidance_interval"] == [0, 1e9] and part["fd"] == ag["fd"]
    assert plain["nfe"] == 3 and "autoguidance" not in plain
    assert ag["nfe"] == 6 and ag["autoguidance"] == 1.0 and ag["guiding_model"].endswith(GUIDE)
