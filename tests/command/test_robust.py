"""Crash safety and hostile input: kills, signals, NaNs, full disks and bad files and flags.

Each bad input of docs/hostile-inputs.md has its test here or in test_cli.py / test_data.py.
Training runs single-threaded: CPU kernels then give the same bits every time, and on a
busy two-core machine one thread is also many times faster than two.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ddpm.checkpoint
from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.config import RunConfig
from ddpm.core.diffusion import LossTerms
from ddpm.training.train import Trainer, train
from helpers import small_disk
from helpers import tiny_config as tiny
from helpers import write_config

train_mod = importlib.import_module("ddpm.training.train")  # ddpm.train is also the function
trainer_mod = importlib.import_module("ddpm.training.trainer")  # where the step looks up training_losses
run_mod = importlib.import_module("ddpm.training.run")  # where the run looks up its loaders
runlog_mod = importlib.import_module("ddpm.training.runlog")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*argv: Any) -> list[str]:
    return [sys.executable, "-m", "ddpm.cli", *map(str, argv)]


def latest(run: Path) -> str:
    try:
        return (run / "latest").read_text().strip()
    except FileNotFoundError:
        return ""


def wait_for(cond: Any, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the test could stop it"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.002)


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor of the weights, the EMA and the training state is bit-identical."""
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs"
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert_same_tree(sa, sb, "state")


def assert_same_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------ resume and crash safety


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, image_dir: Path) -> None:
    # cosine lr with warm-up, EMA warm-up, flips, a sample grid: everything a resume must restore.
    # Every run is a fresh process, so all of them run the code now on disk (others edit it too).
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=12, checkpoint_every=4, sample_every=5,
                                                     lr_schedule="cosine", warmup_steps=3, max_grad_norm=1.0))
    ref, run = tmp_path / "ref", tmp_path / "run"
    quiet = {"env": SUBPROCESS_ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    reference = subprocess.Popen(cli("train", "--config", cfg, "--out", ref, "--no-progress"), **quiet)

    # 1. kill -9 as soon as the first checkpoint is complete
    proc = subprocess.Popen(cli("train", "--config", cfg, "--out", run, "--no-progress"), **quiet)
    wait_for(lambda: latest(run) != "", proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    # 2. resume, and kill -9 again between checkpoints, once it has logged past its start
    start = int(latest(run).split("-")[1])
    proc = subprocess.Popen(cli("train", "--out", run, "--resume", "--no-progress"), **quiet)
    wait_for(lambda: max(log_steps(run)) > start + 1 and latest(run) != "step-00000012", proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    for line in (run / "log.jsonl").read_text().splitlines():  # whole lines only, even after kill -9
        json.loads(line)
    # 3. resume to the end
    assert subprocess.run(cli("train", "--out", run, "--resume", "--no-progress"), **quiet).returncode == 0
    assert reference.wait() == 0

    assert latest(run) == latest(ref) == "step-00000012"
    assert_same_checkpoint(ref / "checkpoints" / "step-00000012", run / "checkpoints" / "step-00000012")
    assert log_steps(run) == log_steps(ref) == list(range(1, 13))  # no step twice, none missing
    assert not list((run / "checkpoints").glob(".*"))  # no half-written checkpoint left behind


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes(tmp_path: Path, image_dir: Path) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=100_000, checkpoint_every=3))
    run = tmp_path / "run"
    proc = subprocess.Popen(cli("train", "--config", cfg, "--out", run, "--no-progress"), env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: latest(run) != "", proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    stopped = int(err.split("at step ")[1].split(";")[0])
    assert latest(run) == f"step-{stopped:08d}"
    assert load_checkpoint(run).step == stopped
    assert main(["train", "--out", str(run), "--resume", "--max-steps", str(stopped + 2), "--no-progress"]) == 0
    assert latest(run) == f"step-{stopped + 2:08d}"


def test_sigint_saves_and_exits_130(tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    step = Trainer.train_step

    def ctrl_c_at_step_3(self: Trainer) -> Any:
        out = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_at_step_3)
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=50, checkpoint_every=10))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 130
    assert "stopped by SIGINT at step 3" in capsys.readouterr().err
    assert latest(run) == "step-00000003"


