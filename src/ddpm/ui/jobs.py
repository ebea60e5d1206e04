"""Sampling requests from the page: one thread each, streamed step by step, cancellable.

A job runs ``generate`` in its own thread with a step hook that records the grids of x_t and
x0 and stops the loop when the job is cancelled (the Cancel button, or the page going away).
The event loop only reads the job's event list, so the page stays responsive while it samples.
"""
from __future__ import annotations

import base64
import io
import json
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from ..config import SampleConfig
from ..data.readers import from_model_range
from ..errors import DdpmError
from ..pictures.viz import make_grid, save_gif, to_pil
from ..sampling.generate import LoadedModel, Samples, SamplingCancelled, StepEvent, StepHook, generate
from .messages import page_message


MAX_FRAMES = 250  # streamed per request (the scrub slider's stops)


def png_bytes(grid: np.ndarray) -> bytes:
    """An (H, W, C) uint8 grid as PNG bytes, at its own size (the page enlarges it, pixelated)."""
    buf = io.BytesIO()
    to_pil(grid).save(buf, format="PNG", compress_level=1)  # speed over size: frames are small
    return buf.getvalue()


def data_url(grid: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(grid)).decode("ascii")


Work = Callable[[StepHook], Samples]  # generate, inpaint or edit, given the step hook
Shown = Callable[[torch.Tensor], torch.Tensor]  # what the page sees of x_t / x0 (an inpainting: known pixels pasted)


def sampling(model: LoadedModel, cfg: SampleConfig) -> Work:
    return lambda hook: generate(model, cfg, on_step=hook)


class ClassLayout(NamedTuple):
    """A page request's classes as exactly ``n`` labels, and the grid that shows them."""

    classes: str  # one class index per image, class by class (what generate is asked for)
    rows: tuple[int, ...] | None  # images per grid row, one row per class (None: a square grid)


def class_layout(classes: tuple[int, ...], n: int) -> ClassLayout:
    """``n`` images spread over ``classes`` as evenly as they go, the first classes taking the
    one left over each: the page draws the count it asked for. One class is a square grid."""
    k = len(classes)
    counts = [c for c in (n // k + (i < n % k) for i in range(k)) if c]
    labels = [str(c) for c, m in zip(classes, counts) for _ in range(m)]
    return ClassLayout(",".join(labels), None if len(set(classes)) == 1 else tuple(counts))


def class_grid(images: torch.Tensor, rows: tuple[int, ...] | None) -> np.ndarray:
    """uint8 (N, C, H, W) -> a grid with ``rows[i]`` images in row i, short rows padded blank."""
    if rows is None:
        return make_grid(images)
    width = max(rows)
    tiles = torch.full((len(rows) * width, *images.shape[1:]), 255, dtype=images.dtype)
    start = 0
    for r, m in enumerate(rows):
        tiles[r * width: r * width + m] = images[start: start + m]
        start += m
    return make_grid(tiles, width)


@dataclass
class Job:
    """One request: the work, its thread, and what it has produced so far."""

    id: str
    run: str
    work: Work
    stream: bool  # send the grids of every step (Compare turns this off to time the sampler alone)
    shown: Shown | None = None
    final: Callable[[Samples], np.ndarray] | None = None  # the result grid (default: the samples)
    rows: tuple[int, ...] | None = None  # images per grid row (a class-conditional request: one row per class)
    cancel: threading.Event = field(default_factory=threading.Event)
    events: list[str] = field(default_factory=list)  # JSON lines, in order
    frames: list[np.ndarray] = field(default_factory=list)  # the x_t grids, for the GIF
    samples: Samples | None = None
    grid: np.ndarray | None = None
    finished: bool = False
    thread: threading.Thread | None = None
    started: float = 0.0

    def emit(self, kind: str, **payload: object) -> None:
        self.events.append(json.dumps({"type": kind, **payload}))  # list.append is atomic

    def start(self) -> None:
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name=f"ddpm-ui-{self.id}", daemon=True)
        self.thread.start()

    def _hook(self, ev: StepEvent) -> bool:
        if self.cancel.is_set():
            return False
        every = -(-ev.total // MAX_FRAMES)  # long runs send every k-th step: memory and bandwidth stay bounded
        if ev.batch_start == 0 and self.stream and (ev.done % every == 0 or ev.done in (1, ev.total)):
            show = self.shown or (lambda x: x)
            xt, x0 = (class_grid(from_model_range(show(x)).cpu(), self.rows) for x in (ev.x_t, ev.x0))
            self.frames.append(xt)
            self.emit("frame", done=ev.done, total=ev.total, x_t=data_url(xt), x0=data_url(x0),
                      width=int(xt.shape[1]), height=int(xt.shape[0]),
                      elapsed=round(time.perf_counter() - self.started, 4))
        else:
            self.emit("progress", done=ev.done, total=ev.total)
        return True

    def _run(self) -> None:
        try:
            s = self.work(self._hook)
            grid = self.final(s) if self.final else class_grid(s.images, self.rows)
            self.samples, self.grid = s, grid
            self.emit("done", nfe=s.nfe, steps=s.steps, n=len(s.images), arithmetic=s.arithmetic,
                      seconds=round(time.perf_counter() - self.started, 4), grid=data_url(grid),
                      width=int(grid.shape[1]), height=int(grid.shape[0]), gif=bool(self.frames))
        except SamplingCancelled:
            self.emit("cancelled", message="cancelled")
        except DdpmError as e:
            self.emit("error", message=page_message(str(e)))
        except Exception as e:  # a bug: tell the page in one line, keep the traceback on the console
            traceback.print_exc()
            self.emit("error", message=f"internal error: {type(e).__name__}: {e}")
        finally:
            self.finished = True


class JobStore:
    """The page's jobs by id; finished ones beyond ``keep`` are forgotten, oldest first (those
    that left no files before those that did), at the start of the next."""

    def __init__(self, keep: int = 8, max_running: int = 4):
        self.keep, self.max_running = keep, max_running
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def running(self) -> int:
        return sum(1 for j in self._jobs.values() if not j.finished)

    def start(self, run: str, work: Work, stream: bool, shown: Shown | None = None,
              final: Callable[[Samples], np.ndarray] | None = None, rows: tuple[int, ...] | None = None) -> Job:
        with self._lock:
            if self.running() >= self.max_running:
                raise DdpmError(f"already running {self.max_running} at once (the most); wait for one or cancel it")
            job = Job(uuid.uuid4().hex[:12], run, work, stream, shown, final, rows)
            self._jobs[job.id] = job
            # the cancelled and failed go first: their files were never there to link to
            done = sorted((k for k, j in self._jobs.items() if j.finished),
                          key=lambda k: self._jobs[k].samples is not None)
            for k in done[: max(0, len(done) - self.keep)]:  # the running ones are bounded by max_running
                del self._jobs[k]
        job.start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)


def grid_png(job: Job) -> bytes:
    assert job.grid is not None
    return png_bytes(job.grid)


def gif_bytes(job: Job) -> bytes:
    """The x_t frames as the same looping GIF `ddpm sample --gif` writes (through save_gif)."""
    with tempfile.TemporaryDirectory() as d:
        return save_gif(job.frames, Path(d) / "denoising.gif", scale=4).read_bytes()


def npz_bytes(job: Job) -> bytes:
    assert job.samples is not None
    buf = io.BytesIO()
    np.savez_compressed(buf, images=job.samples.images.numpy())
    return buf.getvalue()


def decode_data_url(url: str) -> Image.Image:
    """The inverse of data_url (tests and the bench use it)."""
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
