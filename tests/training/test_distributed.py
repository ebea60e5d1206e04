"""Two CPU processes under torchrun (gloo): identical weights in both, the same trajectory as one
process, one writer, and resume across a change in the number of processes."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_config

from ddpm.checkpoint import load_checkpoint
from ddpm.config import override
from ddpm.runtime.distributed import Dist, from_env
from ddpm.errors import DdpmError
from ddpm.training.runlog import read_log
from ddpm.training.train import train

pytestmark = pytest.mark.slow  # the whole file: see pyproject's markers

WORKER = Path(__file__).parent / "dist_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(TORCHRUN + args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the gradient sum in another order: float rounding, amplified a little by Adam
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


def test_two_processes_train_like_one_and_resume_across_counts(tmp_path: Path, image_dir: Path) -> None:
    cfg = tiny_config(image_dir, max_steps=4, checkpoint_every=2)
    conf = write_config(tmp_path / "c.json", cfg)
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun([str(WORKER), str(conf), str(two), str(tmp_path)], tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["step"], r0["main"], r1["step"], r1["main"]) == (4, True, 4, False)
    for k, v in r0["weights"].items():  # DDP: the same averaged gradient, the same Adam step
        assert torch.equal(v, r1["weights"][k]), k

    # one writer: one log record per step, one checkpoint folder per save, no rank-1 leftovers
    assert [r["step"] for r in read_log(two / "log.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    ck = load_checkpoint(two)
    _close(ck.model, r0["weights"])
    assert ck.ema is not None

    # the same global batch, t and noise as one process: the same trajectory
    res = train(cfg, one, device="cpu", progress=False, tensorboard=False)
    assert res.model is not None
    _close(res.model.state_dict(), r0["weights"])

    # resume across a change of process count: 2 -> 1 here, 1 -> 2 through the CLI under torchrun
    longer = replace(cfg, train=override(cfg.train, max_steps=6))
    a = train(longer, two, resume=True, device="cpu", progress=False, tensorboard=False)
    _torchrun(["-m", "ddpm.cli", "train", "--config", str(write_config(tmp_path / "c6.json", longer)),
               "--out", str(one), "--resume", "--device", "cpu", "--no-progress", "--no-tensorboard"], tmp_path)
    b = load_checkpoint(one)
    assert (a.step, b.step) == (6, 6)
    assert a.model is not None
    _close(a.model.state_dict(), b.model)
    assert [r["step"] for r in read_log(one / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_single_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d, dev = from_env(torch.device("cpu"))
    assert d == Dist() and d.main and not d.active and dev == torch.device("cpu")
    assert Dist(rank=1, world=4).shard(8) == slice(2, 4)


@pytest.mark.parametrize("env,msg", [
    ({"WORLD_SIZE": "two"}, "not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "outside WORLD_SIZE"),
])
def test_bad_launch_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], msg: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DdpmError, match=msg):
        from_env(torch.device("cpu"))


def test_batch_must_split_over_processes(tmp_path: Path, image_dir: Path) -> None:
    cfg = tiny_config(image_dir, batch_size=7)
    p = subprocess.run(TORCHRUN + ["-m", "ddpm.cli", "train", "--config", str(write_config(tmp_path / "c.json", cfg)),
                                   "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    # each worker says it in one line (the launcher then adds its own report of the failed workers)
    assert p.stderr.count("error: the batch size 7 (the global batch) does not split evenly over 2 processes") == 2
    assert not (tmp_path / "run").exists()


def test_time_budget_stops_every_process_at_the_same_step(tmp_path: Path, image_dir: Path) -> None:
    # each process reads its own clock; the stop and the cosine horizon must still be agreed
    cfg = tiny_config(image_dir, max_steps=None, minutes=0.08, lr_schedule="cosine", checkpoint_every=0,
                      log_every=10)
    _torchrun([str(WORKER), str(write_config(tmp_path / "c.json", cfg)), str(tmp_path / "run"), str(tmp_path)],
              tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] > 20  # past the first horizon estimate
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert load_checkpoint(tmp_path / "run").step == r0["step"]


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_two_processes_distil_like_one(tmp_path: Path, image_dir: Path, method: str) -> None:
    """Distillation under torchrun is training's: each process its slice of the same global
    batch, levels and noise, the gradients averaged, one writer; a consistency student's target
    network (the EMA) kept in every process, as its step reads it."""
    from ddpm.training.distill import DistillConfig, distill

    teacher = tmp_path / "teacher"
    train(tiny_config(image_dir, max_steps=2, checkpoint_every=2), teacher, device="cpu", progress=False,
          tensorboard=False, log=lambda s: None)
    steps = 8 if method == "progressive" else 4  # progressive: two rounds, the teacher handed on between
    flags = ["--method", method, "--teacher-steps", str(steps), "--student-steps", "2", "--steps-per-round", "2"]
    p = _torchrun(["-m", "ddpm.cli", "distill", str(teacher), "--out", str(tmp_path / "two"), *flags, "--device",
                   "cpu", "--no-progress"], tmp_path)
    assert p.stdout.count("done: ") == 1  # the main process reports
    d = DistillConfig(str(teacher), method=method, teacher_steps=steps, student_steps=2, steps_per_round=2)
    one = distill(d, tmp_path / "one", device="cpu", progress=False, log=lambda s: None)
    two = load_checkpoint(tmp_path / "two")
    assert two.step == one.step and one.model is not None
    _close(two.model, one.model.state_dict())
    if method == "consistency":
        a = load_checkpoint(tmp_path / "one").ema
        assert a is not None and two.ema is not None
        _close(two.ema, a)
    assert [r["step"] for r in read_log(tmp_path / "two" / "log.jsonl")] == list(range(1, one.step + 1))
