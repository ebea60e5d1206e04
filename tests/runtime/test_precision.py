"""Mixed precision: bf16 autocast keeps fp32 weights and math, stays close to fp32, resumes
exactly; fp16 without CUDA is refused in one line; the CUDA-only switches are no-ops here."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from ddpm import cli
from ddpm.checkpoint import load_checkpoint
from ddpm.config import override
from ddpm.errors import DdpmError
from ddpm.nn import build_network
from ddpm.runtime.precision import autocast_dtype, fast_cuda_math, native_bf16, under_autocast
from ddpm.sampling import SampleConfig, generate, load_model
from ddpm.training.train import train

CPU = torch.device("cpu")


def test_precision_names() -> None:
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if native_bf16(CPU) else None)
    with pytest.raises(DdpmError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", CPU)
    with pytest.raises(DdpmError, match="unknown precision 'fp8'"):
        autocast_dtype("fp8", CPU)


def test_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ddpm.runtime.precision.native_bf16", lambda d: False)
    assert autocast_dtype("auto", CPU) is None
    monkeypatch.setattr("ddpm.runtime.precision.native_bf16", lambda d: True)
    assert autocast_dtype("auto", CPU) is torch.bfloat16


@pytest.mark.parametrize(("env", "capability", "native"), [
    ({}, "AVX512", True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX512", False),  # oneDNN capped: convolutions emulate bf16
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}, "AVX512", False),  # VNNI, no bf16 (any case)
    ({"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, "AVX512", False),  # the older name of the variable
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AVX512", True),
    ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "AVX512", True),
    ({}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2
])
def test_native_bf16_honours_kernel_caps(env, capability, native, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with AVX512-BF16 whose kernels are capped below it (how an AVX2 laptop is emulated)
    computes bf16 by emulation, so `auto` must pick fp32 there."""
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert native_bf16(CPU) is native
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if native else None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not native_bf16(CPU)  # no bf16 in the CPU: never native, caps or not


def test_bf16_network_is_close_to_fp32_and_returns_fp32(image_dir: Path) -> None:
    torch.manual_seed(0)
    net = build_network(tiny_config(image_dir).model).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 10, 19])
    with torch.no_grad():
        exact = net(x, t)
        fast = under_autocast(net, CPU, torch.bfloat16)(x, t)
    assert fast.dtype == torch.float32
    assert not torch.equal(fast, exact)  # it did run in bf16 ...
    rel = (fast - exact).norm() / exact.norm()
    assert rel < 0.03, rel  # ... with bf16's 8-bit mantissa, not garbage
    assert under_autocast(net, CPU, None) is net


def test_bf16_training_resumes_bit_identically(tmp_path: Path, image_dir: Path) -> None:
    cfg = tiny_config(image_dir, max_steps=4, checkpoint_every=2, precision="bf16")
    whole = train(cfg, tmp_path / "whole", device="cpu", progress=False, tensorboard=False)
    half = replace(cfg, train=override(cfg.train, max_steps=2))
    train(half, tmp_path / "split", device="cpu", progress=False, tensorboard=False)
    rest = train(cfg, tmp_path / "split", resume=True, device="cpu", progress=False, tensorboard=False)
    assert whole.step == rest.step == 4
    fp32 = replace(cfg, train=override(cfg.train, precision="fp32"))
    train(fp32, tmp_path / "fp32", device="cpu", progress=False, tensorboard=False)
    a, b, c = (load_checkpoint(tmp_path / name) for name in ("whole", "split", "fp32"))
    for k in a.model:
        assert a.model[k].dtype == torch.float32, k  # autocast: the weights stay fp32
        assert torch.equal(a.model[k], b.model[k]), k
    assert any(not torch.equal(a.model[k], c.model[k]) for k in a.model)  # and bf16 really ran


def test_bf16_sampling(tmp_path: Path, image_dir: Path) -> None:
    cfg = tiny_config(image_dir, max_steps=2)
    train(cfg, tmp_path / "run", device="cpu", progress=False, tensorboard=False)
    m = load_model(tmp_path / "run")
    sc = SampleConfig(sampler="ddim", steps=5, n=8, clip="clip")
    exact = generate(m, sc).images.float()
    fast = generate(m, replace(sc, precision="bf16")).images.float()
    assert fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # the network did run in bf16 ...
    assert (fast - exact).abs().mean() < 8  # ... of 255: the same images up to bf16 rounding


def test_fp16_on_cpu_is_one_line_and_writes_nothing(tmp_path: Path, image_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    conf = tmp_path / "c.json"
    conf.write_text(tiny_config(image_dir).to_json())
    rc = cli.main(["train", "--config", str(conf), "--out", str(tmp_path / "run"), "--precision", "fp16",
                   "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "error: --precision fp16 needs a CUDA device (on a CPU use bf16)\n"
    assert not (tmp_path / "run").exists()
    rc = cli.main(["train", "--config", str(conf), "--out", str(tmp_path / "run"), "--precision", "half"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "'half'" in err
    assert not (tmp_path / "run").exists()


def test_cuda_switches_are_harmless_without_cuda() -> None:
    """Without CUDA the switch changes none of the process's backend settings."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,  # noqa: E731
                     torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    before = flags()
    fast_cuda_math(True)
    assert flags() == before
    fast_cuda_math(False)
    assert flags() == before


def test_eval_records_the_arithmetic(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`ddpm eval RUN --precision bf16` says so in its report, and does not overwrite the fp32 one."""
    cfg = tiny_config(image_dir, max_steps=1)
    cfg = replace(cfg, data=override(cfg.data, image_size=28))  # the feature net's size
    train(cfg, tmp_path / "run", device="cpu", progress=False, tensorboard=False)
    for prec in ("fp32", "bf16"):
        assert cli.main(["eval", str(tmp_path / "run"), "--sampler", "ddim", "--steps", "2", "--n", "24",
                         "--reference", str(image_dir), "--precision", prec, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    exact = json.loads((tmp_path / "eval-ddim-2.json").read_text())
    fast = json.loads((tmp_path / "eval-ddim-2-bf16.json").read_text())
    assert (exact["arithmetic"], fast["arithmetic"]) == ("fp32", "bf16")
    assert exact["n_samples"] == fast["n_samples"] == 24
    assert exact["fd"] != fast["fd"]  # bf16 sampling really drew (slightly) different images