def test_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with train_mod._StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and exits == []
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def nan_losses(monkeypatch: pytest.MonkeyPatch, bad: Any) -> None:
    """Make training_losses return NaN on the calls for which bad(call_number) is true."""
    real = trainer_mod.training_losses
    calls = [0]

    def losses(*args: Any, **kwargs: Any) -> LossTerms:
        calls[0] += 1
        terms = real(*args, **kwargs)
        if bad(calls[0]):
            return terms._replace(loss=terms.loss * float("nan"))
        return terms

    monkeypatch.setattr(trainer_mod, "training_losses", losses)


def test_nonfinite_steps_are_skipped_and_logged(tmp_path: Path, image_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    nan_losses(monkeypatch, lambda call: call in (3, 4))
    data = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    res = train(tiny(image_dir, max_steps=5), tmp_path / "run", data=data, progress=False, log=lambda s: None)
    assert res.step == 5 and res.skipped == 2
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skips = [r for r in recs if r.get("event") == "skipped"]
    assert [(r["step"], r["loss"], r["skipped"]) for r in skips] == [(3, "nan", 1), (3, "nan", 2)]
    assert [r["step"] for r in recs if "event" not in r] == [1, 2, 3, 4, 5]
    assert recs[-1]["skipped"] == 2
    ck = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in ck.model.values())


def test_many_nonfinite_steps_stop_keeping_last_good(tmp_path: Path, image_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    nan_losses(monkeypatch, lambda call: call > 4)
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=10))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 20 non-finite losses in a row after step 4") and "\n" not in err
    assert "learning rate" in err and "step-00000004" in err
    assert latest(run) == "step-00000004" and load_checkpoint(run).step == 4
    assert sum(json.loads(line).get("event") == "skipped" for line in (run / "log.jsonl").open()) == 20


def test_huge_learning_rate_stops_with_one_line(tmp_path: Path, image_dir: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=60, checkpoint_every=1000, lr=1e30))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "non-finite" in err and "--lr" in err and "\n" not in err


def test_max_grad_norm_clips(image_dir: Path, tmp_path: Path) -> None:
    data = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    tr = Trainer(tiny(image_dir, max_grad_norm=1e-3), tmp_path, data, torch.device("cpu"))
    out = tr.train_step()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.model.parameters()]))
    assert float(out.grad_norm) > 1e-2  # the reported norm is the one before clipping
    assert float(after) <= 1e-3 * (1 + 1e-4)


def test_adam_beta2_reaches_the_optimiser(image_dir: Path, tmp_path: Path) -> None:
    """Adam's second-moment decay: v_1 = (1 - beta2) g^2 after one step, so the state tells."""
    data = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    tr = Trainer(tiny(image_dir, adam_beta2=0.9), tmp_path, data, torch.device("cpu"))
    assert tr.opt.param_groups[0]["betas"] == (0.9, 0.9)
    tr.train_step()
    p = next(q for q in tr.model.parameters() if q.grad is not None and q.grad.abs().sum() > 0)
    torch.testing.assert_close(tr.opt.state[p]["exp_avg_sq"], 0.1 * p.grad.float() ** 2, rtol=1e-4, atol=1e-12)


def test_unwritable_run_folder_before_training(tmp_path: Path, image_dir: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write to run folder") and "\n" not in err


def test_full_disk_during_checkpoint_keeps_last_good(tmp_path: Path, image_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A write that fails mid-checkpoint (here: the third file of the second checkpoint)."""
    real, calls = ddpm.checkpoint.write_new, [0]

    def write_new(path: Path, data: bytes) -> None:
        calls[0] += 1
        if calls[0] == 8:  # 5 files in the first checkpoint (and latest apart): the 3rd of the second
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(ddpm.checkpoint, "write_new", write_new)
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=6))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: cannot write checkpoint {run / 'checkpoints' / 'step-00000004'}: "
                          "No space left on device; the last good checkpoint is ")
    assert err.endswith("step-00000002")
    assert latest(run) == "step-00000002" and load_checkpoint(run, with_state=True).step == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no half-written folder
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # and it resumes from there


def test_real_full_disk_during_checkpoint(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A 2 MB tmpfs that really fills while the second checkpoint (about 1 MB) is written."""
    with small_disk(tmp_path / "disk", size="2m") as disk:
        cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=6, keep=2))
        run = disk / "run"
        assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress", "--no-tensorboard"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert err.startswith(f"error: cannot write checkpoint {run / 'checkpoints' / 'step-00000004'}: "
                              "No space left on device; the last good checkpoint is "), err
        assert err.endswith("step-00000002")
        assert latest(run) == "step-00000002" and load_checkpoint(run, with_state=True).step == 2
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # room again
        assert main(["train", "--out", str(run), "--resume", "--no-progress", "--no-tensorboard"]) == 0
        assert latest(run) == "step-00000006"


