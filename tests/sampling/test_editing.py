"""Editing (RePaint inpainting, SDEdit) against closed forms: the Gaussian oracle fills a hole with
the data's own distribution, resampling pulls a correlated hole towards its exact conditional,
known pixels are the input's bit for bit; and the two commands end to end on a tiny made-up run."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import save_checkpoint
from ddpm.cli import main
from ddpm.config import SampleConfig
from ddpm.core.schedules import NoiseSchedule
from ddpm.errors import DdpmError
from ddpm.nn import build_network
from ddpm.samplers import SAMPLERS
from ddpm.sampling.editing import (RePaintConfig, comparison_grid, edit, inpaint, jump_schedule, load_mask,
                                   region_mask, repaint_steps, strength_timestep)
from ddpm.sampling.generate import LoadedModel
from helpers import oracle_eps_net, tiny_config

MU, SD = 0.0, 0.3


# The grid on which the closed-form bounds below were measured: quadratic for ddim and dpm++2m,
# whose default is uniform. On the oracle's perfect network the uniform grid leaves more of the
# sampler's own discretisation error (first-order DDIM at 20 steps: about 11% too narrow a spread,
# tests/samplers/test_samplers.py), which is not what these tests check: RePaint's harmonisation is. The
# uniform default was chosen on trained networks (bench/spacing_fd.py).
ORACLE_GRID = {"ddim": "quadratic", "dpm++2m": "quadratic"}


def _cfg(sampler: str, **kw: object) -> SampleConfig:
    return SampleConfig(sampler=sampler, clip="none", **kw)


def oracle_model(size: int, net=None, T: int = 100, schedule: str = "cosine") -> LoadedModel:
    """A LoadedModel whose network is the exact denoiser of N(MU, SD^2) per pixel (or ``net``)."""
    s = NoiseSchedule.create(schedule, T, 1e-4, 0.02)
    cfg = tiny_config(Path("unused"))
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, timesteps=T), data=replace(cfg.data, image_size=size))
    return LoadedModel(net or oracle_eps_net(s, MU, SD), s, cfg, 0, Path("oracle"))


def correlated_oracle(s: NoiseSchedule, sigma: torch.Tensor):
    """E[eps | x_t] for data N(0, sigma) over the d pixels of an image (sigma (d, d), float64)."""
    ab, d = s.alpha_bar.double(), len(sigma)
    eye = torch.eye(d, dtype=torch.float64)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].reshape(-1, 1, 1)
        xf = x.double().reshape(len(x), d, 1)
        x0 = a.sqrt() * sigma @ torch.linalg.solve(a * sigma + (1 - a) * eye, xf)
        return ((xf - a.sqrt() * x0) / (1 - a).sqrt()).reshape(x.shape).float()

    return net


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.double() / 127.5 - 1


# ---------------------------------------------------------------- the jump schedule

def test_jump_schedule_without_resampling_is_plain_descent() -> None:
    assert jump_schedule(5, 2, 1) == [4, 3, 2, 1, 0, -1]


def test_jump_schedule_goes_back_up_r_minus_1_times() -> None:
    # RePaint's get_schedule_jump(t_T=6, jump_length=2, jump_n_sample=3): jumps at levels 0 and 2
    levels = jump_schedule(6, 2, 3)
    assert levels[:4] == [5, 4, 3, 2] and levels[-1] == -1
    assert levels[4:10] == [3, 4, 3, 2, 3, 4]  # twice back up from 2
    downs = sum(b < a for a, b in zip(levels, levels[1:]))
    assert downs == repaint_steps(6, RePaintConfig(2, 3)) == 6 + 2 * 2 * 2
    assert all(abs(a - b) == 1 for a, b in zip(levels, levels[1:]))


# ---------------------------------------------------------------- RePaint

@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_all_known_mask_returns_the_input(sampler: str) -> None:
    img = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    s = inpaint(oracle_model(4), img, torch.ones(4, 4, dtype=torch.bool), _cfg(sampler, steps=8), RePaintConfig(2, 2))
    assert torch.equal(s.images, img)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_known_pixels_are_exact_and_the_hole_is_filled(sampler: str) -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    keep = torch.rand(6, 1, 4, 4, generator=g) < 0.5
    s = inpaint(oracle_model(4), img, keep, _cfg(sampler, steps=8), RePaintConfig(3, 2))
    assert torch.equal(s.images[keep], img[keep])
    assert not torch.equal(s.images[~keep], img[~keep])


@pytest.mark.parametrize("sampler,steps,r", [("ddpm", 100, 1), ("ddpm", 100, 2), ("ddim", 20, 3), ("heun", 20, 2), ("dpm++2m", 20, 2)])
def test_factorised_gaussian_hole_has_the_data_distribution(sampler: str, steps: int, r: int) -> None:
    """Pixels independent under the data: the filled right half is N(MU, SD^2) whatever the left
    (ddpm on all T steps: its few-step variance is low by itself, as test_samplers shows)."""
    img = torch.full((1, 4, 4), 255, dtype=torch.uint8)  # known pixels at +1, far from MU
    s = inpaint(oracle_model(4), img, region_mask("right", 4),
                _cfg(sampler, steps=steps, n=400, batch_size=400, spacing=ORACLE_GRID.get(sampler)), RePaintConfig(5, r))
    hole = _unit(s.images[..., 2:])
    n = hole.numel()
    assert abs(hole.mean() - MU) < 4 * SD / math.sqrt(n) + 0.01
    assert abs(hole.std() - SD) < 4 * SD / math.sqrt(2 * n) + 0.015


def test_resampling_harmonises_a_correlated_hole() -> None:
    """Four pixels with correlation 0.9: plain replacement (r=1) misses the exact conditional mean
    of the hole given the known half; RePaint's resampling comes close (its Fig. 3 in closed form)."""
    rho, sd = 0.9, 0.5
    sigma = sd**2 * ((1 - rho) * torch.eye(4, dtype=torch.float64) + rho * torch.ones(4, 4, dtype=torch.float64))
    s = NoiseSchedule.create("cosine", 100, 1e-4, 0.02)
    model = oracle_model(2, correlated_oracle(s, sigma))
    img = torch.tensor([[[200, 0], [200, 0]]], dtype=torch.uint8)
    keep = torch.tensor([[True, False], [True, False]])
    known = _unit(img[0, :, 0])
    exact = (sigma[[1, 3]][:, [0, 2]] @ torch.linalg.solve(sigma[[0, 2]][:, [0, 2]], known)).mean()
    err = {}
    for r in (1, 10):  # measured: 0.26 and 0.03; the standard error is about 0.015
        out = inpaint(model, img, keep, _cfg("ddim", steps=20, n=300, batch_size=300, spacing=ORACLE_GRID["ddim"]),
                      RePaintConfig(5, r))
        err[r] = abs(_unit(out.images[..., 1]).mean() - exact).item()
    assert err[1] > 0.15 and err[10] < 0.07 and err[10] < err[1] / 3, err


