"""Progress bars with the time left: sampling (an on_step consumer beside others), the likelihood,
and a --minutes training budget; on stderr, and only when it is a terminal."""
from __future__ import annotations

import io
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ddpm.config import SampleConfig
from ddpm.nn import build_network
from ddpm.runtime.progress import BudgetBar, StepBar, chain_hooks
from ddpm.core.schedules import make_schedule
from ddpm.sampling import LoadedModel, generate
from helpers import tiny_config

ELAPSED_LEFT = re.compile(r"\d\d:\d\d<\d\d:\d\d")  # tqdm's "elapsed<remaining"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextmanager
def on_terminal() -> Iterator[Terminal]:
    """stderr a terminal for the block (set in the test's body: pytest's capture resets it after setup)."""
    term, old = Terminal(), sys.stderr
    sys.stderr = term
    try:
        yield term
    finally:
        sys.stderr = old


@pytest.fixture
def model(tmp_path: Path) -> LoadedModel:
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    return LoadedModel(build_network(cfg.model).eval(), make_schedule(cfg), cfg, 0, tmp_path)


def test_sampling_bar_counts_every_step_with_the_time_left(model: LoadedModel) -> None:
    cfg = SampleConfig(sampler="ddim", steps=5, n=5, batch_size=2)  # 3 batches x 5 steps
    with on_terminal() as term:
        generate(model, cfg, progress=True)
    out = term.getvalue()
    assert "15/15" in out and ELAPSED_LEFT.search(out) and "ddim, 5 steps" in out


def test_no_bar_when_not_a_terminal_or_turned_off(model: LoadedModel) -> None:
    cfg = SampleConfig(sampler="ddim", steps=3, n=2)
    with on_terminal() as term:
        generate(model, cfg, progress=False)
    assert term.getvalue() == ""
    pipe, old = io.StringIO(), sys.stderr  # isatty() is False
    sys.stderr = pipe
    try:
        generate(model, cfg, progress=True)
    finally:
        sys.stderr = old
    assert pipe.getvalue() == ""


def test_bar_and_another_hook_coexist(model: LoadedModel) -> None:
    """The bar is one on_step consumer; the caller's hook still sees every step and can stop."""
    from ddpm.sampling import SamplingCancelled

    seen: list[tuple[int, int]] = []
    cfg = SampleConfig(sampler="ddim", steps=4, n=3, batch_size=2)
    with on_terminal() as term:
        generate(model, cfg, progress=True, on_step=lambda ev: seen.append((ev.done, ev.total)))
        with pytest.raises(SamplingCancelled):
            generate(model, cfg, progress=True, on_step=lambda ev: ev.done < 3)
    assert seen == [(i, 8) for i in range(1, 9)] and "8/8" in term.getvalue() and "3/8" in term.getvalue()


def test_chain_hooks() -> None:
    calls: list[str] = []
    assert chain_hooks(None, None) is None
    one = lambda ev: calls.append("a")  # noqa: E731
    assert chain_hooks(None, one) is one
    both = chain_hooks(lambda ev: calls.append("b") or False, one)
    assert both("event") is False and calls == ["b", "a"]  # a stop from one, and the other still ran


def test_step_bar_closes_after_the_last_step() -> None:
    class Ev:
        def __init__(self, done: int) -> None:
            self.done, self.total = done, 4

    with on_terminal() as term:
        bar = StepBar(4, "x")
        for i in range(1, 5):
            bar(Ev(i))
    assert bar.bar.n == 4 and "4/4" in term.getvalue()


def test_minutes_budget_bar_shows_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.runtime.progress as P

    now = [1000.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    with on_terminal() as term:
        bar = BudgetBar(None, 0, minutes=2, enabled=True)
        for _ in range(3):
            now[0] += 30
            bar.update(1)
        bar.set_postfix(loss="0.1")
        assert bar.bar.n == 90 and bar.bar.total == 120  # seconds of the budget
        now[0] += 1000  # past the budget: the bar stops at its end
        bar.update(1)
        assert bar.bar.n == 120
        bar.close()
    out = term.getvalue()
    assert "of the budget" in out and "left" in out and "step=3" in out and "loss=0.1" in out


def test_step_budget_bar_counts_steps() -> None:
    with on_terminal() as term:
        bar = BudgetBar(10, 4, minutes=None)
        bar.update(1)
        assert bar.bar.n == 5 and bar.bar.total == 10
        bar.close()
    assert "5/10" in term.getvalue()


def test_nll_bar(model: LoadedModel) -> None:
    from ddpm.evaluation.likelihood import nll_bits_per_dim

    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    with on_terminal() as term:
        nll_bits_per_dim(model, images, timesteps=4, batch_size=2, progress=True)
    out = term.getvalue()
    assert "nll" in out and "10/10" in out and ELAPSED_LEFT.search(out)  # 2 batches x (4 + 1) terms
    pipe, old = io.StringIO(), sys.stderr  # not a terminal: no bar (a log stays clean)
    sys.stderr = pipe
    try:
        nll_bits_per_dim(model, images, timesteps=4, batch_size=2, progress=True)
    finally:
        sys.stderr = old
    assert pipe.getvalue() == ""
