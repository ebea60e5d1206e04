"""What a run writes as it goes: the JSON-lines log and, when installed, TensorBoard events."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_text

LOG_NAME = "log.jsonl"


class JsonLog:
    """log.jsonl: each record is one ``os.write`` on an O_APPEND descriptor, so a reader (or a kill)
    never sees half a line; no fsync, as the page cache survives the process."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.fd is None:
            return
        line = json.dumps({k: _json_number(v) for k, v in record.items()}) + "\n"
        os.write(self.fd, line.encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _json_number(v: Any) -> Any:
    # NaN and Infinity are not JSON; strings keep them readable by strict parsers
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def read_log(path: Path) -> list[dict[str, Any]]:
    """The whole records of a log.jsonl; a line cut short by a full disk is ignored."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


def reset_log(path: Path, step: int) -> None:
    """Drop records after ``step``: a resumed run repeats those steps and logs them again."""
    if not path.exists():
        return
    kept = [r for r in read_log(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class TensorBoard:
    """Scalars and sample grids as TensorBoard events in RUN/tb when the ``tensorboard`` package is
    installed; without it every call does nothing (it is not a dependency)."""

    def __init__(self, log_dir: Path, purge_step: int, enabled: bool = True):
        self.writer = _summary_writer(log_dir, purge_step) if enabled else None

    def scalars(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if k not in ("step", "time", "event") and isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, record["step"])
        self.writer.flush()

    def image(self, grid: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image("samples", grid, step, dataformats="HWC")  # grid: (H, W, C) uint8
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer(log_dir: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    except Exception as e:  # a broken tensorboard install must not stop training
        print(f"warning: TensorBoard logging off ({e})", file=sys.stderr)
        return None
    # purge_step hides the events a killed run wrote after the checkpoint we resume from
    return SummaryWriter(str(log_dir), purge_step=purge_step)
