"""Ctrl-C and SIGTERM at any moment of a command: exit 128 + signum, one line, nothing half-made.

A signal that lands while a module imports (torch takes a second) waits for the import to end:
raised inside it, it leaves a half-initialised module, or an import guard swallows it and the
command runs on to the end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm.checkpoint import load_checkpoint
from ddpm.files import Stopped
from ddpm.interrupts import Interrupts
from helpers import tiny_run, write_config
from helpers import tiny_config as tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _module(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(body)
    return name


SELF_SIGNAL = "import os, signal, time\nos.kill(os.getpid(), signal.{sig})\ntime.sleep(0.1)\n"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("guard", [False, True])
def test_a_signal_during_an_import_waits_for_it(sig: str, guard: bool, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The module imports in full, an import guard cannot swallow the signal, and it is raised
    right after the import."""
    body = SELF_SIGNAL.format(sig=sig)
    if guard:  # what some libraries do around an optional import
        body = "try:\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "except BaseException:\n    pass\n"
    name = _module(tmp_path, f"mod_{sig}_{guard}", body + "DONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(Stopped) as e, Interrupts():
        __import__(name)
        time.sleep(2)  # the signal is raised here, right after the import
    assert time.monotonic() - t0 < 1
    assert e.value.signum == getattr(signal, sig)
    assert sys.modules[name].DONE


def test_a_signal_outside_imports_raises_at_once() -> None:
    t0 = time.monotonic()
    with pytest.raises(Stopped), Interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)
    assert time.monotonic() - t0 < 1


def test_handlers_are_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    with Interrupts():
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before


def _main_started(pid: int) -> bool:
    """The command's main() has run its first line: SIGTERM is caught (Python itself leaves it)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    caught = int(next(v for k, _, v in (ln.partition(":\t") for ln in text.splitlines()) if k == "SigCgt"), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def _interrupt(argv: list[str], sig: int, delay: float) -> tuple[int | None, list[str]]:
    """Run `ddpm ARGV`, send SIG `delay` seconds after its main() began; (status, stderr lines).
    The status is None where the command had ended before the signal could be sent."""
    proc = subprocess.Popen([sys.executable, "-m", "ddpm.cli", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while not _main_started(proc.pid) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.001)
    time.sleep(delay)
    if proc.poll() is not None:
        proc.communicate()
        return None, []
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    return proc.returncode, err.strip().splitlines()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal dispositions in /proc")
def test_ctrl_c_and_sigterm_at_any_moment_of_train_and_sample(tmp_path: Path, image_dir: Path) -> None:
    """From the first imports to the middle of the work: exit 130 (SIGINT) or 143 (SIGTERM), at
    most one line, and either no run folder or one that resumes."""
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir, max_steps=100_000, checkpoint_every=5))
    (tmp_path / "done").mkdir()
    run = tiny_run(tmp_path / "done", image_dir)
    cases = [("train", signal.SIGINT, d) for d in (0.0, 0.05, 0.3, 0.8, 2.5)]
    cases += [("train", signal.SIGTERM, d) for d in (0.2, 1.2)]
    cases += [("sample", signal.SIGINT, d) for d in (0.1, 0.7)] + [("sample", signal.SIGTERM, 0.4)]
    ran = 0
    for i, (command, sig, delay) in enumerate(cases):
        out = tmp_path / f"out{i}"
        argv = (["train", "--config", str(cfg), "--out", str(out), "--no-progress"] if command == "train" else
                ["sample", str(run), "--n", "512", "--batch-size", "512", "--out", str(out), "--no-progress"])
        status, lines = _interrupt(argv, sig, delay)
        if status is None:
            continue
        ran += 1
        where = f"{command} {sig.name} at {delay}s"
        assert status == 128 + sig, f"{where}: {status} {lines}"
        assert len(lines) <= 1 and "Traceback" not in "".join(lines), f"{where}: {lines}"
        if out.exists() and command == "train":
            assert load_checkpoint(out).step >= 1, where  # resumable
        elif out.exists():
            assert {p.name for p in out.iterdir()} >= {"grid.png", "samples.npz"}, where
    assert ran >= len(cases) - 2


def _signal_at(monkeypatch: pytest.MonkeyPatch, module: str, name: str, sig: int) -> None:
    """SIG arrives when module.name is called (after a new run's first files, before its loop)."""
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def signalled(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, signalled)


def test_a_run_stopped_before_its_first_checkpoint_leaves_none_of_its_files(
        tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ddpm.cli import main

    _signal_at(monkeypatch, "ddpm.training.run", "reset_log", signal.SIGTERM)
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "new" / "run"), "--no-progress"]) == 143
    assert capsys.readouterr().err.strip().endswith("interrupted: stopped by SIGTERM")
    assert not (tmp_path / "new").exists()


def test_a_student_stopped_before_its_first_checkpoint_leaves_none_of_its_files(
        tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ddpm.cli import main

    (tmp_path / "t").mkdir()
    teacher = tiny_run(tmp_path / "t", image_dir)
    _signal_at(monkeypatch, "ddpm.training.run", "reset_log", signal.SIGINT)
    student = tmp_path / "new" / "s"
    assert main(["distill", str(teacher), "--out", str(student), "--teacher-steps", "4", "--student-steps", "2",
                 "--steps-per-round", "2", "--device", "cpu", "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted: stopped by SIGINT")
    assert not (tmp_path / "new").exists()  # the folders made for it too, as training's