def test_per_image_seeds_do_not_depend_on_batching() -> None:
    img = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    model, keep, rp = oracle_model(4), region_mask("center", 4), RePaintConfig(2, 2)
    a = inpaint(model, img, keep, _cfg("ddpm", steps=6, n=5, batch_size=5), rp).images
    b = inpaint(model, img, keep, _cfg("ddpm", steps=6, n=5, batch_size=2), rp).images
    c = inpaint(model, img, keep, _cfg("ddpm", steps=6, n=3, batch_size=3), rp).images
    assert torch.equal(a, b) and torch.equal(a[:3], c)
    assert not torch.equal(a[0], a[1])
    e1 = edit(model, img, 0.6, _cfg("ddpm", steps=6, n=4, batch_size=4)).images
    e2 = edit(model, img, 0.6, _cfg("ddpm", steps=6, n=4, batch_size=3)).images
    assert torch.equal(e1, e2)


def test_bad_masks_and_images() -> None:
    model, img = oracle_model(4), torch.zeros(1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DdpmError, match="mask is 5x5"):
        inpaint(model, img, torch.ones(5, 5, dtype=torch.bool), _cfg("ddim"))
    with pytest.raises(DdpmError, match="bool"):
        inpaint(model, img, torch.ones(4, 4), _cfg("ddim"))
    with pytest.raises(DdpmError, match="the model draws"):
        inpaint(model, torch.zeros(3, 4, 4, dtype=torch.uint8), torch.ones(4, 4, dtype=torch.bool), _cfg("ddim"))
    with pytest.raises(DdpmError, match="resample"):
        inpaint(model, img, torch.ones(4, 4, dtype=torch.bool), _cfg("ddim"), RePaintConfig(2, 0))


