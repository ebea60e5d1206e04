"""`--engine openvino|openvino-int8`: the network run by OpenVINO computes the eager network's
function (fp32) or a close one (int8, calibrated on the sampling's own inputs, mixed across
steps), for unconditional and class-conditional models under guidance; bad requests are one
line and exit status 2."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.config import SampleConfig
from ddpm.engines import CALIBRATION_CALLS, CALIBRATION_IMAGES, calibration_inputs, with_engine
from ddpm.errors import DdpmError
from ddpm.sampling.generate import generate, load_model
from ddpm.training.train import train
from helpers import tiny_config, tiny_run

pytestmark = pytest.mark.slow  # the whole file: see pyproject's markers

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnx")


def _run(tmp: Path, image_dir: Path, num_classes: int = 0) -> Path:
    """A tiny run trained 4 steps (helpers.tiny_run)."""
    return tiny_run(tmp, image_dir, num_classes)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    return _run(tmp_path_factory.mktemp("engines"), image_dir)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum().sqrt() / (a**2).sum().sqrt())


def test_openvino_fp32_samples_the_same_images(run: Path) -> None:
    cfg = SampleConfig(sampler="ddim", steps=5, n=6, batch_size=4, seed=3)
    model = load_model(run, device="cpu")
    ref = generate(model, cfg).images
    got = generate(with_engine(model, "openvino", cfg), cfg).images
    assert got.shape == ref.shape
    assert (got.int() - ref.int()).abs().max() <= 1  # uint8 images: at most a rounding apart
    assert type(model.net).__name__ == "UNet"  # the caller's model keeps its eager network


def test_int8_calibration_mixes_the_steps(run: Path) -> None:
    """Every calibration batch holds several noise levels (a batch per step made NNCF clip the
    others: grey-noise samples from a trained network), and together they cover the sampler's steps."""
    cfg = SampleConfig(sampler="ddpm", steps=20, n=64, seed=0)
    model = load_model(run, device="cpu")
    feeds = calibration_inputs(model, cfg)
    assert len(feeds) == min(CALIBRATION_CALLS, 20)
    assert sum(len(f[0]) for f in feeds) == CALIBRATION_IMAGES * len(feeds)
    ts = np.concatenate([f[1] for f in feeds])
    assert ts.min() == 0 and ts.max() == 19 and len(np.unique(ts)) == 20
    assert all(len(np.unique(f[1])) > 1 for f in feeds)
    assert all(f[0].shape[1:] == (1, 8, 8) and f[0].dtype == np.float32 for f in feeds)


def test_long_samplers_calibrate_on_a_coarse_grid(tmp_path: Path, image_dir: Path) -> None:
    """A 100-step request calibrates on the same sampler at CALIBRATION_CALLS steps (a fixed cost),
    spanning the same noise levels."""
    cfg = tiny_config(image_dir)
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, timesteps=100))
    train(cfg, tmp_path / "run", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    model = load_model(tmp_path / "run", device="cpu")
    seen = []
    real = model.net.forward
    model.net.forward = lambda x, t, *c: seen.append(1) or real(x, t, *c)
    feeds = calibration_inputs(model, SampleConfig(sampler="ddpm", steps=None, n=500))  # ddpm's own: all 100
    ts = np.unique(np.concatenate([f[1] for f in feeds]))
    assert len(seen) == CALIBRATION_CALLS == len(feeds) == len(ts)
    assert ts.min() == 0 and ts.max() >= 90


def test_int8_network_is_close_to_fp32(run: Path) -> None:
    cfg = SampleConfig(sampler="ddpm", steps=20, n=64, seed=0)
    model = load_model(run, device="cpu")
    int8 = with_engine(model, "openvino-int8", cfg).net
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 20, (32,), generator=gen)
    with torch.inference_mode():
        a, b = model.net(x, t).float(), int8(x, t)
    err = _rel_error(a, b)
    print(f"int8 relative error {err:.4f}")
    assert 0 < err < 0.2, err  # int8, not fp32: some error, but the same function


def test_conditional_model_under_guidance(tmp_path: Path, image_dir: Path) -> None:
    """The class input goes through, and guidance's null class is in the calibration set."""
    run = _run(tmp_path, image_dir, num_classes=3)
    cfg = SampleConfig(sampler="ddim", steps=4, n=6, batch_size=6, seed=1, classes="all", guidance=2.0)
    model = load_model(run, device="cpu")
    feeds = calibration_inputs(model, cfg)
    assert len(feeds[0]) == 3 and set(np.concatenate([f[2] for f in feeds]).tolist()) == {0, 1, 2, 3}
    ref = generate(model, cfg).images
    assert (generate(with_engine(model, "openvino", cfg), cfg).images.int() - ref.int()).abs().max() <= 1
    got = generate(with_engine(model, "openvino-int8", cfg), cfg).images
    assert got.shape == ref.shape and torch.isfinite(got.float()).all()


