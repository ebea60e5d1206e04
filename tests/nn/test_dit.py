"""Tests for the DiT and the networks table: shapes over the options, adaLN-Zero's closed form
at initialisation, the class reaching the output once trained, float times, channels-last and
bf16, the size checks, and that every caller builds through ``build_network``."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.config import DiffusersUNetConfig, DiTConfig, ModelConfig, RunConfig, model_configs, override, preset
from ddpm.errors import DdpmError
from ddpm.nn import NETWORKS, DiT, UNet, build_network, check_image_size, count_parameters
from ddpm.nn.dit import sincos_2d

TINY = DiTConfig(patch_size=2, hidden=16, depth=2, heads=2)


def _inputs(c: int = 1, size: int = 8, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, c, size, size, generator=g), torch.randint(0, 100, (b,), generator=g)


def _perturbed(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every weight moved off its initial value (adaLN-Zero starts the net at the zero function)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


# ---------------------------------------------------------------- the table


def test_networks_table_matches_the_configs() -> None:
    assert {k: s.config for k, s in NETWORKS.items()} == model_configs() == {"unet": ModelConfig, "dit": DiTConfig,
                                                                        "diffusers-unet": DiffusersUNetConfig}
    assert all(s.summary and "\n" not in s.summary for s in NETWORKS.values())
    assert type(build_network(ModelConfig(dim=8, attn_heads=1, attn_dim_head=8))) is UNet
    assert type(build_network(TINY)) is DiT


def test_unknown_network_is_one_line() -> None:
    class Other:
        arch = "mlp"

    with pytest.raises(DdpmError, match=r"^unknown network 'mlp'; choose one of: unet, dit, diffusers-unet$"):
        build_network(Other())


def test_every_caller_builds_through_build_network() -> None:
    """No module of the library but the table constructs a network class itself."""
    src = Path(__file__).resolve().parents[2] / "src" / "ddpm"
    direct = re.compile(r"\b(UNet|DiT)\(")
    found = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py") if p.parent.name != "nn"
             for i, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
    assert found == []


# ---------------------------------------------------------------- shapes and the closed form


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape(channels: int, num_classes: int, learn_sigma: bool) -> None:
    cfg = replace(TINY, channels=channels, num_classes=num_classes, learn_sigma=learn_sigma)
    net = DiT(cfg).eval()
    x, t = _inputs(channels)
    cond = torch.tensor([0, num_classes, 1]) if num_classes else None
    out = net(x, t, cond)
    assert out.shape == (3, channels * (2 if learn_sigma else 1), 8, 8)


def test_zero_at_initialisation() -> None:
    """adaLN-Zero: every modulation and the final linear start at zero, so the net is the zero
    function, for any x, t and class."""
    net = DiT(replace(TINY, num_classes=3, learn_sigma=True))
    x, t = _inputs()
    assert torch.equal(net(x, t, torch.tensor([0, 1, 3])), torch.zeros(3, 2, 8, 8))
    for block in net.blocks:
        assert not block.ada[1].weight.any() and not block.ada[1].bias.any()


def test_class_reaches_the_output_after_training_steps() -> None:
    """At zero init the first step moves the final linear alone (every other gradient passes
    through its zero weights or a zero gate), so its output still ignores the class; from the
    second step the final adaLN, which sees the class, moves too."""
    torch.manual_seed(0)
    net = DiT(replace(TINY, num_classes=3)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, t = _inputs(b=6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def step() -> None:
        opt.zero_grad()
        (net(x, t, y) - target).square().mean().backward()
        opt.step()

    def class_gap() -> float:
        with torch.no_grad():
            return (net(x, t, torch.zeros_like(y)) - net(x, t, torch.full_like(y, 2))).abs().max().item()

    step()
    moved = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"final.weight", "final.bias"}
    assert class_gap() == 0
    step()
    assert class_gap() > 1e-4


def test_grad_checkpoint_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = _perturbed(DiT(replace(TINY, num_classes=2))).train()
    ckpt = DiT(replace(TINY, num_classes=2, grad_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs()
    grads = []
    for net in (plain, ckpt):
        net(x, t, torch.tensor([0, 1, 2])).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ---------------------------------------------------------------- time, layout, precision


def test_float_and_negative_times() -> None:
    """Continuous processes pass t as a float (1000 t, or EDM's ln(sigma) / 4, below zero)."""
    net = _perturbed(DiT(TINY)).eval()
    x, _ = _inputs()
    t = torch.tensor([0.25, -1.3, 731.5])
    out = net(x, t)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    # a long step and the same step as a float are the same time
    assert torch.equal(net(x, torch.tensor([1, 2, 3])), net(x, torch.tensor([1.0, 2.0, 3.0])))
    assert not torch.allclose(net(x, t), net(x, t + 0.5))


def test_channels_last_and_bf16_autocast() -> None:
    net = _perturbed(DiT(replace(TINY, channels=3))).eval()
    x, t = _inputs(3)
    ref = net(x, t)
    assert torch.allclose(net(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.to(memory_format=torch.channels_last), t)
    assert out.shape == ref.shape and torch.allclose(out.float(), ref, atol=0.1 * ref.abs().max().item())


def test_position_embedding() -> None:
    """Fixed sine-cosine, one row per token, distinct for every token of the grid."""
    e = sincos_2d(16, 3, 5)
    assert e.shape == (15, 16) and torch.equal(e, sincos_2d(16, 3, 5))
    assert torch.cdist(e, e).add(torch.eye(15)).min() > 0
    assert sincos_2d(18, 2, 2).shape == (4, 18)  # a width not a multiple of 4: padded


# ---------------------------------------------------------------- checks


def test_patch_size_must_divide_the_image() -> None:
    check_image_size(replace(TINY, patch_size=4), 28)
    with pytest.raises(DdpmError, match=r"^--patch-size 3 does not divide the image size 28 \(try --patch-size 4"):
        check_image_size(replace(TINY, patch_size=3), 28)


@pytest.mark.parametrize("changes, message", [
    ({"hidden": 18, "heads": 4}, "--hidden 18 must be a multiple of --heads 4"),
    ({"depth": 0}, "--depth must be between 1"),
    ({"patch_size": 0}, "--patch-size must be between 1"),
    ({"mlp_ratio": 0.0}, "--mlp-ratio must be above 0"),
    ({"class_emb_std": -1.0}, "--class-emb-std"),
])
def test_bad_sizes_are_one_line(changes: dict, message: str) -> None:
    with pytest.raises(DdpmError, match=re.escape(message)):
        build_network(replace(TINY, **changes))


# ---------------------------------------------------------------- presets


def test_dit_presets() -> None:
    fast, dit, cond = preset("fast"), preset("dit"), preset("dit-cond")
    assert isinstance(dit.model, DiTConfig) and dit.model.arch == "dit"
    assert (dit.diffusion, dit.data, dit.train) == (fast.diffusion, fast.data, fast.train)
    assert cond == replace(dit, model=replace(dit.model, num_classes=10, class_emb_std=1.0), preset="dit-cond")
    check_image_size(dit.model, dit.data.image_size)
    n_fast, n_dit = (count_parameters(build_network(c.model)) for c in (fast, dit))
    assert 0.8 < n_dit / n_fast < 1.25  # about the fast U-Net's size


# ---------------------------------------------------------------- configs name their network


def test_config_round_trip() -> None:
    for name in ("seed", "fast", "dit", "dit-cond"):
        cfg = preset(name)
        d = cfg.to_dict()
        assert d["model"]["arch"] == cfg.model.arch
        assert RunConfig.from_dict(d) == cfg
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_a_config_without_arch_is_the_unet() -> None:
    d = preset("fast").to_dict()
    del d["model"]["arch"]
    assert RunConfig.from_dict(d) == preset("fast")
    shipped = Path(ddpm.__file__).parent / "assets" / "models" / "fashion-mnist"
    for path in shipped.rglob("config.json"):
        assert "arch" not in json.loads(path.read_text())["model"]  # saved before the choice existed
        assert type(RunConfig.load(path).model) is ModelConfig


def test_unknown_arch_and_alien_keys_are_one_line() -> None:
    d = preset("dit").to_dict()
    with pytest.raises(DdpmError, match=r"^unknown model\.arch 'mlp'; choose one of: unet, dit, diffusers-unet$"):
        RunConfig.from_dict({**d, "model": {**d["model"], "arch": "mlp"}})
    with pytest.raises(DdpmError, match=r"^unknown config key model\.dim$"):
        RunConfig.from_dict({**d, "model": {**d["model"], "dim": 8}})  # a U-Net key in a DiT config
    with pytest.raises(DdpmError, match=r"^unknown config key model\.depth$"):
        RunConfig.from_dict({**d, "model": {"depth": 3}})  # no arch: the U-Net, which has no depth


def test_override_switches_the_network() -> None:
    cond = preset("fast-cond").model
    dit = override(cond, arch="dit", depth=3)
    assert dit == DiTConfig(depth=3, num_classes=10, class_emb_std=1.0)  # the shared fields are kept
    assert override(dit, arch="unet") == ModelConfig(num_classes=10, class_emb_std=1.0)
    with pytest.raises(DdpmError, match=r"^--dim is not an option of the dit network \(--arch dit\)"):
        override(dit, dim=8)
    with pytest.raises(DdpmError, match=r"^unknown arch 'mlp'; choose one of: unet, dit, diffusers-unet$"):
        override(dit, arch="mlp")


# ---------------------------------------------------------------- the memory estimate and export


def test_memory_estimate_traces_the_dit() -> None:
    from ddpm.runtime.budget import network_peak, parameter_bytes

    cfg = replace(TINY, num_classes=3)
    assert parameter_bytes(cfg) == 4 * count_parameters(DiT(cfg))
    one, eight = (network_peak(cfg, 8, b, train=True) for b in (1, 8))
    assert 0 < one < eight and 0 < network_peak(cfg, 8, 8, train=False) < eight
    assert network_peak(replace(cfg, grad_checkpoint=True), 8, 8, train=True) < eight


def test_a_dit_run_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from ddpm.export import export_onnx, run_onnx
    from ddpm.sampling.generate import load_model
    from ddpm.training.train import train
    from helpers import labelled_folder, tiny_config

    cfg = tiny_config(labelled_folder(tmp_path / "classes", n=4, size=8), max_steps=2)
    cfg = replace(cfg, model=replace(TINY, num_classes=2))
    train(cfg, tmp_path / "run", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    res = export_onnx(tmp_path / "run", tmp_path / "dit.onnx")
    assert res.inputs == ("x_t", "t", "cond") and res.max_abs_err <= res.tolerance
    net = _perturbed(load_model(tmp_path / "run").net.float())  # a real output, not zeros matching zeros
    from ddpm.export import to_onnx

    data = to_onnx(net, cfg)
    x, t, c = torch.randn(5, 1, 8, 8), torch.tensor([0.0, 3.0, 7.5, 11.0, 19.0]), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        want = net(x, t, c).numpy()
    got = run_onnx(data, {"x_t": x.numpy(), "t": t.numpy(), "cond": c.numpy()})[0]
    assert abs(want).max() > 0.05
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-4, rtol=1e-4)


def test_time_embedding_takes_real_times() -> None:
    """The embedding both networks share: a long step and the same float agree, and a time
    between steps or below zero is a finite, distinct embedding."""
    from ddpm.nn.layers import SinusoidalTimeEmbedding

    emb = SinusoidalTimeEmbedding(32)
    assert torch.equal(emb(torch.tensor([0, 7, 499])), emb(torch.tensor([0.0, 7.0, 499.0])))
    e = emb(torch.tensor([-0.75, 0.5, 1.0, 3.25], dtype=torch.float64))
    assert e.dtype == torch.float32 and torch.isfinite(e).all() and torch.cdist(e, e).add(torch.eye(4)).min() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(emb(torch.tensor([-1.2, 0.3]))).all()
