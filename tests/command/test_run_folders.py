"""Outputs go only under the folder given (or --out), never onto a run's own files, and a run
folder is written by one command at a time (RUN/.lock, held while it is written)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm.cli import main
from ddpm.files import check_outside_run_files, run_files_under, run_lock
from ddpm.training.train import train
from helpers import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("runfolders")
    train(tiny_config(image_dir, max_steps=2), root / "run", progress=False, log=lambda s: None, tensorboard=False)
    (root / "cfg.json").write_text(tiny_config(image_dir, max_steps=4).to_json())
    return root / "run"


def files_of(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_a_copied_checkpoint_folder_writes_only_under_itself(run: Path, tmp_path: Path) -> None:
    """A checkpoint folder copied out of RUN/checkpoints/: sample and export write inside
    it, and the unrelated folders two levels up keep every file."""
    ck = next((run / "checkpoints").glob("step-*"))
    elsewhere = tmp_path / "a" / "b"
    shutil.copytree(ck, elsewhere / "ck")
    (tmp_path / "a" / "samples").mkdir()
    (tmp_path / "a" / "samples" / "grid.png").write_bytes(b"someone else's")
    (tmp_path / "a" / "samples" / "denoising.gif").write_bytes(b"someone else's too")
    before = files_of(tmp_path / "a" / "samples")
    assert main(["sample", str(elsewhere / "ck"), "--n", "2", "--steps", "2", "--sampler", "ddim", "--gif",
                 "--no-progress"]) == 0
    assert (elsewhere / "ck" / "samples" / "grid.png").is_file()
    assert main(["export", str(elsewhere / "ck"), "--onnx"]) == 0
    assert (elsewhere / "ck" / "model.onnx").is_file()
    assert files_of(tmp_path / "a" / "samples") == before
    assert not (elsewhere / "samples").exists() and not (tmp_path / "samples").exists()
    # and the copy still loads: the outputs beside its files do not disturb its checksums
    assert main(["sample", str(elsewhere / "ck"), "--n", "1", "--steps", "2", "--sampler", "ddim",
                 "--no-progress"]) == 0


def test_a_checkpoint_inside_its_run_still_writes_to_the_runs_samples(run: Path, tmp_path: Path) -> None:
    ck = next((run / "checkpoints").glob("step-*"))
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    assert main(["sample", str(out / "checkpoints" / ck.name), "--n", "1", "--steps", "2", "--sampler", "ddim",
                 "--no-progress"]) == 0
    assert (out / "samples" / "grid.png").is_file() and not (out / "checkpoints" / ck.name / "samples").exists()


@pytest.mark.parametrize("argv, where", [
    (lambda r: ["export", str(r), "--onnx", "--out", str(r / "latest")], "latest"),
    (lambda r: ["export", str(r), "--onnx", "--out", str(r / "config.json")], "config.json"),
    (lambda r: ["sample", str(r), "--n", "1", "--steps", "2", "--sampler", "ddim", "--out", str(r / "checkpoints")],
     "checkpoints"),
    (lambda r: ["sample", str(r), "--n", "1", "--steps", "2", "--sampler", "ddim", "--out",
                str(r / "checkpoints" / "mine")], "checkpoints"),
    (lambda r: ["eval", "--samples", str(r / "samples" / "samples.npz"), "--out", str(r / "guide" / "e")], "guide"),
    (lambda r: ["plot", str(r), "--out", str(r / "log.jsonl")], "log.jsonl"),
    (lambda r: ["distill", str(r), "--out", str(r / "checkpoints" / "student"), "--no-progress"], "checkpoints"),
    (lambda r: ["train", "--config", str(r.parent / "cfg.json"), "--out", str(r / "checkpoints" / "x"),
                "--no-progress"], "checkpoints"),
])
def test_outputs_on_a_runs_own_files_are_refused(run: Path, argv, where: str, capsys) -> None:
    before = files_of(run)
    assert main(argv(run)) == 2
    one_line(capsys, "lies on the run", f"own {where}")
    assert files_of(run) == before


def test_the_runs_own_files_are_named_by_one_helper(run: Path, tmp_path: Path) -> None:
    assert run_files_under(run / "checkpoints" / "step-1" / "x.png") == (run.resolve(), "checkpoints")
    assert run_files_under(run / "samples" / "grid.png") is None
    assert run_files_under(tmp_path / "checkpoints" / "x") is None  # not a run's
    link = tmp_path / "link"
    link.symlink_to(run / "checkpoints")
    with pytest.raises(Exception, match="own checkpoints"):
        check_outside_run_files(link / "new")


def test_a_second_writer_of_a_run_is_refused_at_once_naming_the_first(run: Path, tmp_path: Path, capsys) -> None:
    r = tmp_path / "r"
    shutil.copytree(run, r)
    with run_lock(r, ["ddpm", "train", "--out", str(r), "--resume", "--lr", "1e-3"]):
        before = files_of(r)
        t0 = time.monotonic()
        assert main(["train", "--out", str(r), "--resume", "--max-steps", "4", "--no-progress"]) == 2
        err = one_line(capsys, f"run {r} is being written by another ddpm", f"pid {os.getpid()}",
                       "--lr 1e-3")
        assert time.monotonic() - t0 < 5  # before the data loads or the model is built
        assert main(["distill", str(r), "--out", str(r), "--no-progress"]) == 2
        assert files_of(r) == before
    assert "since" in err
    assert main(["train", "--out", str(r), "--resume", "--max-steps", "4", "--no-progress"]) == 0  # released


def test_a_killed_writer_leaves_no_lock_behind(run: Path, tmp_path: Path) -> None:
    r = tmp_path / "r"
    shutil.copytree(run, r)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ddpm.files import run_lock\n"
        f"with run_lock(Path({str(r)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--out", str(r), "--resume", "--max-steps", "3", "--no-progress"]) == 2
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        holder.kill()
    assert main(["train", "--out", str(r), "--resume", "--max-steps", "3", "--no-progress"]) == 0


def test_sampling_a_run_being_trained_is_allowed(run: Path, tmp_path: Path) -> None:
    with run_lock(run):
        assert main(["sample", str(run), "--n", "1", "--steps", "2", "--sampler", "ddim", "--out",
                     str(tmp_path / "s"), "--no-progress"]) == 0


def test_a_checkpoint_standing_alone_takes_no_guide_from_above(run: Path, tmp_path: Path, capsys) -> None:
    ck = next((run / "checkpoints").glob("step-*"))
    shutil.copytree(ck, tmp_path / "mine" / "ck")
    shutil.copytree(ck, tmp_path / "guide")  # unrelated, two levels up
    assert main(["sample", str(tmp_path / "mine" / "ck"), "--n", "1", "--steps", "2", "--sampler", "ddim",
                 "--autoguidance", "1", "--out", str(tmp_path / "s")]) == 2
    one_line(capsys, "has no guiding model")
    assert not (tmp_path / "s").exists()


def test_outputs_onto_a_checkpoint_folders_own_files_are_refused(run: Path, tmp_path: Path, capsys) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(next((run / "checkpoints").glob("step-*")), ck)
    before = files_of(ck)
    assert main(["export", str(ck), "--onnx", "--out", str(ck / "model.safetensors")]) == 2
    one_line(capsys, "own model.safetensors")
    assert files_of(ck) == before


@pytest.mark.slow
def test_a_torchrun_job_on_a_run_being_written_stops_in_every_process(run: Path, tmp_path: Path) -> None:
    """Only the main process checks and takes the lock; the others learn of its refusal and stop
    with it rather than waiting for it in the first collective."""
    r = tmp_path / "r"
    shutil.copytree(run, r)
    with run_lock(r, ["ddpm", "train", "--out", str(r)]):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        p = subprocess.run([*torchrun, "-m", "ddpm.cli", "train", "--out", str(r), "--resume", "--max-steps", "4",
                            "--device", "cpu", "--no-progress", "--no-tensorboard"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count(f"error: run {r} is being written by another ddpm (pid {os.getpid()} on ") == 1, p.stderr
    assert p.stderr.count("error: the main process of this job refused the run folder") == 1, p.stderr
