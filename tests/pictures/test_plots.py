"""`ddpm plot` and `ddpm schedules`: Pillow charts of a run's log and of the noise schedules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import DiffusionConfig, RunConfig
from ddpm.pictures.plots import COLOURS, fmt, fmt_log, log_ticks, nice_ticks, smooth


def colour_pixels(path: Path, colour: str, tol: int = 40) -> int:
    """How many pixels are within ``tol`` (per channel) of ``colour``."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(a - rgb).max(-1) <= tol).sum())


def fake_run(run: Path, n: int = 300, T: int = 200) -> Path:
    """A run folder with a log like `ddpm train` writes: decaying losses, warm-up, a skipped step,
    and a last line cut short (a full disk)."""
    run.mkdir()
    (run / "config.json").write_text(RunConfig(diffusion=DiffusionConfig(timesteps=T)).to_json())
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, n + 1):
        base = 0.05 + 0.5 * math.exp(-step / 60) + 0.01 * rng.standard_normal()
        rec = {"step": step, "epoch": step // 50, "loss": base, "lr": 1e-3 * min(1, step / 30),
               "grad_norm": 1 + rng.random(), "img_per_s": 900.0, "skipped": int(step > 100), "time": step}
        rec.update({f"loss_q{q}": base * (2.0 - 0.4 * q) for q in range(4) if (step + q) % 7})
        lines.append(json.dumps(rec))
        if step == 100:
            lines.append(json.dumps({"step": 101, "event": "skipped", "loss": "nan", "grad_norm": "nan",
                                     "skipped": 1, "time": step}))
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 301, "lo')
    return run


def test_plot_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'loss.png'}"
    img = Image.open(run / "loss.png")
    assert img.size == (1400, 900) and img.mode == "RGB"
    for c in COLOURS[:5]:  # the loss, the four quarters, the learning rate, the gradient norm
        assert colour_pixels(run / "loss.png", c) > 200, c
    out = tmp_path / "elsewhere" / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0 and out.is_file()


def test_plot_short_and_odd_logs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0}) + "\n")
    assert main(["plot", str(run)]) == 0  # one point, no config.json, no per-quarter losses


def test_plot_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "event": "skipped", "loss": "nan"}\nnot json\n')
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no loss records" in err and "\n" not in err
    assert not (run / "loss.png").exists()


def test_schedules(tmp_path: Path) -> None:
    out = tmp_path / "schedules.png"
    assert main(["schedules", "--out", str(out), "--timesteps", "200"]) == 0
    assert Image.open(out).size == (1400, 620)
    for c in COLOURS[:4]:
        assert colour_pixels(out, c) > 500, c
    assert main(["schedules", "--timesteps", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_schedules_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["schedules"]) == 0 and (tmp_path / "schedules.png").is_file()


def test_ticks_and_labels() -> None:
    assert nice_ticks(0, 1000) == [0, 200, 400, 600, 800, 1000]
    assert nice_ticks(1, 4, integer=True) == [1, 2, 3, 4]
    assert log_ticks(1e-9, 1e5) == [1e-9, 1e-6, 1e-3, 1, 1e3]
    assert log_ticks(0.1, 10) == [0.1, 0.2, 0.5, 1, 2, 5, 10]
    assert [fmt(v) for v in (0, 0.25, 2000, 1e-5)] == ["0", "0.25", "2k", "1e-5"]
    assert [fmt_log(v) for v in (1e-6, 0.5, 1e3)] == ["1e-6", "0.5", "1e3"]


def test_smooth_keeps_gaps_and_starts_unbiased() -> None:
    y = np.array([1.0, np.nan, 1.0, 1.0])
    s = smooth(y, 10)
    assert np.isnan(s[1]) and np.allclose(s[[0, 2, 3]], 1.0)