# ---------------------------------------------------------------- SDEdit

def test_strength_maps_to_t0() -> None:
    assert strength_timestep(1.0, 1000) == 999 and strength_timestep(0.5, 1000) == 499
    assert strength_timestep(1e-9, 1000) == 0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(DdpmError, match="strength"):
            strength_timestep(bad, 1000)


def test_small_strength_stays_close_and_larger_strays() -> None:
    model = oracle_model(4, T=1000, schedule="linear")
    img = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    dist = {}
    for strength in (0.001, 0.3):
        out = edit(model, img, strength, _cfg("ddim", steps=50, n=50, batch_size=50))
        dist[strength] = (_unit(out.images) - _unit(img)).abs().mean().item()
    assert dist[0.001] < 0.02 < 0.2 < dist[0.3]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_full_strength_is_sampling(sampler: str) -> None:
    """At strength 1 the input (all +1, far from MU) is forgotten: the data's N(MU, SD^2)."""
    model = oracle_model(4, T=1000, schedule="linear")
    out = edit(model, torch.full((1, 4, 4), 255, dtype=torch.uint8), 1.0,
               _cfg(sampler, steps=100, n=300, batch_size=300))
    x = _unit(out.images)
    assert out.steps == 100
    assert abs(x.mean() - MU) < 0.02 and abs(x.std() - SD) < 0.03


# ---------------------------------------------------------------- files and the grid

def test_mask_files_white_keeps_at_half_grey(tmp_path: Path) -> None:
    a = np.array([[0, 127], [128, 255]], np.uint8)
    Image.fromarray(a).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", 2).tolist() == [[False, False], [True, True]]
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(DdpmError, match="3x2"):
        load_mask(tmp_path / "wide.png", 2)
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(DdpmError, match="cannot read mask"):
        load_mask(tmp_path / "junk.png", 2)


