"""The command and the networks table: --arch and each network's own flags, the one-line
refusals, and a tiny DiT trained by `ddpm train --preset dit-cond`, sampled by `ddpm sample`,
distilled by `ddpm distill` and resumed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ddpm.cli import build_config, build_parser, main
from ddpm.config import DiTConfig, ModelConfig, preset
from helpers import fake_fashion

# a DiT of a few thousand weights on 28x28 images: a step takes milliseconds
TINY_DIT = ["--hidden", "16", "--depth", "1", "--heads", "2", "--timesteps", "20", "--batch-size", "4",
            "--precision", "fp32", "--no-progress", "--no-tensorboard"]


def _parse(*argv: str):
    args = build_parser().parse_args(["train", *argv])
    args.run_dir = None
    return build_config(args)


def test_arch_and_the_dit_flags() -> None:
    cfg = _parse("--arch", "dit", "--patch-size", "4", "--depth", "3", "--hidden", "64", "--heads", "8",
                 "--mlp-ratio", "2")
    assert cfg.model == DiTConfig(patch_size=4, depth=3, hidden=64, heads=8, mlp_ratio=2.0)
    assert cfg.diffusion == preset("seed").diffusion  # only the network changed
    assert _parse("--preset", "dit").model == preset("dit").model
    assert _parse("--preset", "dit", "--arch", "unet").model == ModelConfig()
    # the fields the networks share are one flag each, set on either
    cfg = _parse("--preset", "dit", "--learn-sigma", "--num-classes", "3", "--channels", "3")
    assert cfg.model == DiTConfig(patch_size=4, hidden=96, depth=4, heads=4, learn_sigma=True, num_classes=3,
                                  channels=3)
    assert _parse("--preset", "fast-cond", "--arch", "dit").model.num_classes == 10


@pytest.mark.parametrize("argv, message", [
    (["--preset", "dit", "--dim", "8"], "--dim is not an option of the dit network (--arch dit)"),
    (["--preset", "dit", "--attn-heads", "2"], "--attn-heads is not an option of the dit network"),
    (["--preset", "fast", "--depth", "2"], "--depth is not an option of the unet network (--arch unet)"),
    (["--arch", "dit", "--dim-mults", "1,2"], "--dim-mults is not an option of the dit network"),
    (["--arch", "mlp"], "unknown arch 'mlp'; choose one of: unet, dit"),
    (["--preset", "dit", "--patch-size", "3"], "--patch-size 3 does not divide the image size 28"),
    (["--preset", "dit", "--hidden", "18"], "--hidden 18 must be a multiple of --heads 4"),
])
def test_wrong_network_flags_are_one_line(argv: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    fake_fashion(tmp_path / "fm", n_train=8, n_test=2)
    run = tmp_path / "run"
    assert main(["train", *argv, "--data", str(tmp_path / "fm"), "--max-steps", "1", "--out", str(run),
                 "--no-progress", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not run.exists()  # refused before anything was written


def test_train_and_sample_a_dit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake_fashion(tmp_path / "fm", n_train=16, n_test=4)
    run = tmp_path / "run"
    assert main(["train", "--preset", "dit-cond", *TINY_DIT, "--max-steps", "3", "--data", str(tmp_path / "fm"),
                 "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["arch"] == "dit" and saved["model"]["depth"] == 1 and saved["preset"] == "dit-cond"
    assert (run / "latest").read_text().strip() == "step-00000003"
    for sampler, steps in (("ddpm", None), ("ddim", "4")):
        out = tmp_path / sampler
        assert main(["sample", str(run), "--n", "3", "--sampler", sampler, *(["--steps", steps] if steps else []),
                     "--class", "1", "--guidance", "1", "--out", str(out)]) == 0
        with np.load(out / "samples.npz") as z:
            assert z["images"].shape == (3, 1, 28, 28) and z["images"].dtype == np.uint8
            assert z["labels"].tolist() == [1, 1, 1]
    if importlib.util.find_spec("openvino") is not None:  # the engines run the exported graph
        assert main(["sample", str(run), "--n", "2", "--sampler", "ddim", "--steps", "2", "--engine", "openvino",
                     "--out", str(tmp_path / "ov")]) == 0
    for method in ("progressive", "consistency"):  # the teacher and student are built from the table too
        student = tmp_path / method
        assert main(["distill", str(run), "--out", str(student), "--method", method, "--teacher-steps", "4",
                     "--student-steps", "2", "--steps-per-round", "2", "--batch-size", "4", "--no-progress"]) == 0
        assert json.loads((student / "config.json").read_text())["model"]["arch"] == "dit"
        assert main(["sample", str(student), "--n", "2", "--out", str(student / "s")]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--no-progress",
                 "--no-tensorboard"]) == 0
    assert (run / "latest").read_text().strip() == "step-00000004"
