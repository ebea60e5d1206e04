"""Tests for ddpm.nn: the seed preset's size and function (against the seed's own code in
../shared/bench/seed_reference.py), output shapes over the options, size checks, and gradient
checkpointing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ddpm.config import ModelConfig
from ddpm.errors import DdpmError
from ddpm.nn import UNet, check_image_size, count_parameters, resolved_out_channels
from ddpm.nn import unet as unet_mod
from ddpm.nn.layers import SinusoidalTimeEmbedding
from helpers import load_seed_reference

TINY = ModelConfig(dim=8, attn_heads=2, attn_dim_head=8)


def copy_weights_in_order(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """The state dicts list the same tensors in the same order (names differ): copy by position."""
    s, d = list(src.state_dict().values()), dst.state_dict()
    assert len(s) == len(d)
    new = {}
    for (k, v), w in zip(d.items(), s):
        assert v.shape == w.shape, k
        new[k] = w.clone()
    dst.load_state_dict(new)


# ---------------------------------------------------------------- the seed


def test_seed_preset_parameter_count() -> None:
    assert count_parameters(UNet(ModelConfig())) == 2_996_315


def test_same_function_as_seed() -> None:
    ref = load_seed_reference()
    torch.manual_seed(0)
    seed_model = ref.make_model().eval()
    ours = UNet(ModelConfig()).eval()
    assert count_parameters(seed_model) == count_parameters(ours)
    copy_weights_in_order(seed_model, ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 28, 28, generator=g)
    t = torch.tensor([0, 57, 199])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), seed_model(x, t), atol=1e-5, rtol=1e-5)


def test_same_function_as_seed_resnet_blocks() -> None:
    ref = load_seed_reference()
    torch.manual_seed(0)
    seed_model = ref.Unet(dim=16, channels=3, dim_mults=(1, 2), use_convnext=False).eval()
    ours = UNet(ModelConfig(dim=16, channels=3, dim_mults=(1, 2), use_convnext=False)).eval()
    copy_weights_in_order(seed_model, ours)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 150])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), seed_model(x, t), atol=1e-5, rtol=1e-5)


def test_time_embedding_formula() -> None:
    emb = SinusoidalTimeEmbedding(16)
    t = torch.tensor([0, 1, 37, 199])
    out = emb(t)
    assert out.shape == (4, 16)
    for i, tv in enumerate(t.tolist()):
        for j in range(8):
            f = math.exp(-math.log(10000) * j / 7)
            assert out[i, j].item() == pytest.approx(math.sin(tv * f), abs=1e-5)
            assert out[i, 8 + j].item() == pytest.approx(math.cos(tv * f), abs=1e-5)


# ---------------------------------------------------------------- shapes


SHAPE_CASES = [
    # (size, channels, dim_mults, use_convnext, scale_shift, learn_sigma)
    (16, 1, (1, 2), True, False, False),
    (28, 1, (1, 2, 4), True, False, False),
    (32, 3, (1, 2, 4), True, False, True),
    (16, 3, (1, 2, 2, 2), False, False, False),
    (28, 1, (1, 2), False, True, False),
    (32, 3, (1, 2, 2, 2), False, True, True),
    (28, 3, (1, 2, 4), False, False, True),
    (16, 1, (1,), True, False, False),
    # a first multiplier other than 1 (the seed's final block assumed 1)
    (16, 1, (2, 4), False, False, False),
    (16, 3, (2,), True, False, False),
]


@pytest.mark.parametrize(("size", "channels", "mults", "convnext", "scale_shift", "learn_sigma"), SHAPE_CASES)
def test_output_shapes(size, channels, mults, convnext, scale_shift, learn_sigma) -> None:
    cfg = replace(TINY, channels=channels, dim_mults=mults, use_convnext=convnext,
                  resnet_scale_shift=scale_shift, learn_sigma=learn_sigma)
    check_image_size(cfg, size)
    torch.manual_seed(0)
    m = UNet(cfg)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = m(x, torch.tensor([0, 99]))
    cout = channels * (2 if learn_sigma else 1)
    assert resolved_out_channels(cfg) == cout
    assert out.shape == (2, cout, size, size)
    assert torch.isfinite(out).all()


def test_out_dim_and_options() -> None:
    cfg = replace(TINY, out_dim=5, learn_sigma=True)
    assert resolved_out_channels(cfg) == 10
    with torch.no_grad():
        assert UNet(cfg)(torch.randn(1, 1, 16, 16), torch.tensor([1])).shape == (1, 10, 16, 16)
        m = UNet(replace(TINY, linear_attn=False, with_time_emb=False))
        x = torch.randn(2, 1, 16, 16)
        a = m(x, torch.tensor([0, 0]))
        b = m(x, torch.tensor([5, 150]))
    torch.testing.assert_close(a, b)  # without a time embedding t is ignored
    assert not any("to_qkv" in k and "downs" in k for k in m.state_dict())


def test_time_changes_output() -> None:
    torch.manual_seed(0)
    for convnext in [True, False]:
        for ss in ([False, True] if not convnext else [False]):
            m = UNet(replace(TINY, use_convnext=convnext, resnet_scale_shift=ss)).eval()
            x = torch.randn(1, 1, 16, 16).expand(2, -1, -1, -1)
            with torch.no_grad():
                out = m(x, torch.tensor([3, 170]))
            assert not torch.allclose(out[0], out[1])


def test_scale_shift_changes_the_block() -> None:
    a = UNet(replace(TINY, use_convnext=False, resnet_scale_shift=False))
    b = UNet(replace(TINY, use_convnext=False, resnet_scale_shift=True))
    # the FiLM embedding projects to twice the channels
    assert a.downs[0][0].mlp[1].out_features * 2 == b.downs[0][0].mlp[1].out_features
    assert count_parameters(b) > count_parameters(a)


def test_check_image_size() -> None:
    three = replace(TINY, dim_mults=(1, 2, 4))
    with pytest.raises(DdpmError, match="multiple of 4"):
        check_image_size(three, 30)
    for bad in [1, 2, 3, 6, 30]:
        with pytest.raises(DdpmError):
            check_image_size(three, bad)
    four = replace(TINY, dim_mults=(1, 2, 4, 8))
    for bad in [4, 2, 12, 28]:  # smaller than the factor 8, or not a multiple
        with pytest.raises(DdpmError):
            check_image_size(four, bad)
    for ok in [4, 8, 28, 32]:
        check_image_size(three, ok)
    for ok in [8, 16, 32]:
        check_image_size(four, ok)
    check_image_size(replace(TINY, dim_mults=(1,)), 7)  # one resolution: anything goes


def test_invalid_unet_size() -> None:
    for cfg in [replace(TINY, dim=1), replace(TINY, dim_mults=()), replace(TINY, dim_mults=(1, 0))]:
        with pytest.raises(DdpmError):
            UNet(cfg)


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("convnext", [True, False])
def test_grad_checkpoint_same_output_and_grads(convnext: bool, monkeypatch) -> None:
    calls = [0]
    real = unet_mod.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(unet_mod, "checkpoint", counting)
    base = replace(TINY, use_convnext=convnext, resnet_scale_shift=not convnext)
    torch.manual_seed(0)
    plain = UNet(base).train()
    ckpt = UNet(replace(base, grad_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 50, 180])
    target = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    outs, grads = [], []
    for m in [plain, ckpt]:
        m.zero_grad()
        out = m(x, t)
        ((out - target) ** 2).mean().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert calls[0] > 0  # the checkpointed path really ran
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-5, msg=k)
    # in eval / no-grad mode the plain path is used
    calls[0] = 0
    with torch.no_grad():
        ckpt.eval()(x, t)
    assert calls[0] == 0


# ---------------------------------------------------------------- blocks per level


def test_blocks_per_level() -> None:
    """The default keeps the seed's parameter names; k blocks per level add (k - 2) x the same
    blocks, and k = 1 drops the second block of every level (down and up) but the middle and final."""
    two, one, three = (UNet(replace(TINY, blocks_per_level=k)) for k in (2, 1, 3))
    assert list(two.state_dict()) == list(UNet(TINY).state_dict())
    per_level_two = count_parameters(two)
    assert count_parameters(one) < per_level_two < count_parameters(three)
    # the second block of each level holds exactly what k=1 lacks and k=3 adds once more
    second = sum(count_parameters(level[1]) for level in [*two.downs, *two.ups])
    assert per_level_two - count_parameters(one) == second == count_parameters(three) - per_level_two
    for net in (one, three):
        x = torch.randn(2, 1, 16, 16)
        out = net(x, torch.tensor([3, 7]))
        assert out.shape == x.shape and torch.isfinite(out).all()
        out.sum().backward()
        assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(DdpmError, match="blocks_per_level"):
        UNet(replace(TINY, blocks_per_level=0))
