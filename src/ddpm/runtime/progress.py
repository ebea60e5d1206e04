"""Progress bars with the time left, on stderr: sampling steps, likelihood terms, a training budget.

Each is a tqdm bar that is off when ``enabled`` is False or stderr is not a terminal (so logs and
pipes stay clean). The sampling bar is an ``on_step`` consumer of :func:`ddpm.sampling.generate`,
so it sits beside any other hook (a web page's, a cancel button's) through :func:`chain_hooks`.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

StepHook = Callable[[Any], "bool | None"]  # a sampling StepEvent -> False to stop


def bar(total: float | None, *, desc: str, unit: str, enabled: bool = True, initial: float = 0,
        bar_format: str | None = None) -> Any:
    """A tqdm bar on stderr: elapsed, time left and rate; none when disabled or not on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True, bar_format=bar_format, leave=True)


class StepBar:
    """``on_step`` consumer: one tick per sampler step of every batch, closed after the last."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = bar(total, desc=desc, unit="step", enabled=enabled)

    def __call__(self, event: Any) -> None:
        self.bar.update(event.done - self.bar.n)
        if event.done >= event.total:
            self.bar.close()

    def close(self) -> None:
        self.bar.close()


def chain_hooks(*hooks: StepHook | None) -> StepHook | None:
    """One hook calling each given one in turn; False from any of them stops (the rest still run)."""
    live = [h for h in hooks if h is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def each(event: Any) -> bool | None:
        results = [h(event) for h in live]
        return False if any(r is False for r in results) else None
    return each


class BudgetBar:
    """A training bar: by steps when the budget is steps or epochs, by the clock when it is
    ``minutes`` (the time left is then the budget's, whatever the step rate does)."""

    def __init__(self, total_steps: int | None, initial_step: int, minutes: float | None, enabled: bool = True):
        self.seconds = minutes * 60 if minutes else None
        self.start, self.step, self.total_steps = time.monotonic(), initial_step, total_steps
        self._postfix: dict[str, str] = {}
        if self.seconds is None:
            self.bar = bar(total_steps, desc="train", unit="step", enabled=enabled, initial=initial_step)
        else:
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {elapsed} of the budget, {remaining} left{postfix}"
            self.bar = bar(round(self.seconds), desc="train", unit="s", enabled=enabled, bar_format=fmt)

    def update(self, steps: int = 1) -> None:
        self.step += steps
        if self.seconds is None:
            self.bar.update(steps)
            return
        elapsed = min(time.monotonic() - self.start, self.seconds)
        self.bar.update(round(elapsed) - self.bar.n)
        self._postfix["step"] = f"{self.step}" + (f"/{self.total_steps}" if self.total_steps else "")
        self.bar.set_postfix(self._postfix, refresh=False)

    def set_postfix(self, **values: str) -> None:
        self._postfix.update(values)
        self.bar.set_postfix(self._postfix)

    def close(self) -> None:
        self.bar.close()
