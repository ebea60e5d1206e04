"""Our `--preset seed` network is the seed's network: the same outputs and the same gradients of
the seed's own training loss, with the same weights, at initialisation and after training.

The yardstick is the seed document's code, ../shared/bench/seed_reference.py (or $SEED_REFERENCE):
every developer and CI run has it, and CI fails without it; a user's clone skips these tests.
The history page quotes the tolerances checked here.
"""
from __future__ import annotations

from types import ModuleType

import pytest
import torch

from ddpm import preset
from ddpm.nn import UNet
from helpers import load_seed_reference

# Measured on an AVX2 EPYC (float32, one thread): outputs agree to about 1e-6 and the input's and
# every parameter's gradient to about 2e-6 of the tensor's norm; the bounds leave 10x for other kernels.
OUTPUT_TOL = 1e-5
GRAD_TOL = 2e-5


def map_state_dict(seed_net: torch.nn.Module, ours: UNet) -> dict[str, torch.Tensor]:
    """The seed's weights under our names: both list the same tensors in the same order."""
    src, dst = seed_net.state_dict(), ours.state_dict()
    assert len(src) == len(dst), (len(src), len(dst))
    mapped = {}
    for (ours_key, ours_val), (seed_key, seed_val) in zip(dst.items(), src.items()):
        assert ours_val.shape == seed_val.shape, (ours_key, seed_key)
        assert ours_key.rsplit(".", 1)[-1] == seed_key.rsplit(".", 1)[-1], (ours_key, seed_key)  # weight/bias
        mapped[ours_key] = seed_val.clone()
    return mapped


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the error relative to the tensor's size (elementwise would divide by zeros)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def train_seed(ref: ModuleType, net: torch.nn.Module, steps: int) -> None:
    """A few Adam steps of the seed's own training loss on made-up images (lr 1e-2, so every
    weight, GroupNorm's affine ones included, moves well away from its initial value)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1
        t = torch.randint(0, ref.timesteps, (4,), generator=g)
        opt.zero_grad()
        ref.p_losses(net, x, t, noise=torch.randn(x.shape, generator=g), loss_type="huber").backward()
        opt.step()


def loss_and_grads(ref: ModuleType, net: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The network's output on x_t, and the gradients of the seed's Huber loss for the input
    image and every parameter (in state-dict order, which both networks share)."""
    net.zero_grad()
    x = x0.clone().requires_grad_(True)
    x_t = ref.q_sample(x, t, noise)
    out = net(x_t, t)
    torch.nn.functional.smooth_l1_loss(noise, out).backward()
    return out.detach(), x.grad, [p.grad for p in net.parameters()]


def compare(ref: ModuleType, seed_net: torch.nn.Module, channels_last: bool) -> tuple[float, float, float]:
    """Load the seed net's weights into ours; return the worst relative error of the output, the
    input gradient, and any parameter gradient, over a batch that spans t = 0 to T - 1."""
    ours = UNet(preset("seed").model)
    ours.load_state_dict(map_state_dict(seed_net, ours))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1
    t = torch.tensor([0, 57, 120, 199])
    noise = torch.randn(x0.shape, generator=g)
    seed_out, seed_dx, seed_grads = loss_and_grads(ref, seed_net, x0, t, noise)
    if channels_last:  # what the Trainer trains with
        ours = ours.to(memory_format=torch.channels_last)
        x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
    our_out, our_dx, our_grads = loss_and_grads(ref, ours, x0, t, noise)
    names = [k for k, _ in ours.named_parameters()]
    assert len(our_grads) == len(seed_grads) == len(names)
    grad_errs = {n: rel_err(a, b) for n, a, b in zip(names, our_grads, seed_grads)}
    worst = max(grad_errs, key=grad_errs.get)
    print(f"output {rel_err(our_out, seed_out):.2e}, input grad {rel_err(our_dx, seed_dx):.2e}, "
          f"worst parameter grad {grad_errs[worst]:.2e} ({worst})")
    return rel_err(our_out, seed_out), rel_err(our_dx, seed_dx), grad_errs[worst]


@pytest.fixture(scope="module")
def ref() -> ModuleType:
    return load_seed_reference()


@pytest.fixture(scope="module")
def seed_nets(ref: ModuleType) -> dict[str, torch.nn.Module]:
    """The seed's network at initialisation and after a few training steps (made once)."""
    torch.manual_seed(0)
    init = ref.make_model()
    trained = ref.make_model()
    trained.load_state_dict(init.state_dict())
    train_seed(ref, trained, steps=2)
    moved = [rel_err(p.detach(), q.detach()) for p, q in zip(trained.parameters(), init.parameters())]
    assert min(moved) > 1e-3  # every tensor, the norms' weights included, left its init
    return {"init": init, "trained": trained}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("weights", ["init", "trained"])
def test_forward_and_backward_match_the_seed(ref: ModuleType, seed_nets: dict, weights: str,
                                             channels_last: bool) -> None:
    out_err, dx_err, grad_err = compare(ref, seed_nets[weights], channels_last)
    assert out_err < OUTPUT_TOL
    assert dx_err < GRAD_TOL
    assert grad_err < GRAD_TOL


def test_a_different_network_is_caught(seed_nets: dict) -> None:
    """The comparison is sharp enough to see one weight moved by 1e-3 of its tensor's size."""
    seed_net = seed_nets["init"]
    ours = UNet(preset("seed").model)
    state = map_state_dict(seed_net, ours)
    key = "mid_attn.fn.fn.to_out.weight" if "mid_attn.fn.fn.to_out.weight" in state else next(
        k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[key].view(-1)[0] += 1e-3 * state[key].norm()
    ours.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 1, 28, 28, generator=g), torch.tensor([5, 150])
    with torch.no_grad():
        assert rel_err(ours(x, t), seed_net(x, t)) > 10 * OUTPUT_TOL


@pytest.mark.parametrize("required", [False, True])
def test_a_missing_reference_skips_for_users_and_fails_where_required(tmp_path, required) -> None:
    """A fresh clone without ../shared passes `make test` (skips, with the reason); CI, which sets
    DDPM_REQUIRE_SEED_REFERENCE=1, fails loudly instead of skipping."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "SEED_REFERENCE": str(tmp_path / "nowhere.py")}
    env.pop("DDPM_REQUIRE_SEED_REFERENCE", None)
    if required:
        env["DDPM_REQUIRE_SEED_REFERENCE"] = "1"
    tests = Path(__file__).parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        f"{tests / 'test_unet.py'}::test_same_function_as_seed"],
                       cwd=tests.parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert "the seed reference is missing" in r.stdout, r.stdout[-2000:]
    assert str(tmp_path / "nowhere.py") in r.stdout  # SEED_REFERENCE is honoured
    if required:
        assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout[-2000:]
    else:
        assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:]
