"""`--precision auto` on a CPU decides by a timed trial of the network, not by a CPU flag: bf16
only where it is measured clearly faster, the verdict cached per machine and shape. No real
timing here: the clock and the measurement are injected."""
from __future__ import annotations

import json

import pytest
import torch

from ddpm.runtime import precision as P

CPU = torch.device("cpu")


class Net(torch.nn.Module):
    """A network whose calls advance a fake clock: ``fp32`` seconds per call in fp32, ``bf16``
    under bf16 autocast (and twice that with a backward pass)."""

    def __init__(self, clock: list[float], fp32: float, bf16: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.clock, self.cost = clock, {False: fp32, True: bf16}

    def forward(self, x, t, *cond):
        self.clock[0] += self.cost[torch.is_autocast_enabled("cpu")]
        return x * self.w


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(P, "native_bf16", lambda device: True)  # a CPU with bf16 in hardware
    return tmp_path / "precision.json"


def trial(shape=(32, 1, 8, 8), training=True, net=None) -> P.Trial:
    return P.Trial(net or Net([0.0], 1, 1), shape, training=training)


def fake(ratio: float, calls: list):
    def measure(t, device):
        calls.append(t.shape)
        return ratio
    return measure


@pytest.mark.parametrize("fp32,bf16,expected", [(1.0, 1.47, 0.68), (2.0, 1.0, 2.0), (1.0, 1.0, 1.0)])
def test_the_trial_measures_bf16_against_fp32_on_the_network(fp32, bf16, expected) -> None:
    clock = [0.0]
    net = Net(clock, fp32, bf16)
    for training in (False, True):
        ratio = P.time_trial(trial(training=training, net=net), CPU, timer=lambda: clock[0])
        assert ratio == pytest.approx(expected, rel=1e-3)
    assert net.w.grad is None and net.w.item() == 1.0  # weights and gradients as they were


def test_the_trial_leaves_the_random_streams_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Dropout(0.5))
    P.time_trial(P.Trial(_Wrap(net), (4, 1, 4, 4), training=True), CPU)
    assert torch.equal(torch.rand(3), expected)


class _Wrap(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.w = inner, torch.nn.Parameter(torch.ones(1))

    def forward(self, x, t, *cond):
        return self.inner(x) * self.w


def test_auto_is_fp32_where_bf16_is_measured_slower_and_bf16_where_faster(cache) -> None:
    calls: list = []
    lines: list[str] = []
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(0.68, calls), say=lines.append) == "fp32"
    assert lines == ["precision auto: fp32 (bf16 measured 0.68x fp32's speed here; bf16 needs 1.10x)"]
    assert P.resolve_precision("auto", CPU, trial((32, 3, 8, 8)), measure=fake(1.5, calls), say=lines.append) == "bf16"
    assert P.resolve_precision("auto", CPU, trial((32, 3, 16, 16)), measure=fake(1.05, calls),
                               say=lines.append) == "fp32"  # faster, but not clearly
    assert len(calls) == 3


def test_the_verdict_is_cached_and_reused_and_keyed_by_what_changes_it(cache, monkeypatch) -> None:
    calls: list = []
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(0.7, calls)) == "fp32"
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(2.0, calls)) == "fp32"  # cached: no trial
    assert len(calls) == 1
    kept = json.loads(cache.read_text())
    assert list(kept.values()) == [{"choice": "fp32", "bf16_speed": 0.7}]
    assert P.resolve_precision("auto", CPU, trial((16, 1, 12, 12)), measure=fake(2.0, calls)) == "bf16"  # new shape
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: measured again
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(2.0, calls)) == "bf16"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # another thread count: again
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(0.5, calls)) == "fp32"
    assert len(calls) == 4 and len(json.loads(cache.read_text())) == 4
    # batches above the trial's cap time the same call: one verdict
    assert P.trial_key(trial((64, 1, 8, 8))) == P.trial_key(trial((P.TRIAL_BATCH, 1, 8, 8)))


@pytest.mark.parametrize("junk", ["{not json", "[1, 2]", '{"k": 3}', ""])
def test_a_corrupt_cache_is_ignored(cache, junk) -> None:
    cache.write_text(junk)
    calls: list = []
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(1.5, calls)) == "bf16"
    assert len(calls) == 1 and json.loads(cache.read_text())  # rewritten whole


def test_an_unwritable_cache_never_blocks_the_command(cache, monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DDPM_CACHE_DIR", str(blocker / "sub"))  # a folder under a file: cannot exist
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(1.5, [])) == "bf16"


def test_where_bf16_is_not_a_candidate_no_trial_runs(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(P, "native_bf16", lambda device: False)  # emulated, or the kernels capped below it
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(5.0, calls)) == "fp32"
    assert calls == []
    for given in ("fp32", "bf16"):  # an explicit choice is never second-guessed
        monkeypatch.setattr(P, "native_bf16", lambda device: True)
        assert P.resolve_precision(given, CPU, trial(), measure=fake(0.1, calls)) == given
    assert calls == []


def test_kernel_caps_rule_bf16_out_without_a_trial(monkeypatch) -> None:
    monkeypatch.undo()  # the real native_bf16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not P.native_bf16(CPU)
    calls: list = []
    assert P.resolve_precision("auto", CPU, trial(), measure=fake(5.0, calls)) == "fp32" and calls == []


def test_training_and_sampling_resolve_auto_by_the_trial(tmp_path, image_dir, monkeypatch) -> None:
    from dataclasses import replace

    from ddpm.sampling.generate import SampleConfig, generate, load_model
    from ddpm.training.train import train
    from helpers import tiny_config

    seen: list = []
    monkeypatch.setattr(P, "time_trial", lambda t, device: seen.append((t.training, t.shape)) or 0.5)
    cfg = tiny_config(image_dir, max_steps=1)
    cfg = replace(cfg, train=replace(cfg.train, precision="auto"))
    train(cfg, tmp_path / "run", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    s = generate(load_model(tmp_path / "run"), SampleConfig(sampler="ddim", steps=2, n=3, precision="auto"))
    assert s.arithmetic == "fp32"
    size = cfg.data.image_size
    assert seen == [(True, (cfg.train.batch_size, 1, size, size)), (False, (3, 1, size, size))]


def test_the_processes_of_a_job_agree_on_one_arithmetic(tmp_path, image_dir, monkeypatch) -> None:
    """Under torchrun every process times its own trial, and the verdicts can differ (shared
    cores): the job runs fp32 if any process measured fp32, never a mix of arithmetics."""
    from dataclasses import replace

    from ddpm.runtime.distributed import Dist
    from ddpm.training.train import Trainer
    from helpers import tiny_config

    monkeypatch.setattr(P, "time_trial", lambda t, device: 2.0)  # this process: bf16 clearly faster
    cfg = tiny_config(image_dir)
    cfg = replace(cfg, train=replace(cfg.train, precision="auto"))
    data = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    assert Trainer(cfg, tmp_path / "alone", data, CPU).amp is torch.bfloat16
    monkeypatch.setattr(Dist, "max", lambda self, values, device: [1.0] * len(values))  # another said fp32
    assert Trainer(cfg, tmp_path / "job", data, CPU).amp is None
