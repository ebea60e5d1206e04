"""Every request is bounded: memory and work estimated before the work starts, what the machine
cannot hold refused in one line (the estimate and the limit), nothing written. The limit is set
small with DDPM_MEMORY_LIMIT, so that no test allocates what it asks for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import ModelConfig
from ddpm.errors import DdpmError
from ddpm.runtime import budget
from ddpm.sampling.editing import RePaintConfig, jump_schedule, repaint_steps

LIMIT = "4G"


@pytest.fixture
def small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(budget.ENV, LIMIT)


def _one_refusal(capsys: pytest.CaptureFixture, *wanted: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in wanted:
        assert w in err, err
    return err


def _fmnist_inputs(d: Path) -> tuple[Path, Path]:
    a = np.zeros((28, 28), np.uint8)
    a[6:22, 8:20] = 200
    Image.fromarray(a).save(d / "img.png")
    m = np.full((28, 28), 255, np.uint8)
    m[:, 14:] = 0
    Image.fromarray(m).save(d / "mask.png")
    return d / "img.png", d / "mask.png"


def test_sample_that_cannot_fit_is_refused(small_machine: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["sample", "fashion-mnist", "--n", "100000", "--batch-size", "100000", "--out", str(out)]) == 2
    err = _one_refusal(capsys, "this request needs about", "GiB", "the network at batch size 100000",
                       "4.0 GiB (DDPM_MEMORY_LIMIT)", "try --batch-size ")
    suggested = int(err.rsplit("--batch-size ", 1)[1])
    assert 1 <= suggested < 100000
    assert not out.exists()


def test_the_suggested_batch_size_fits(small_machine: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ddpm.config import SampleConfig
    from ddpm.sampling.generate import check_sample_config, load_model

    model = load_model("fashion-mnist")
    with pytest.raises(DdpmError, match="try --batch-size") as e:
        check_sample_config(model, SampleConfig(n=100000, batch_size=100000))
    b = int(str(e.value).rsplit("--batch-size ", 1)[1])
    check_sample_config(model, SampleConfig(n=100000, batch_size=b))  # no refusal at the advice given


def test_train_batch_refused_before_the_data_loads(small_machine: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import ddpm.training.run as run_module

    def no_loading(cfg: object) -> None:
        raise AssertionError("the data was loaded before the batch was checked")

    monkeypatch.setattr(run_module, "load_data", no_loading)
    out = tmp_path / "run"
    assert main(["train", "--preset", "fast", "--max-steps", "1", "--batch-size", "60000", "--out", str(out)]) == 2
    _one_refusal(capsys, "a training step at batch size 60000", "4.0 GiB", "try --batch-size ")
    assert not out.exists()


def test_train_image_size_that_cannot_fit(small_machine: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--image-size", "512", "--out", str(out)]) == 2
    _one_refusal(capsys, "not even at --batch-size 1", "a smaller --image-size than 512")
    assert not out.exists()


def test_distill_batch_refused(small_machine: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "student"
    assert main(["distill", "fashion-mnist", "--out", str(out), "--batch-size", "60000"]) == 2
    _one_refusal(capsys, "a training step at batch size 60000", "try --batch-size ")
    assert not out.exists()


def test_edit_that_cannot_fit_is_refused(small_machine: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img, _ = _fmnist_inputs(tmp_path)
    out = tmp_path / "out"
    assert main(["edit", "fashion-mnist", "--image", str(img), "--strength", "0.5", "--n", "100000",
                 "--batch-size", "100000", "--out", str(out)]) == 2
    _one_refusal(capsys, "this request needs about", "try --batch-size ")
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--resample", "1000000000"], ["--resample", "100000", "--jump-length", "100"]])
def test_inpaint_work_is_bounded(flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img, mask = _fmnist_inputs(tmp_path)
    out = tmp_path / "out"
    assert main(["inpaint", "fashion-mnist", "--image", str(img), "--mask", str(mask), *flags,
                 "--out", str(out)]) == 2
    _one_refusal(capsys, "sampler steps (network evaluations) per batch", f"{budget.MAX_STEPS:,}")
    assert not out.exists()


def test_eval_real_negative_n(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--real", "--n", "-1", "--out", str(tmp_path / "out")]) == 2
    _one_refusal(capsys, "--n must be at least 1, got -1")
    assert not (tmp_path / "out").exists()


def test_repaint_steps_counts_the_jump_schedule() -> None:
    for steps in (1, 5, 20, 33):
        for j in (1, 2, 3, 10, 40):
            for r in (1, 2, 5):
                levels = jump_schedule(steps, j, r)
                assert repaint_steps(steps, RePaintConfig(j, r)) == sum(b < a for a, b in zip(levels, levels[1:]))


def test_memory_limit_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert budget.parse_size("4G") == 4 * 2**30
    assert budget.parse_size("512MiB") == 512 * 2**20
    assert budget.parse_size("1000") == 1000
    with pytest.raises(DdpmError, match="DDPM_MEMORY_LIMIT"):
        budget.parse_size("lots")
    monkeypatch.setenv(budget.ENV, "1.5g")
    assert budget.available_memory() == budget.Available(int(1.5 * 2**30), budget.ENV)
    monkeypatch.delenv(budget.ENV)
    assert 0 < budget.available_memory().bytes < 2**62  # the machine's own figure


MEASURE = """
import json, resource, sys, torch
from ddpm.config import ModelConfig
from ddpm.nn import UNet
torch.set_num_threads(1)
cfg, size, batch, train = ModelConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
net = UNet(cfg).train(train)
x, t = torch.randn(batch, cfg.channels, size, size), torch.zeros(batch, dtype=torch.long)
with torch.no_grad():
    net(x[:1], t[:1])  # lazy initialisations outside the measurement
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024  # resident now, KiB
if train:
    net(x, t).square().mean().backward()
else:
    with torch.inference_mode():
        net(x, t)
# VmHWM: this address space's own peak (ru_maxrss would carry the parent's peak across fork and exec)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
print((peak - before) * 1024)
"""


@pytest.mark.parametrize("train", [False, True])
def test_estimate_against_a_measured_peak(train: bool) -> None:
    """The resident memory a real CPU step adds (in a fresh process) lies below the estimate and
    above a quarter of it."""
    cfg = ModelConfig(dim=16, dim_mults=(1, 2), attn_heads=2, attn_dim_head=16)
    size, batch = 32, 48 if train else 256  # steps that rise well above the imports' own peak
    spec = {"dim": cfg.dim, "dim_mults": list(cfg.dim_mults), "attn_heads": 2, "attn_dim_head": 16}
    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec), str(size), str(batch), str(int(train))],
                       capture_output=True, text=True, check=True)
    measured = int(r.stdout.split()[-1])
    estimate = budget.MARGIN * budget.network_peak(cfg, size, batch, train=train)
    assert estimate / 4 < measured < estimate, (measured, estimate)
