"""Checkpoints that describe themselves and are never seen half-written.

A checkpoint is a folder ``RUN/checkpoints/step-0000123/`` holding

- ``model.safetensors`` and, when EMA is on, ``ema.safetensors``: the weights;
- ``config.json``: the full resolved :class:`~ddpm.config.RunConfig`;
- ``state.pt``: the training state (optimizer, step, data order, RNG states), plain tensors
  and numbers loaded with ``weights_only=True`` (no pickled code);
- ``meta.json``: format version, step, and the SHA-256 of every file above, checked on load.

It is written into a temporary folder and renamed into place; ``RUN/latest`` names the
newest complete checkpoint and is itself replaced atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import DdpmError

FORMAT_VERSION = 1
LATEST = "latest"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _cpu_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


@dataclass
class Checkpoint:
    """A loaded checkpoint: config, weights, and (for resuming) the training state."""

    path: Path
    config: RunConfig
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any] | None
    step: int

    def sampling_weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        return self.ema if use_ema and self.ema is not None else self.model


def save_checkpoint(run_dir: Path, *, config: RunConfig, step: int, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``step`` atomically, point ``latest`` at it, prune old ones."""
    ck_root = run_dir / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step-{step:08d}"
    tmp = ck_root / f".step-{step:08d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_cpu_state(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_cpu_state(ema), str(tmp / "ema.safetensors"))
        (tmp / "config.json").write_text(config.to_json())
        torch.save(state, tmp / "state.pt")
        files = sorted(p.name for p in tmp.iterdir())
        meta = {"format_version": FORMAT_VERSION, "step": step,
                "sha256": {name: _sha256(tmp / name) for name in files}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    _prune(ck_root, keep, final)
    return final


def _prune(ck_root: Path, keep: int, newest: Path) -> None:
    done = sorted(p for p in ck_root.glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise DdpmError(f"no run or checkpoint at {p}")
    if (p / "meta.json").is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        ck = p / "checkpoints" / latest.read_text().strip()
        if (ck / "meta.json").is_file():
            return ck
    found = sorted(q for q in (p / "checkpoints").glob("step-*") if (q / "meta.json").is_file())
    if found:
        return found[-1]
    raise DdpmError(f"{p} is not a checkpoint and holds no checkpoints (expected a run folder from `ddpm train`)")


def _verify(ck: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ck / "meta.json").read_text())
        expected = meta["sha256"]
        version = meta["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DdpmError(f"checkpoint {ck} has an unreadable meta.json ({e})") from None
    if version > FORMAT_VERSION:
        raise DdpmError(f"checkpoint {ck} has format {version}; this ddpm reads up to {FORMAT_VERSION}")
    for name, digest in expected.items():
        f = ck / name
        if not f.is_file():
            raise DdpmError(f"checkpoint {ck} is incomplete: {name} is missing")
        if _sha256(f) != digest:
            raise DdpmError(f"checkpoint {ck} is damaged: {name} does not match its checksum (truncated?)")
    return meta


def _load_weights(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise DdpmError(f"cannot read weights {f}: {e}") from None


def load_checkpoint(path: str | Path, *, with_state: bool = False) -> Checkpoint:
    """Load and verify a checkpoint (or a run's latest one)."""
    ck = resolve_checkpoint(path)
    meta = _verify(ck)
    config = RunConfig.load(ck / "config.json")
    ema_f = ck / "ema.safetensors"
    state = None
    if with_state:
        try:
            state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise DdpmError(f"cannot read training state {ck / 'state.pt'}: {e}") from None
    return Checkpoint(ck, config, _load_weights(ck / "model.safetensors"),
                      _load_weights(ema_f) if ema_f.is_file() else None, state, int(meta["step"]))


def load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict, turning a mismatch into one line naming the first difference."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    bad = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or extra or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                else f"{bad[0]} has shape {tuple(weights[bad[0]].shape)}, config gives {tuple(own[bad[0]].shape)}")
        raise DdpmError(f"checkpoint {source} does not match its config: {what}")
    module.load_state_dict(weights)
