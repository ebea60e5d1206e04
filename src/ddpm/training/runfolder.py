"""A run's folder around the training: checked before anything loads, the config a --resume
continues, the processes of a job agreed on a refusal, and nothing left of a run that failed
or stopped before it could be used."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..config import RunConfig
from ..errors import DdpmError
from ..files import check_outside_run_files, signals_held
from ..runtime.distributed import Dist


def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool) -> list[Path]:
    """Check the run folder before anything is loaded: not another run's, writable, same config on resume.

    Nothing in an existing run changes here (only a probe file is created and removed). Returns
    the folders it made, deepest first, for :func:`remove_if_empty` should the run fail."""
    if not resume and (run_dir / "latest").exists():
        raise DdpmError(f"{run_dir} already holds a run; use --resume to continue it or pick another --name/--out")
    if resume and not (run_dir / "latest").exists() and not any((run_dir / "checkpoints").glob("step-*")):
        raise DdpmError(f"--resume: {run_dir} has no checkpoint to resume from")
    check_outside_run_files(run_dir)  # e.g. inside another run's checkpoints/: pruned with them
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    probe = run_dir / f".write-test{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")  # one byte: a full disk fails here, before any data is loaded
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        remove_if_empty(made)
        raise DdpmError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from None
    return made


def refusal(check: Callable[[], object]) -> DdpmError | None:
    """The one-line error ``check`` raises, or None."""
    try:
        check()
    except DdpmError as e:
        return e
    return None


def agree(refused: DdpmError | None, dist: Dist, device: torch.device, run_dir: Path) -> None:
    """Raise in every process of the job when any refused the run folder (the main process alone
    checks its lock): none is left waiting for the others in a collective."""
    if dist.max([float(refused is not None)], device)[0]:
        raise refused or DdpmError(f"the main process of this job refused the run folder {run_dir}")


def remove_if_empty(folders: list[Path]) -> None:
    """A failed run leaves no empty folder behind (only folders it made, only while empty)."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def forget_unused_run(run_dir: Path, new_files: list[Path]) -> None:
    """A new run stopped before its first checkpoint could never be sampled or resumed: remove
    the files this call made for it (never one that was there before)."""
    import shutil

    if (run_dir / "latest").exists():
        return
    with signals_held():
        for p in new_files:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def resume_config(run_dir: str | Path) -> RunConfig | None:
    """The config a --resume continues from: the (verified) one stored in the run's latest
    checkpoint, never RUN/config.json, which a hand edit may have cut short; None without one."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest").exists() and not any((run_dir / "checkpoints").glob("step-*")):
        return None
    return load_checkpoint(run_dir).config


def check_resume_config(ck: Checkpoint, cfg: RunConfig) -> None:
    """Only the training section may change on --resume; the network and data must stay."""
    # the class counts are the data's, filled in by training: not a setting a flag changes
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_counts=ck.config.data.class_counts))
    diff = [k for k in ("model", "diffusion", "data") if getattr(ck.config, k) != getattr(cfg, k)]
    if diff:
        raise DdpmError(f"--resume with a different {diff[0]} config than the checkpoint {ck.path}; "
                        "drop the changed flags")
