"""Ctrl-C and SIGTERM at any moment of a command: an exception, but never in the middle of an import.

A KeyboardInterrupt raised while torch or numpy is importing leaves them half-initialised (a
later call crashes), and an import guard that catches too much swallows it, so the command runs
on. Here a signal that lands inside an import waits until the import is done (polled by a short
SIGALRM timer) and is raised there as :class:`ddpm.files.Stopped`, exit status 128 + signum.
The same holds inside an :func:`uninterrupted` block: a reader whose native code calls back into
Python (safetensors building tensors) turns an exception raised there into an error of its own,
which would read as a damaged file.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Iterator

from .files import Stopped

IMPORT_FRAMES = ("<frozen importlib._bootstrap",)  # co_filename of the import machinery's frames
POLL_S = 0.02  # how often a waiting signal looks whether the import is done
SIGNALS = (signal.SIGINT, signal.SIGTERM)


_uninterrupted = 0  # depth of uninterrupted() blocks in progress


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that a signal waits for (under :class:`Interrupts`), as it waits for an import."""
    global _uninterrupted
    _uninterrupted += 1
    try:
        yield
    finally:
        _uninterrupted -= 1


class Interrupts:
    """A context manager for a command's main thread: SIGINT/SIGTERM raise Stopped outside imports."""

    def __init__(self) -> None:
        self.pending: int | None = None  # a signal that came during an import, not yet raised
        self.base: FrameType | None = None  # the frame that entered: imports around it do not count
        self.old: dict[int, object] = {}
        self.can_wait = hasattr(signal, "setitimer")  # elsewhere (Windows) a signal raises at once

    def __enter__(self) -> "Interrupts":
        self.base = sys._getframe(1)
        try:
            for s in SIGNALS + ((signal.SIGALRM,) if self.can_wait else ()):
                self.old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._restore()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def check(self) -> None:
        """Raise a signal that came during the last import, before the timer did."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Stopped(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum not in SIGNALS:  # the timer: raise the waiting signal once the import is done
            if self.pending is None:
                return
            signum = self.pending
        if self.can_wait and (_uninterrupted or self._importing(frame)):
            self.pending = self.pending or signum
            signal.setitimer(signal.ITIMER_REAL, POLL_S)
            return
        self.pending = None
        raise Stopped(signum)

    def _importing(self, frame: FrameType | None) -> bool:
        while frame is not None and frame is not self.base:
            if frame.f_code.co_filename.startswith(IMPORT_FRAMES):
                return True
            frame = frame.f_back
        return False

    def _restore(self) -> None:
        if self.can_wait and self.old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in self.old.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self.old = {}