def test_comparison_grid_rows() -> None:
    img, res = torch.zeros(1, 2, 2, dtype=torch.uint8), torch.ones(10, 1, 2, 2, dtype=torch.uint8)
    tiles, nrow = comparison_grid(img, res, torch.ones(2, 2, dtype=torch.bool), per_row=8)
    assert nrow == 10 and len(tiles) == 20  # two rows: input, mask, 8 results; input, mask, 2, 6 blanks
    assert (tiles[11] == 255).all() and torch.equal(tiles[12], res[8])


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An unconditional and a two-class run (untrained tiny U-Nets: the plumbing is under test),
    an 8x8 input image, its mask, and a 9x9 mask."""
    d = tmp_path_factory.mktemp("edit")
    cfg = tiny_config(d)
    runs = []
    for name, model_cfg, data_cfg in (("plain", cfg.model, cfg.data),
                                      ("cond", replace(cfg.model, num_classes=2),
                                       replace(cfg.data, class_names=("shirt", "shoe")))):
        c = replace(cfg, model=model_cfg, data=data_cfg)
        torch.manual_seed(0)
        save_checkpoint(d / name, config=c, step=1, model=build_network(c.model).state_dict(), ema=None, state={})
        runs.append(d / name)
    a = np.zeros((16, 16), np.uint8)
    a[4:12, 4:12] = 220
    Image.fromarray(a).save(d / "img.png")  # 16x16: resized by the data folders' reader
    m = np.full((8, 8), 255, np.uint8)
    m[:, 4:] = 0
    Image.fromarray(m).save(d / "mask.png")
    Image.fromarray(np.full((9, 9), 255, np.uint8)).save(d / "mask9.png")
    (d / "junk.png").write_bytes(b"not an image")
    return runs[0], runs[1], d


def test_inpaint_command_end_to_end(tiny_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    plain, cond, d = tiny_runs
    for run, extra in ((plain, []), (cond, ["--class", "shoe", "--guidance", "2"])):
        out = tmp_path / run.name
        assert main(["inpaint", str(run), "--image", str(d / "img.png"), "--mask", str(d / "mask.png"), "--n", "3",
                     "--steps", "6", "--jump-length", "2", "--resample", "2", "--gif", "--out", str(out),
                     "--batch-size", "2", *extra]) == 0
        imgs = np.load(out / "samples.npz")["images"]
        assert imgs.shape == (3, 1, 8, 8)
        from ddpm.data.readers import load_image
        src = load_image(d / "img.png", 8, 1).numpy()
        assert (imgs[..., :4] == src[..., :4]).all()  # the kept left half, exactly
        assert Image.open(out / "grid.png").size == (2 * (2 + 5 * 10), 2 * (2 + 10))  # input | mask | 3
        assert Image.open(out / "denoising.gif").n_frames > 2


def test_edit_command_end_to_end(tiny_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    plain, _, d = tiny_runs
    out = tmp_path / "e"
    assert main(["edit", str(plain), "--image", str(d / "img.png"), "--strength", "0.4", "--n", "2",
                 "--sampler", "ddim", "--steps", "5", "--out", str(out)]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (2, 1, 8, 8)
    assert Image.open(out / "grid.png").size == (2 * (2 + 3 * 10), 2 * (2 + 10))  # input | 2


@pytest.mark.parametrize("args,message", [
    (["inpaint", "{cond}", "--mask", "{d}/mask.png", "--class", "boot"], "unknown class 'boot'"),
    (["inpaint", "{cond}", "--mask", "{d}/mask.png", "--class", "7"], "out of range"),
    (["inpaint", "{plain}", "--mask", "{d}/mask.png", "--class", "shoe"], "class-conditional"),
    (["inpaint", "{cond}", "--mask", "{d}/mask.png", "--class", "shoe", "--guidance", "-1"], "guidance"),
    (["inpaint", "{plain}", "--mask", "{d}/mask9.png"], "9x9"),
    (["inpaint", "{plain}", "--mask", "{d}/junk.png"], "cannot read mask"),
    (["inpaint", "{plain}", "--mask", "{d}/mask.png", "--resample", "0"], "resample"),
    (["inpaint", "{plain}", "--mask", "{d}/mask.png", "--image", "{d}/junk.png"], "cannot read image"),
    (["edit", "{plain}", "--strength", "0"], "strength"),
    (["edit", "{plain}", "--strength", "1.5"], "strength"),
    (["edit", "{plain}", "--strength", "0.5", "--image", "{d}/nowhere.png"], "cannot read image"),
])
def test_bad_input_is_one_line_and_writes_nothing(args: list[str], message: str, tiny_runs: tuple[Path, Path, Path],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain, cond, d = tiny_runs
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"earlier")
    argv = [a.format(plain=plain, cond=cond, d=d) for a in args]
    if "--image" not in argv:
        argv += ["--image", str(d / "img.png")]
    assert main([*argv, "--out", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz"]
    assert (out / "samples.npz").read_bytes() == b"earlier"


def test_eval_inpaint_on_a_tiny_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """`ddpm eval RUN --inpaint right`: completions of made-up "test images" (IDX files the test
    writes), scored with the shipped feature net, beside the originals and the black hole."""
    from helpers import fake_fashion

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake_fashion(tmp_path / "fm", n_train=30, n_test=30)
    cfg = tiny_config(tmp_path)
    cfg = replace(cfg, data=replace(cfg.data, source="fashion-mnist", image_size=28))  # its test split, the run's own
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", config=cfg, step=1, model=build_network(cfg.model).state_dict(), ema=None, state={})
    out = tmp_path / "out"
    argv = ["eval", str(tmp_path / "run"), "--n", "12", "--sampler", "ddim", "--steps", "4", "--jump-length", "2",
            "--data", str(tmp_path / "fm"), "--out", str(out)]
    assert main([*argv, "--inpaint", "right", "--resample", "2"]) == 0
    rep = json.loads((out / "eval-inpaint-right-ddim-4-j2-r2.json").read_text())
    assert rep["nfe"] == 4 + 2 and rep["resample"] == 2 and rep["mask"] == "right"
    assert rep["report"]["n_samples"] == 12 and rep["report"]["fd"] > 0
    assert 0 <= rep["fd_originals"] < rep["fd_hole_black"]
    capsys.readouterr()
    assert main([*argv, "--inpaint", "left"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown --inpaint 'left'; choose one of: right, center"
