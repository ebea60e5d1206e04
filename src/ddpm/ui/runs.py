"""Which run folders the page may show, and the models loaded from them (once each).

The page names a run by a short name only; a name maps to a folder given on the command line
or found directly under ``--runs``. Nothing else on disk is reachable: an unknown name, ``..``,
an absolute path or a symlink leading out of the run is a 404.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import PIPELINE_INDEX, _step_of, resolve_checkpoint
from ..config import RunConfig
from ..errors import DdpmError
from ..sampling.generate import LoadedModel, load_model
from ..sampling.pretrained import resolve_run, shipped_runs


class NotFound(LookupError):
    """A run or file the page may not see (answered with a 404)."""


@dataclass(frozen=True)
class Run:
    name: str
    path: Path  # resolved


def is_run_folder(p: Path) -> bool:
    """A folder written by `ddpm train` (a config, or checkpoints, or a log), or a diffusers pipeline."""
    return p.is_dir() and any((p / f).exists() for f in ("config.json", "checkpoints", "log.jsonl", PIPELINE_INDEX))


class RunIndex:
    """The run folders given as arguments plus those found under ``runs_dir`` (rescanned on each list)."""

    def __init__(self, runs: list[str | Path], runs_dir: str | Path | None):
        self.given: list[Path] = []
        for r in runs:
            p = resolve_run(r)  # a path, or the name of a shipped model
            if not is_run_folder(p):
                raise DdpmError(f"{p} is not a run folder (expected one written by `ddpm train`, or a diffusers pipeline)")
            self.given.append(p.resolve())
        self.runs_dir = Path(runs_dir).resolve() if runs_dir is not None else None

    def runs(self) -> list[Run]:
        found = list(self.given)
        if self.runs_dir is not None and self.runs_dir.is_dir():
            for p in sorted(self.runs_dir.iterdir()):
                # a symlink pointing out of --runs is not listed (nor reachable), nor a name that is
                # not UTF-8 (no page or URL can name it)
                if (_utf8(p.name) and is_run_folder(p) and p.resolve().parent == self.runs_dir
                        and p.resolve() not in found):
                    found.append(p.resolve())
        if not found:  # nothing of the user's yet: the models that ship with the package
            found = [p.resolve() for p in shipped_runs()]
        named: list[Run] = []
        for p in found:
            name, k = p.name, 2
            while any(r.name == name for r in named):
                name, k = f"{p.name}-{k}", k + 1
            named.append(Run(name, p))
        return named

    def get(self, name: str) -> Run:
        for r in self.runs():
            if r.name == name:
                return r
        raise NotFound(f"no run named {name!r}")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept by Python as lone surrogates
        return False
    return True


def inside(run: Run, relative: str) -> Path:
    """``run.path / relative``, only if it exists and really lies inside the run (symlinks resolved)."""
    p = (run.path / relative).resolve()
    if not p.is_relative_to(run.path) or not p.is_file():
        raise NotFound(f"{relative} is not a file of run {run.name}")
    return p


def run_config(run: Run) -> RunConfig | None:
    """The run's config.json (a pipeline's: its mapped config), or None while it has none (or an unreadable one)."""
    try:
        if (run.path / PIPELINE_INDEX).is_file() and not (run.path / "config.json").is_file():
            from ..pipelines import pipeline_config
            return pipeline_config(inside(run, PIPELINE_INDEX).parent)
        return RunConfig.load(inside(run, "config.json"))
    except (NotFound, DdpmError):
        return None


def latest_checkpoint(run: Run) -> Path | None:
    try:
        ck = resolve_checkpoint(run.path).resolve()
    except DdpmError:
        return None
    return ck if ck.is_relative_to(run.path) else None


RECENT_S = 60.0  # a log not written for this long: the run is not training now (stopped, or killed)


def training_now(run: Run, cfg: RunConfig | None) -> bool:
    """Whether a training process is writing the run: its log was written lately and its newest
    checkpoint is not the final one (the step budget reached, or the last step logged)."""
    try:
        log = inside(run, "log.jsonl")
        if time.time() - log.stat().st_mtime > RECENT_S:
            return False
    except (NotFound, OSError):
        return False
    ck = latest_checkpoint(run)
    if ck is None:
        return True
    step = _step_of(ck)  # latest_checkpoint gives only this run's step-N folders
    budget = cfg.train.max_steps if cfg is not None else None
    return step < budget if budget else step < _last_logged_step(log)


def _last_logged_step(log: Path, tail: int = 8192) -> int:
    """The step of the log's last whole record, read from its end (a log grows long)."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - tail))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return -1


class ModelCache:
    """Loaded models keyed by checkpoint folder: a run that writes a newer checkpoint gets reloaded."""

    def __init__(self, size: int = 4, device: str = "cpu"):
        self.size, self.device = size, device
        self._models: OrderedDict[tuple[Path, bool], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run: Run, use_ema: bool = True) -> LoadedModel:
        ck = latest_checkpoint(run)
        if ck is None:
            raise DdpmError(f"run {run.name} has no checkpoint yet")
        key = (ck, use_ema)
        with self._lock:  # one load at a time; a second tab waits for the first's load
            if key not in self._models:
                self._models[key] = load_model(ck, device=self.device, use_ema=use_ema)
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]
