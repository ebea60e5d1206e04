"""End to end through the command, on a few dozen tiny images the test makes itself."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import RunConfig
from helpers import tiny_config, write_config


def test_train_resume_sample(tmp_path: Path, image_dir: Path) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny_config(image_dir, sample_every=3))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert (run / "latest").read_text().strip() == "step-00000004"
    assert (run / "samples" / "step-00000003.png").is_file()
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in logs)
    saved = RunConfig.load(run / "config.json")
    assert saved.model.dim == 8 and saved.data.image_size == 8

    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert (run / "latest").read_text().strip() == "step-00000006"
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # keep=2

    out = tmp_path / "samples"
    assert main(["sample", str(run), "--n", "5", "--batch-size", "3", "--gif", "--out", str(out)]) == 0
    imgs = np.load(out / "samples.npz")["images"]
    assert imgs.shape == (5, 1, 8, 8) and imgs.dtype == np.uint8
    assert Image.open(out / "grid.png").size[0] > 8
    gif = Image.open(out / "denoising.gif")
    assert gif.n_frames == 21  # x_T plus one frame per step of the 20

    for sampler, steps in (("ddim", 5), ("dpm++2m", 5), ("heun", 3)):
        assert main(["sample", str(run / "checkpoints" / "step-00000006"), "--n", "2", "--sampler", sampler,
                     "--steps", str(steps), "--out", str(tmp_path / sampler)]) == 0


def test_noise_figure(tmp_path: Path, image_dir: Path) -> None:
    out = tmp_path / "noise.png"
    assert main(["noise", "--image", str(image_dir / "img00.png"), "--size", "12", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 5 * 12


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--preset", "seed", "--schedule", "zigzag", "--out", "{tmp}/r"], "unknown schedule"),
    (["train", "--preset", "seed", "--loss", "l3", "--out", "{tmp}/r"], "unknown loss"),
    (["train", "--preset", "seed", "--batch-size", "0", "--out", "{tmp}/r"], "batch size"),
    (["train", "--preset", "seed", "--image-size", "30", "--out", "{tmp}/r"], "image size 30"),
    (["train", "--preset", "seed", "--dataset", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
    (["train", "--preset", "seed", "--max-steps", "-3", "--out", "{tmp}/r"], "positive"),
    (["sample", "{tmp}/nothing"], "no run or checkpoint"),
    (["noise", "--image", "{tmp}/none.png"], "none.png"),
    (["noise", "--t", "0,500"], "--t"),
])
def test_bad_input_one_line(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_bad_checkpoints(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny_config(image_dir, max_steps=2))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    ck = run / "checkpoints" / "step-00000002"
    capsys.readouterr()
    # a truncated weights file is caught by its checksum
    w = ck / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    assert main(["sample", str(ck), "--n", "1"]) == 2
    assert "damaged" in capsys.readouterr().err
    w.write_bytes(data)
    # a config that does not match the weights
    c = json.loads((ck / "config.json").read_text())
    c["model"]["dim"] = 16
    (ck / "config.json").write_text(json.dumps(c))
    assert main(["sample", str(ck), "--n", "1"]) == 2
    assert "damaged" in capsys.readouterr().err  # the config's checksum no longer matches
    # a file that is not a checkpoint at all
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "meta.json").write_text("not json")
    assert main(["sample", str(junk)]) == 2
    assert "meta.json" in capsys.readouterr().err
    # an existing run is never overwritten
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_eval_samples_against_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`ddpm eval --samples` with the shipped feature net, offline, against a reference folder."""
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(40):
        a = np.zeros((28, 28), np.uint8)
        a[4:24, 6 + i % 5: 20 + i % 5] = 180 + i
        Image.fromarray(a).save(ref / f"r{i}.png")
    fake = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=fake)
    assert main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(ref)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_samples"] == 40 and report["n_reference"] == 40 and report["fd"] > 0
    assert report["fd_reference"] is None and report["source"].endswith("samples.npz")
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", images=fake.astype(np.float32))
    assert main(["eval", "--samples", str(tmp_path / "bad.npz"), "--reference", str(ref)]) == 2
    assert "uint8" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "exactly one" in capsys.readouterr().err
