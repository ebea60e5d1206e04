"""Distillation on tiny made-up data. Progressive: the 2-step student lands nearer its 4-step
teacher's deterministic DDIM output than the teacher does in 2 steps. Consistency: the student's
one evaluation lands nearer the end of the teacher's ODE than the teacher's own one step. Each
student is a run folder that resumes bit-identically and samples through `ddpm sample`."""
from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.errors import DdpmError
from ddpm.sampling.generate import load_model
from ddpm.samplers import SamplerOptions, get_sampler
from ddpm.core.schedules import space_timesteps
from ddpm.training.distill import ConsistencyDistiller, DistillConfig, Distiller, distill, round_grids, x0_target
from ddpm.training.train import Interrupted, train
from helpers import tiny_config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config(image_dir, max_steps=300, checkpoint_every=300, lr=2e-3)
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, objective="v", timesteps=40, schedule="cosine"))
    train(cfg, run, device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    return run


def ddim(run: Path, steps: int, x_T: torch.Tensor) -> torch.Tensor:
    lm = load_model(run)
    ts = space_timesteps(lm.schedule.T, steps, "trailing")
    with torch.no_grad():
        return get_sampler("ddim").fn(lm.denoiser("none"), x_T.clone(), ts, options=SamplerOptions(eta=0.0))


def test_grids_nest_and_the_target_closes_the_step() -> None:
    s, t = round_grids(40, 2)
    assert s.tolist() == [19, 39] and t.tolist() == [9, 19, 29, 39]
    # x0_target inverts one DDIM step: stepping from x_t with the target lands on x_prev, on a
    # variance-preserving level pair and on rectified flow's (alpha = 1 - t, sigma = t)
    for a_t, s_t, a_p, s_p in [(0.3**0.5, 0.7**0.5, 0.8**0.5, 0.2**0.5), (0.25, 0.75, 0.6, 0.4)]:
        a_t, s_t, a_p, s_p = (torch.tensor([v], dtype=torch.float64) for v in (a_t, s_t, a_p, s_p))
        x_t, x_prev = torch.randn(1, 5), torch.randn(1, 5)
        x0 = x0_target(a_t, s_t, a_p, s_p, x_t, x_prev)
        eps = (x_t - a_t.float() * x0) / s_t.float()
        torch.testing.assert_close(a_p.float() * x0 + s_p.float() * eps, x_prev)


@pytest.mark.slow
def test_two_step_student_beats_two_step_teacher(teacher: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    student = tmp_path / "student"
    d = DistillConfig(str(teacher), method="progressive", teacher_steps=4, student_steps=2, steps_per_round=300,
                      lr=1e-3)
    distill(d, student, device="cpu", progress=False, log=lambda s: None)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = ddim(teacher, 4, x_T)
    err_teacher = float((ddim(teacher, 2, x_T) - ref).square().mean())
    err_student = float((ddim(student, 2, x_T) - ref).square().mean())
    assert err_student < 0.5 * err_teacher, (err_student, err_teacher)
    out = tmp_path / "s"
    assert main(["sample", str(student), "--n", "4", "--out", str(out)]) == 0  # DDIM at its own 2 steps
    assert "sampler ddim: 2 steps" in capsys.readouterr().out
    assert np.load(out / "samples.npz")["images"].shape == (4, 1, 8, 8)


@pytest.mark.slow
def test_consistency_student_one_step_nears_the_ode_end(teacher: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The teacher's one DDIM step from x_T is its posterior mean; the student's one evaluation,
    after 300 steps, is measured at 0.58x the teacher's squared error to the end of the teacher's
    8-step ODE (1,000 steps: 0.17x)."""
    student = tmp_path / "student"
    d = DistillConfig(str(teacher), method="consistency", teacher_steps=8, student_steps=1, steps_per_round=300,
                      lr=1e-3)
    distill(d, student, device="cpu", progress=False, log=lambda s: None)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = ddim(teacher, 8, x_T)
    err_teacher = float((ddim(teacher, 1, x_T) - ref).square().mean())
    lm = load_model(student)
    assert lm.config.train.ema_decay == 0.95 and not lm.config.train.ema_warmup  # the target network is the EMA
    with torch.no_grad():
        one = get_sampler("consistency").fn(lm.denoiser("none"), x_T.clone(), [lm.schedule.T - 1],
                                            options=SamplerOptions())
    err_student = float((one - ref).square().mean())
    assert err_student < 0.75 * err_teacher, (err_student, err_teacher)
    out = tmp_path / "s"
    assert main(["sample", str(student), "--n", "4", "--out", str(out)]) == 0  # consistency at its own 1 step
    assert "sampler consistency: 1 steps" in capsys.readouterr().out
    assert np.load(out / "samples.npz")["images"].shape == (4, 1, 8, 8)
    assert main(["sample", str(student), "--n", "2", "--steps", "3", "--out", str(out / "3")]) == 0
    assert "sampler consistency: 3 steps" in capsys.readouterr().out


def test_consistency_target_is_the_teachers_step_at_the_lowest_level(teacher: Path, tmp_path: Path) -> None:
    """With a one-level grid every step is the boundary case: the target is the teacher's DDIM
    step to the clean end, its own x0, so the student (initialised as the teacher) has nothing
    to learn: the loss is 0 at the start."""
    d = DistillConfig(str(teacher), method="consistency", teacher_steps=1, student_steps=1, steps_per_round=1)
    distill(d, tmp_path / "s", device="cpu", progress=False, log=lambda s: None)
    first = json.loads((tmp_path / "s" / "log.jsonl").read_text().splitlines()[0])
    assert first["loss"] < 1e-6, first


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_resume_is_bit_identical(teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 method: str) -> None:
    d = DistillConfig(str(teacher), teacher_steps=8, student_steps=2, steps_per_round=4, lr=1e-3, method=method)
    if method == "consistency":  # one round of 8 steps, the target network (EMA) saved and restored
        d = replace(d, steps_per_round=8)
    distill(d, tmp_path / "a", device="cpu", progress=False, log=lambda s: None)
    kind = ConsistencyDistiller if method == "consistency" else Distiller
    real = kind.train_step

    def interrupted_at_6(self: Distiller):  # a Ctrl-C during round 2
        out = real(self)
        if self.step == 6:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(kind, "train_step", interrupted_at_6)
    with pytest.raises(Interrupted):
        distill(d, tmp_path / "b", device="cpu", progress=False, log=lambda s: None)
    monkeypatch.setattr(kind, "train_step", real)
    distill(d, tmp_path / "b", resume=True, device="cpu", progress=False, log=lambda s: None)
    for ema in (False, True):
        a = load_model(tmp_path / "a", use_ema=ema).net.state_dict()
        b = load_model(tmp_path / "b", use_ema=ema).net.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_bad_input(teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["distill", str(teacher), "--out", str(tmp_path / "s"), "--teacher-steps", "4",
                 "--student-steps", "1", "--steps-per-round", "2", "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "s" / "distill.json").is_file() and (tmp_path / "s" / "log.jsonl").is_file()
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["method"] == "consistency"  # the default
    capsys.readouterr()
    for argv, msg in [
        (["distill", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "no run or checkpoint"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--method", "progressive", "--teacher-steps", "6"],
         "power of two"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--method", "cm"], "unknown distillation"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--method", "consistency", "--target-decay", "1"],
         "--target-decay"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--method", "progressive", "--target-decay", "0.9"],
         "consistency only"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--steps-per-round", "0"], "must be positive"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--method", "consistency", "--teacher-steps", "2",
          "--student-steps", "4"], "at least --student-steps"),
        (["distill", str(teacher), "--out", str(tmp_path / "s")], "already holds a run"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_cond_drop_sets_the_null_share_of_the_students_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                method: str) -> None:
    """A conditional teacher's labels reach the student dropped to the null class at the
    teacher's training rate, or at --cond-drop; the rate measured on the batches themselves."""
    from helpers import labelled_folder

    root = labelled_folder(tmp_path / "data", n=16, size=8)
    cfg = tiny_config(root, max_steps=2, batch_size=32, checkpoint_every=2, cond_drop=0.1)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=2))
    train(cfg, tmp_path / "teacher", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    kind = ConsistencyDistiller if method == "consistency" else Distiller
    real = kind._batch
    for drop, want in [(None, 0.1), (0.6, 0.6)]:
        seen: list[torch.Tensor] = []

        def spy(self):
            x0, y = real(self)
            seen.append(y.clone())
            return x0, y

        monkeypatch.setattr(kind, "_batch", spy)
        d = DistillConfig(str(tmp_path / "teacher"), method=method, teacher_steps=4, student_steps=2,
                          steps_per_round=20, cond_drop=drop)
        out = tmp_path / f"{method}-{drop}"
        distill(d, out, device="cpu", progress=False, log=lambda s: None)
        y = torch.cat(seen)
        rate = float((y == 2).float().mean())
        assert abs(rate - want) < 4 * (want * (1 - want) / len(y)) ** 0.5, (drop, rate, len(y))
        assert json.loads((out / "config.json").read_text())["train"]["cond_drop"] == want


def test_cond_drop_bad_input(teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, msg in [
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--cond-drop", "0.5"], "class-conditional teacher"),
        (["distill", str(teacher), "--out", str(tmp_path / "x"), "--cond-drop", "1.5"], "in [0, 1]"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", [
    torch.zeros(4, 1, 8, 8),  # float, not uint8
    torch.zeros(4, 3, 8, 8, dtype=torch.uint8),  # the teacher takes one channel
    torch.zeros(4, 1, 6, 6, dtype=torch.uint8),  # and 8 x 8 images
])
def test_distill_refuses_bad_data_as_training_does(teacher: Path, tmp_path: Path, bad: torch.Tensor) -> None:
    """Distillation checks its data with training's own checks: the same one line for the same
    data, before any file is written (not even the student's folder)."""
    cfg = load_checkpoint(teacher).config
    with pytest.raises(DdpmError) as trained:
        train(replace(cfg, train=replace(cfg.train, max_steps=1)), tmp_path / "new" / "run", data=bad, device="cpu",
              progress=False, log=lambda s: None)
    d = DistillConfig(str(teacher), teacher_steps=4, student_steps=2, steps_per_round=2)
    with pytest.raises(DdpmError) as distilled:
        distill(d, tmp_path / "new" / "student", data=bad, device="cpu", progress=False, log=lambda s: None)
    assert str(distilled.value) == str(trained.value) and str(trained.value).startswith("data must be uint8")
    assert not (tmp_path / "new").exists()


def test_distill_refuses_labels_outside_the_teachers_classes(tmp_path: Path) -> None:
    """A conditional teacher's labels are checked as training checks them, not met as an index
    error in the class embedding at the first step."""
    from helpers import labelled_folder

    root = labelled_folder(tmp_path / "data", n=8, size=8)
    cfg = tiny_config(root, max_steps=1, checkpoint_every=1)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=2))
    train(cfg, tmp_path / "teacher", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    data = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    d = DistillConfig(str(tmp_path / "teacher"), teacher_steps=4, student_steps=2, steps_per_round=2)
    for labels, msg in [(torch.full((8,), 5), r"labels must lie in \[0, 1\], got 5..5"),
                        (torch.zeros(8), "int64 labels, one per image")]:
        with pytest.raises(DdpmError, match=msg):
            distill(d, tmp_path / "new" / "student", data=data, labels=labels, device="cpu", progress=False,
                    log=lambda s: None)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_a_student_stopped_before_its_first_checkpoint_leaves_nothing(teacher: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      method: str) -> None:
    """Ctrl-C as the student's log starts, after its config.json and distill.json are written:
    a student that could never be sampled or resumed is removed, with the folders made for it."""
    import ddpm.training.run as run_mod

    def ctrl_c(*args: object) -> None:
        assert (tmp_path / "new" / "student" / "distill.json").is_file()  # written, then removed
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "reset_log", ctrl_c)
    d = DistillConfig(str(teacher), method=method, teacher_steps=4, student_steps=2, steps_per_round=2)
    with pytest.raises(KeyboardInterrupt):
        distill(d, tmp_path / "new" / "student", device="cpu", progress=False, log=lambda s: None)
    assert not (tmp_path / "new").exists()


def test_distillation_builds_on_the_public_training_api() -> None:
    """One training API: distill.py imports no private name of the training modules (their fixes
    reach it through run_training)."""
    import ast

    import ddpm.training.distill as distill_mod

    tree = ast.parse(Path(distill_mod.__file__).read_text())
    private = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names if a.name.startswith("_")]
    assert private == []
    assert "run_training" in {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