def test_full_disk_while_logging(tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    def write(self: Any, record: Any) -> None:
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(runlog_mod.JsonLog, "write", write)
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=6))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write ") and "log.jsonl: No space left on device" in err
    assert err.endswith("step-00000002") and "\n" not in err


# ------------------------------------------------------------------ watching a run


def test_log_records_and_config_reproduces_run(tmp_path: Path, image_dir: Path) -> None:
    run, again = tmp_path / "run", tmp_path / "again"
    train(tiny(image_dir, log_every=2), run, progress=False, log=lambda s: None)
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 4]
    for r in recs:
        assert {"loss", "lr", "grad_norm", "img_per_s", "skipped", "epoch", "time"} <= r.keys()
        assert any(k.startswith("loss_q") for k in r) and r["img_per_s"] > 0
    assert main(["train", "--config", str(run / "config.json"), "--out", str(again), "--no-progress"]) == 0
    assert RunConfig.load(again / "config.json") == RunConfig.load(run / "config.json")
    assert_same_checkpoint(run / "checkpoints" / "step-00000004", again / "checkpoints" / "step-00000004")


def test_tensorboard_absent(tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    train(tiny(image_dir, max_steps=2), tmp_path / "run", progress=False, log=lambda s: None)
    assert latest(tmp_path / "run") == "step-00000002" and not (tmp_path / "run" / "tb").exists()


def test_tensorboard_present(tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    class SummaryWriter:
        def __init__(self, log_dir: str, purge_step: int | None = None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append(("scalar", tag, step))

        def add_image(self, tag: str, img: np.ndarray, step: int, dataformats: str) -> None:
            assert img.dtype == np.uint8 and img.ndim == 3 and dataformats == "HWC"
            calls.append(("image", tag, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    run = tmp_path / "run"
    train(tiny(image_dir, sample_every=2), run, progress=False, log=lambda s: None)
    assert calls[0] == ("init", str(run / "tb"), 1) and calls[-1] == ("close",)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/skipped"):
        assert ("scalar", tag, 4) in calls
    assert [c for c in calls if c[0] == "image"] == [("image", "samples", 2), ("image", "samples", 4)]
    calls.clear()
    train(tiny(image_dir, max_steps=6), run, resume=True, progress=False, log=lambda s: None)
    assert calls[0] == ("init", str(run / "tb"), 5)  # events a killed run wrote after step 4 are purged
    calls.clear()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "7", "--no-tensorboard", "--no-progress"]) == 0
    assert calls == []


# ------------------------------------------------------------------ hostile input (docs/hostile-inputs.md)


def one_error_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A finished run that failed commands aim at; it must come through unchanged."""
    root = tmp_path_factory.mktemp("existing")
    train(tiny(image_dir), root / "run", progress=False, log=lambda s: None)
    write_config(root / "cfg.json", tiny(image_dir))
    return root / "run"


def files_of(run: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}


BAD_TRAIN_FLAGS = [
    (["--max-steps", "-3"], "--max-steps must be positive"),
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--epochs", "nan"], "--epochs must be a finite number"),
    (["--minutes", "inf"], "--minutes must be a finite number"),
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--batch-size", "100"], "batch size 100 must be between 1 and the 24 images"),
    (["--lr", "-1"], "learning rate must be positive"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--ema-decay", "1.5"], "EMA decay must be in [0, 1)"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
    (["--adam-beta2", "nan"], "--adam-beta2 must be a finite number"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be positive"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be at least 0"),
    (["--sample-every", "-1"], "--sample-every must be at least 0"),
    (["--keep", "0"], "--keep must be at least 1"),
    (["--timesteps", "0"], "--timesteps must be between 1 and"),
    (["--timesteps", "100000000000"], "--timesteps must be between 1 and"),
    (["--min-snr-gamma", "-1"], "--min-snr-gamma must be a finite number > 0"),
    (["--offset-noise", "-1"], "--offset-noise must be a finite number >= 0"),
    (["--lognormal-std", "0"], "--lognormal-std finite and > 0"),
    (["--lognormal-mean", "nan"], "--lognormal-mean must be finite"),
    (["--t-sampling", "beta"], "unknown t-sampling 'beta'"),
    (["--blocks-per-level", "0"], "model.blocks_per_level must be between 1"),
    (["--class-emb-std", "-1"], "--class-emb-std must be a finite number >= 0"),
    (["--vlb-weight", "nan"], "--vlb-weight must be a finite number >= 0"),
    (["--channels", "2"], "channels must be 1 (grey) or 3 (RGB)"),
    (["--dim", "0"], "invalid U-Net size"),
    (["--dim-mults", "0"], "invalid U-Net size"),
    (["--image-size", "0"], "image size 0 does not fit"),
    (["--image-size", "10", "--dim-mults", "1,2,4"], "image size 10 does not fit"),
    (["--schedule", "zigzag"], "unknown schedule 'zigzag'"),
    (["--objective", "q"], "unknown objective 'q'"),
    (["--lr-schedule", "zig"], "unknown lr-schedule 'zig'"),
    (["--loss-weighting", "x"], "unknown loss-weighting 'x'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flags(flags: list[str], message: str, existing_run: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture) -> None:
    cfg = existing_run.parent / "cfg.json"
    src = ["--preset", "seed"] if "--preset" in flags else ["--config", str(cfg)]
    before = files_of(existing_run)
    assert main(["train", *src, *flags, "--out", str(tmp_path / "new"), "--no-progress"]) == 2
    one_error_line(capsys, message)
    # the same flags aimed at an existing run with --resume damage nothing there
    if "--preset" not in flags:
        assert main(["train", "--out", str(existing_run), "--resume", *flags, "--no-progress"]) == 2
        capsys.readouterr()
    assert files_of(existing_run) == before


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read config"),
    (json.dumps({"train": {"bogus": 1}}), "unknown config key train.bogus"),
    (json.dumps({"train": {"lr": "fast"}}), "train.lr must be a number, got 'fast'"),
    (json.dumps({"model": {"dim_mults": 4}}), "model.dim_mults must be a list"),
    (json.dumps({"diffusion": {"schedule": "zigzag"}}), "unknown diffusion.schedule 'zigzag'"),
    (json.dumps({"train": 5}), "train must be an object"),
    ("5", "a config must be a JSON object, got int"),
    ("[1, 2]", "a config must be a JSON object, got list"),
])
def test_bad_config_file(content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, message)
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "cannot read config", "missing.json")


@pytest.mark.parametrize("argv", [["train", "--max-steps", "abc"], ["train", "--dim-mults", "1,x"],
                                  ["train", "--nonsense"], ["sample"], ["frobnicate"]])
def test_unparseable_flags_are_argparse_errors(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "Traceback" not in err


def test_existing_run_is_never_damaged(existing_run: Path, image_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    before = files_of(existing_run)
    cfg = existing_run.parent / "cfg.json"
    junk = tmp_path / "junk"
    junk.mkdir()
    for argv, message in [
        (["train", "--config", str(cfg), "--out", str(existing_run)], "already holds a run; use --resume"),
        (["train", "--out", str(existing_run), "--resume", "--dim", "16"], "different model config"),
        (["train", "--out", str(existing_run), "--resume", "--schedule", "cosine"], "different diffusion config"),
        (["train", "--out", str(existing_run), "--resume", "--dataset", str(junk)], "different data config"),
        (["sample", str(existing_run), "--sampler", "nope"], "unknown sampler"),
        (["sample", str(existing_run), "--steps", "0"], "steps must be between 1 and T=20"),
    ]:
        assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
        one_error_line(capsys, message)
    assert files_of(existing_run) == before


def make_run_copy(existing_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(existing_run, tmp_path / "run"))


def test_truncated_training_state_on_resume(existing_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    run = make_run_copy(existing_run, tmp_path)
    st = run / "checkpoints" / "step-00000004" / "state.pt"
    st.write_bytes(st.read_bytes()[:100])
    before = files_of(run)
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    one_error_line(capsys, "step-00000004 is damaged: state.pt does not match its checksum")
    assert files_of(run) == before  # not even config.json or log.jsonl was rewritten


def test_checkpoint_of_a_different_config(existing_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """A config edited by hand with its checksum forged still cannot load the wrong weights."""
    import hashlib

    run = make_run_copy(existing_run, tmp_path)
    ck = run / "checkpoints" / "step-00000004"
    c = json.loads((ck / "config.json").read_text())
    c["model"]["dim"] = 16
    (ck / "config.json").write_text(json.dumps(c))
    meta = json.loads((ck / "meta.json").read_text())
    meta["sha256"]["config.json"] = hashlib.sha256((ck / "config.json").read_bytes()).hexdigest()
    (ck / "meta.json").write_text(json.dumps(meta))
    assert main(["sample", str(ck), "--n", "1"]) == 2
    one_error_line(capsys, "does not match its config")


@pytest.mark.parametrize("meta", ["[]", json.dumps({"format_version": 1, "step": 1, "sha256": {}}),
                                  json.dumps({"format_version": "1", "step": 1, "sha256": {"x": "y"}}),
                                  json.dumps({"format_version": 99, "step": 1,
                                              "sha256": {"model.safetensors": "", "config.json": ""}})])
def test_not_a_checkpoint(meta: str, tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "meta.json").write_text(meta)
    assert main(["sample", str(ck)]) == 2
    one_error_line(capsys, str(ck))
    assert main(["sample", str(image_dir / "img00.png")]) == 2
    one_error_line(capsys, "is not a checkpoint")


def test_empty_and_unreadable_data_folders(tmp_path: Path, existing_run: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(existing_run.parent / "cfg.json")
    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.mkdir()
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    for folder, message in [(empty, "no PNG/JPEG images found under"),
                            (bad, "none of the 2 images under"), (tmp_path / "missing", "does not exist")]:
        assert main(["train", "--config", cfg, "--dataset", str(folder), "--out", str(tmp_path / "r")]) == 2
        one_error_line(capsys, message)
        assert not (tmp_path / "r" / "config.json").exists()


def write_mixed_images(folder: Path) -> list[str]:
    """Every Pillow mode a user might have, in odd sizes, and three broken files; returns the broken names."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (15, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[..., 0]).convert("1").save(folder / "bilevel.png")
    Image.fromarray((rng.integers(0, 65536, (9, 20))).astype(np.uint16)).save(folder / "deep16.png")
    (folder / "sub").mkdir()
    Image.fromarray(rgb).convert("CMYK").save(folder / "sub" / "cmyk.jpg")
    Image.fromarray(rgb).resize((40, 8)).save(folder / "wide.png")
    good = (folder / "grey.png").read_bytes()
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("this is not an image")
    return ["zero.png", "truncated.png", "notes.jpg"]


@pytest.mark.parametrize("channels", ["1", "3"])
def test_mixed_modes_and_broken_files_through_cli(channels: str, tmp_path: Path, existing_run: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    broken = write_mixed_images(tmp_path / "mixed")
    argv = ["train", "--config", str(existing_run.parent / "cfg.json"), "--dataset", str(tmp_path / "mixed"),
            "--channels", channels, "--batch-size", "4", "--max-steps", "1", "--out", str(tmp_path / "r"),
            "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(broken) and all(line.startswith("warning: skipping cannot read image ") for line in err)
    for name in broken:
        assert any(name in line for line in err)
    ck = load_checkpoint(tmp_path / "r")
    assert ck.config.model.channels == int(channels)


def write_idx_folder(folder: Path, images: bytes) -> None:
    folder.mkdir()
    labels = b"\0\0\x08\x01" + struct.pack(">I", 2) + b"\1\2"
    for split in ("train", "t10k"):
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(labels)
        (folder / f"{split}-images-idx3-ubyte").write_bytes(images)


@pytest.mark.parametrize("images, message", [
    (b"\x12\x34\x08\x03" + bytes(12), "is not an IDX file (bad magic number 12340803)"),
    (b"\0\0\x08\x03" + struct.pack(">3I", 10, 28, 28) + bytes(100), "holds 100 data bytes"),
    (b"\0\0\x08\x03" + bytes(5), "truncated inside its header"),
    (b"", "is not an IDX file"),
])
def test_bad_idx_files_through_cli(images: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_idx_folder(tmp_path / "idx", images)
    argv = ["train", "--preset", "seed", "--data", str(tmp_path / "idx"), "--max-steps", "1",
            "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 2
    one_error_line(capsys, message)


def test_resume_takes_a_new_learning_rate(tmp_path: Path, image_dir: Path) -> None:
    run = tmp_path / "run"
    train(tiny(image_dir), run, progress=False, log=lambda s: None)
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--lr", "1e-4", "--no-progress"]) == 0
    lrs = [r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    assert lrs == [1e-3] * 4 + [1e-4] * 2


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--steps", "0"], "steps must be between 1 and T=20"),
    (["--steps", "999"], "steps must be between 1 and T=20"),
    (["--n", "0"], "--n and --batch-size must be at least 1"),
    (["--sampler", "ddim", "--eta", "-1"], "eta must be between 0 and 1"),
    (["--index", "99", "--gif"], "--index must be between 0 and 63"),
    (["--spacing", "zz"], "unknown spacing 'zz'"),
    (["--clip", "zz"], "unknown clip 'zz'"),
    (["--variance", "learned"], "needs a model trained with learned variances"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_sample_flags(flags: list[str], message: str, existing_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = files_of(existing_run)
    assert main(["sample", str(existing_run), *flags]) == 2
    one_error_line(capsys, message)
    assert files_of(existing_run) == before


def test_resume_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    one_error_line(capsys, "has no checkpoint to resume from")
    assert not (tmp_path / "none").exists()
    assert main(["train", "--resume"]) == 2
    one_error_line(capsys, "--resume needs the run")


# ------------------------------------------------------------------ a kill during a checkpoint write


def _kill_at(n: int) -> None:
    """In a forked child: patch every step of a checkpoint write (before each file, with each file
    half written, before each rename, folder fsync and delete) to SIGKILL the process at step ``n``.
    (After one step is before the next: the disk looks the same; the last is the finished write.)"""
    import shutil

    import ddpm.files

    count = [0]

    def hit() -> None:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            hit()
            return fn(*args, **kwargs)
        return step

    real_write = ddpm.files.write_new

    def write_new(path: Path, data: bytes) -> None:
        hit()
        with open(path, "wb") as f:  # half the file on disk, then (maybe) the kill
            f.write(data[: len(data) // 2])
        hit()
        real_write(path, data)

    ddpm.files.write_new = ddpm.checkpoint.write_new = write_new
    os.replace = wrap(os.replace)
    shutil.rmtree = wrap(shutil.rmtree)
    ddpm.checkpoint.fsync_dir = wrap(ddpm.checkpoint.fsync_dir)
    ddpm.files.fsync_dir = wrap(ddpm.files.fsync_dir)


def test_kill_at_every_point_of_a_checkpoint_write(tmp_path: Path, image_dir: Path) -> None:
    import shutil

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    run, spare = tmp_path / "run", tmp_path / "spare"
    tr = Trainer(tiny(image_dir, keep=1), run, images, torch.device("cpu"))
    for _ in range(2):
        tr.train_step()
    tr.save()  # step 2: the last good checkpoint
    for _ in range(2):
        tr.train_step()
    shutil.copytree(run, spare)
    ema = tr.ema.model.state_dict() if tr.ema is not None else None
    blobs = ddpm.checkpoint._serialise(tr.cfg, tr.step, tr.model.state_dict(), ema, tr.state())
    outcomes: list[int] = []
    for n in range(1, 200):
        pid = os.fork()
        if pid == 0:  # the child writes the checkpoint of step 4 and is killed at point n
            try:
                _kill_at(n)
                ddpm.checkpoint._serialise = lambda *args: blobs  # the same bytes, serialised once
                tr.save()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):  # n is past the last point: the write completed
            assert latest(run) == "step-00000004"
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        ck = ddpm.checkpoint.resolve_checkpoint(run)  # never a damaged one: the old or the new, whole
        _, step = ddpm.checkpoint._verify(ck, with_state=True)  # every listed file, the training state too
        assert step in (2, 4)
        if step == 4:
            assert all((ck / name).read_bytes() == data for name, data in blobs.items())
        outcomes.append(step)
        if step == 2 and outcomes.count(2) == 1 or step == 4 and outcomes.count(4) == 1:
            # a full resume from each outcome, to the end of the budget
            res = train(tiny(image_dir, keep=1, max_steps=6), run, resume=True, data=images, progress=False,
                        log=lambda s: None)
            assert res.step == 6 and not list((run / "checkpoints").glob(".*"))
        shutil.rmtree(run)
        shutil.copytree(spare, run)
    else:
        pytest.fail("the checkpoint write never completed")
    assert len(outcomes) >= 15 and outcomes[0] == 2 and outcomes[-1] == 4  # many points, both outcomes


# ------------------------------------------------------------------ what a checkpoint lists


def test_a_file_missing_from_the_listing_is_damage(existing_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """No forged checksum needed: the listing itself is what is wrong."""
    for drop, argv in [("ema.safetensors", ["sample", "RUN", "--n", "1"]),
                       ("state.pt", ["train", "--out", "RUN", "--resume", "--max-steps", "6", "--no-progress"])]:
        run = make_run_copy(existing_run, tmp_path / drop)
        ck = run / "checkpoints" / "step-00000004"
        meta = json.loads((ck / "meta.json").read_text())
        del meta["sha256"][drop]
        (ck / "meta.json").write_text(json.dumps(meta))
        before = files_of(run)
        assert main([str(run) if a == "RUN" else a for a in argv]) == 2
        one_line = capsys.readouterr().err.strip()
        assert one_line.startswith(f"error: checkpoint {ck} is damaged: ") and drop in one_line
        assert files_of(run) == before


@pytest.mark.parametrize("content", ["../../other/checkpoints/step-00000004\n", "/etc\n", "step-4/../x",
                                     "\xff\xfe junk", "step-00000004" + "x" * 5_000_000])
def test_latest_names_only_this_runs_checkpoints(content: str, existing_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    other = make_run_copy(existing_run, tmp_path / "other")
    run = make_run_copy(existing_run, tmp_path / "mine")
    (run / "latest").write_bytes(content.encode("utf-8", "surrogateescape"))
    assert other.exists()
    for argv in (["sample", str(run), "--n", "1"], ["train", "--out", str(run), "--resume", "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run / 'latest'} names ") and "not a checkpoint of this run" in err
        assert len(err) < 400 and "\n" not in err


# ------------------------------------------------------------------ more hostile input


@pytest.mark.parametrize("model, message", [
    ({"out_dim": 5}, "model.out_dim must be 1"),
    ({"out_dim": 0}, "model.out_dim must be between 1"),
    ({"init_dim": 0}, "model.init_dim must be between 1"),
    ({"attn_heads": 0}, "model.attn_heads must be between 1"),
    ({"attn_dim_head": 0}, "model.attn_dim_head must be between 1"),
    ({"dim": 10**20}, "invalid U-Net size"),
    ({"dim_mults": [1, 10**20]}, "invalid U-Net size"),
])
def test_networks_that_could_never_sample_are_refused(model: dict, message: str, existing_run: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    c = json.loads((existing_run.parent / "cfg.json").read_text())
    c["model"].update(model)
    (tmp_path / "c.json").write_text(json.dumps(c))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["--dim", str(10**20)], ["--dim-mults", f"1,{10**20}"]])
def test_absurd_widths_from_flags(argv: list[str], existing_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    cfg = str(existing_run.parent / "cfg.json")
    assert main(["train", "--config", cfg, *argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    one_error_line(capsys, "invalid U-Net size")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def thin_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 x 10,000,000 pixels in about 19 KB: a decompression bomb by aspect ratio."""
    p = tmp_path_factory.mktemp("thin") / "thin.png"
    Image.new("L", (1, 10_000_000)).save(p)
    return p


def test_a_thin_image_is_refused_not_resized(thin_png: Path, image_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    import shutil

    from ddpm.data.readers import load_image_folder

    assert thin_png.stat().st_size < 100_000
    assert main(["noise", "--image", str(thin_png), "--out", str(tmp_path / "n.png")]) == 2
    one_error_line(capsys, "1 x 10,000,000 pixels, too thin")
    folder = Path(shutil.copytree(image_dir, tmp_path / "imgs"))
    shutil.copy(thin_png, folder)
    with pytest.warns(UserWarning, match="too thin"):  # skipped among good images, as a broken file is
        assert load_image_folder(folder, 8, 1).shape == (24, 1, 8, 8)


def test_resume_takes_the_checkpoints_config_not_a_cut_config_json(existing_run: Path, tmp_path: Path) -> None:
    run = make_run_copy(existing_run, tmp_path)
    c = json.loads((run / "config.json").read_text())
    for key in ("batch_size", "lr"):
        del c["train"][key]
    del c["model"]
    (run / "config.json").write_text(json.dumps(c))
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    ck = load_checkpoint(run)
    assert ck.step == 6 and ck.config.train.batch_size == 8 and ck.config.train.lr == 1e-3
    assert ck.config.model == load_checkpoint(existing_run).config.model


def test_a_bad_resume_value_is_never_saved(existing_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run_copy(existing_run, tmp_path)
    before = files_of(run)
    assert main(["train", "--out", str(run), "--resume", "--lr", "1e308", "--max-steps", "40", "--no-progress"]) == 2
    one_error_line(capsys, "non-finite")
    assert (run / "config.json").read_bytes() == before[run / "config.json"][0]
    assert latest(run) == "step-00000004"
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1"])
def test_seeds_outside_int64(seed: str, existing_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(existing_run.parent / "cfg.json")
    for argv in (["train", "--config", cfg, "--out", str(tmp_path / "r"), "--no-progress"],
                 ["sample", str(existing_run), "--n", "1"],
                 ["noise", "--out", str(tmp_path / "n.png")],
                 ["eval", "--samples", "x.npz"]):
        assert main([*argv, "--seed", seed]) == 2
        one_error_line(capsys, "--seed must be between 0 and 2**62")
    assert list(tmp_path.iterdir()) == []  # no empty run folder


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], "--size must be between 1 and"),
    (["--size", "100000"], "--size must be between 1 and"),
    (["--timesteps", "100000000000"], "--timesteps must be between 1 and"),
    (["--t", ",".join(["0"] * 1000)], "give 1 to 64 --t values"),
])
def test_bad_noise_flags(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["noise", *argv, "--out", str(tmp_path / "n.png")]) == 2
    assert len(one_error_line(capsys, message)) < 400
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("section, key", [("train", "lr"), ("data", "source"), ("train", "bogus" * 10_000_000)])
def test_a_50_mb_config_value_is_cut_in_the_message(section: str, key: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    value = "x" * 50_000_000
    (tmp_path / "c.json").write_text(json.dumps({section: {key: value if len(key) < 20 else 1}}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert len(one_error_line(capsys)) < 2100
    assert not (tmp_path / "r").exists()


def test_a_failed_train_leaves_no_empty_run_folder(existing_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cfg = str(existing_run.parent / "cfg.json")
    (tmp_path / "empty").mkdir()
    for extra in (["--dataset", str(tmp_path / "empty")], ["--channels", "2"], ["--seed", str(2**64)],
                  ["--batch-size", "100"]):
        out = tmp_path / "runs" / "deep" / "r"
        assert main(["train", "--config", cfg, *extra, "--out", str(out), "--no-progress"]) == 2
        one_error_line(capsys)
        assert not (tmp_path / "runs").exists(), extra


def test_sigterm_while_sampling_writes_nothing(existing_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    gen_mod = importlib.import_module("ddpm.sampling.generate")
    real = gen_mod.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the sampler runs
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate", generate)
    assert main(["sample", str(existing_run), "--n", "2", "--out", str(tmp_path / "s")]) == 143
    err = capsys.readouterr().err.strip()
    assert err == "interrupted: stopped by SIGTERM"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("phase", ["load_data", "load_checkpoint"])
def test_sigterm_before_training_starts(phase: str, existing_run: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """SIGTERM while the data loads (a new run) or the checkpoint loads (--resume): exit 143, and
    neither an empty run folder nor a changed file is left."""
    real = getattr(run_mod, phase)

    def stopped(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, phase, stopped)
    run = make_run_copy(existing_run, tmp_path) if phase == "load_checkpoint" else tmp_path / "new" / "run"
    before = files_of(run) if run.exists() else {}
    src = ["--resume", "--max-steps", "6"] if run.exists() else ["--config", str(existing_run.parent / "cfg.json")]
    assert main(["train", *src, "--out", str(run), "--no-progress"]) == 143
    assert capsys.readouterr().err.strip().endswith("interrupted: stopped by SIGTERM")
    assert (files_of(run) == before) if before else not (tmp_path / "new").exists()