@pytest.mark.parametrize("classes, seen", [("none", {3}), (None, {0, 1, 2})])
def test_conditional_model_without_classes(tmp_path: Path, image_dir: Path, classes, seen) -> None:
    """A conditional model sampled with --class none (the network's null class) or with no
    --class (labels drawn per image): the same images as eager, and calibration records the
    labels the request uses."""
    run = _run(tmp_path, image_dir, num_classes=3)
    cfg = SampleConfig(sampler="dpm++2m", steps=4, n=5, batch_size=5, seed=2, classes=classes)
    model = load_model(run, device="cpu")
    feeds = calibration_inputs(model, cfg)
    assert len(feeds[0]) == 3 and set(np.concatenate([f[2] for f in feeds]).tolist()) <= seen
    assert classes is not None or len(set(np.concatenate([f[2] for f in feeds]).tolist())) > 1
    ref = generate(model, cfg).images
    assert (generate(with_engine(model, "openvino", cfg), cfg).images.int() - ref.int()).abs().max() <= 1
    assert generate(with_engine(model, "openvino-int8", cfg), cfg).images.shape == ref.shape


def test_command_samples_with_an_engine(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    assert main(["sample", str(run), "--engine", "openvino-int8", "--sampler", "ddim", "--steps", "3", "--n", "4",
                 "--out", str(out), "--no-progress"]) == 0
    assert (out / "grid.png").is_file() and np.load(out / "samples.npz")["images"].shape[0] == 4


@pytest.mark.parametrize("extra, message", [
    (["--engine", "tensorrt"], "unknown --engine 'tensorrt'; choose one of: torch, openvino, openvino-int8"),
    (["--engine", "openvino", "--precision", "bf16"], "--engine openvino sets its own arithmetic"),
])
def test_bad_engine_requests_are_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          extra: list[str], message: str) -> None:
    out = tmp_path / "never"
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--sampler", "ddim", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (out / "grid.png").exists()


def test_nll_refuses_an_engine(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(run), "--nll", "--engine", "openvino"]) == 2
    assert "--engine applies to sampling" in capsys.readouterr().err


def test_missing_package_says_what_to_install(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError
    model = load_model(run, device="cpu")
    with pytest.raises(DdpmError, match=r"--engine openvino-int8 needs the nncf package: pip install 'ddpm\[openvino\]'"):
        with_engine(model, "openvino-int8", SampleConfig(sampler="ddim", steps=2, n=2))


def test_eval_names_its_report_by_engine(image_dir: Path, tmp_path: Path) -> None:
    """An int8 report never overwrites the eager one, and says which engine drew its images."""
    import json

    cfg = tiny_config(image_dir)
    cfg = replace(cfg, data=replace(cfg.data, image_size=28))  # the feature net's size
    run = tmp_path / "run28"
    train(cfg, run, device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    common = ["--n", "8", "--sampler", "ddim", "--steps", "3", "--reference", str(image_dir), "--out", str(tmp_path),
              "--no-progress"]
    assert main(["eval", str(run), *common]) == 0
    assert main(["eval", str(run), "--engine", "openvino-int8", *common]) == 0
    eager = json.loads((tmp_path / "eval-ddim-3.json").read_text())
    int8 = json.loads((tmp_path / "eval-ddim-3-openvino-int8.json").read_text())
    assert eager["arithmetic"] == "fp32" and int8["arithmetic"] == "openvino-int8"
    assert int8["n_samples"] == eager["n_samples"] == 8


def test_int8_without_vnni_warns_once(run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Without VNNI, int8 measured an FD far from fp32's: one warning line, and it still runs."""
    import ddpm.engines as engines

    cfg = SampleConfig(sampler="ddim", steps=3, n=2, seed=0)
    model = load_model(run, device="cpu")
    for vnni, warned in ((False, True), (True, False), (None, False)):  # None: flags unreadable
        monkeypatch.setattr(engines, "cpu_has_vnni", lambda v=vnni: v)
        assert generate(with_engine(model, "openvino-int8", cfg), cfg).images.shape == (2, 1, 8, 8)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
        assert len(err) == int(warned), err
        if warned:
            assert "VNNI" in err[0] and f"{engines.INT8_FD_WITHOUT_VNNI:.2f}x" in err[0]


@pytest.mark.parametrize(("env", "vnni"), [({}, None), ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
                                           ({"OV_CPU_MAX_ISA": "avx2"}, False),
                                           ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, None)])
def test_vnni_detection_honours_kernel_caps(env, vnni, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ddpm.engines as engines

    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OV_CPU_MAX_ISA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for flags, has in (("fpu avx2 avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True), ("fpu avx2 fma", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        real = engines.Path
        monkeypatch.setattr(engines, "Path", lambda p, real=real, info=info: info if p == "/proc/cpuinfo" else real(p))
        assert engines.cpu_has_vnni() is (has if vnni is None else vnni)
        monkeypatch.setattr(engines, "Path", real)
