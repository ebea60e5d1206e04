"""`--precision bf16` where bfloat16 is emulated: it runs, after one `warning:` line quoting the
slowdown measured by bench/bf16_cost.py (whose JSON the quoted figures must match)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddpm.runtime.precision as precision
from ddpm.cli import main
from ddpm.training.train import train
from helpers import tiny_config

CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "engines" / "bf16_cost.json"


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: False)
    monkeypatch.setattr(precision, "_warned", set())


def test_one_warning_line_per_process(emulated: None, capsys: pytest.CaptureFixture) -> None:
    assert precision.autocast_dtype("auto", CPU) is None  # auto avoids it silently
    assert capsys.readouterr().err == ""
    assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16  # warned, not refused
    err = capsys.readouterr().err
    assert err.startswith("warning: --precision bf16 is emulated here (this CPU has no AVX512-BF16 or AMX)")
    assert err.count("\n") == 1 and "x slower training" in err and "x slower sampling" in err
    assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert capsys.readouterr().err == ""


def test_no_warning_where_native(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: True)
    monkeypatch.setattr(precision, "_warned", set())
    assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert capsys.readouterr().err == ""


def test_quoted_figures_are_the_measured_ones() -> None:
    got = json.loads(RESULTS.read_text())
    assert not got["machine"]["native_bf16"]  # measured where bf16 is emulated
    want = {"training": got["train_seed"]["bf16_over_fp32"], "sampling": got["sample_seed"]["bf16_over_fp32"]}
    assert precision.EMULATED_BF16_SPEED == pytest.approx(want, abs=0.005)
    assert all(0 < v < 1 for v in want.values())


def test_sample_and_train_warn_once(emulated: None, tmp_path: Path, image_dir: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    train(tiny_config(image_dir, max_steps=1, precision="bf16"), tmp_path / "run", device="cpu",
          progress=False, tensorboard=False, log=lambda s: None)
    assert capsys.readouterr().err.count("warning: --precision bf16 is emulated") == 1
    precision._warned.clear()  # as a new process would start
    argv = ["sample", str(tmp_path / "run"), "--n", "2", "--sampler", "ddim", "--steps", "3",
            "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--precision bf16 is emulated" in err
    assert (tmp_path / "s" / "samples.npz").is_file()
