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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave litter behind
        raise


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


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, *, config: RunConfig, step: int, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``step`` atomically, point ``latest`` at it, prune old ones.

    A failed write (full disk, read-only folder) leaves every earlier checkpoint and ``latest``
    untouched and raises a one-line DdpmError naming the last good checkpoint.
    """
    final = checkpoint_path(run_dir, step)
    ck_root = final.parent
    try:
        ck_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(ck_root)
        tmp = ck_root / f".step-{step:08d}.tmp{os.getpid()}"
        tmp.mkdir()
        try:
            _write_files(tmp, config, step, model, ema, state)
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(run_dir / LATEST, final.name + "\n")
    except OSError as e:
        raise DdpmError(f"cannot write checkpoint {final}: {e.strerror or e}; "
                        f"the last good checkpoint is {last_good_checkpoint(run_dir)}") from None
    _prune(ck_root, keep, final)
    return final


def _write_files(folder: Path, config: RunConfig, step: int, model: dict[str, torch.Tensor],
                 ema: dict[str, torch.Tensor] | None, state: dict[str, Any]) -> None:
    save_file(_cpu_state(model), str(folder / "model.safetensors"))
    if ema is not None:
        save_file(_cpu_state(ema), str(folder / "ema.safetensors"))
    (folder / "config.json").write_text(config.to_json())
    torch.save(state, folder / "state.pt")
    files = sorted(p.name for p in folder.iterdir())
    meta = {"format_version": FORMAT_VERSION, "step": step,
            "sha256": {name: _sha256(folder / name) for name in files}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    for p in folder.iterdir():  # data on disk before the rename makes it visible
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is renamed aside first, as a folder
    cannot be renamed over a non-empty one, and deleted only once ``src`` is in place."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(ck_root: Path) -> None:
    """Half-written checkpoints of a killed process (their names start with a dot)."""
    for p in ck_root.glob(".step-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def last_good_checkpoint(run_dir: Path) -> str:
    """The checkpoint `--resume` would use, or a note that there is none (for error messages)."""
    try:
        return str(resolve_checkpoint(run_dir))
    except DdpmError:
        return "none (no checkpoint was written yet)"


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
        expected, version, step = meta["sha256"], meta["format_version"], meta["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DdpmError(f"checkpoint {ck} has an unreadable meta.json ({e})") from None
    if not (isinstance(expected, dict) and isinstance(version, int) and isinstance(step, int)
            and all(isinstance(k, str) and isinstance(v, str) and "/" not in k for k, v in expected.items())
            and {"model.safetensors", "config.json"} <= expected.keys()):
        raise DdpmError(f"checkpoint {ck} has a malformed meta.json (not written by `ddpm train`?)")
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
