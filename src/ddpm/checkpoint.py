"""Checkpoints that describe themselves and are never seen half-written.

A checkpoint is a folder ``RUN/checkpoints/step-0000123/`` holding

- ``model.safetensors`` and, when EMA is on, ``ema.safetensors``: the weights;
- ``config.json``: the full resolved :class:`~ddpm.config.RunConfig`;
- ``state.pt``: the training state (optimizer, step, data order, RNG states), plain tensors
  and numbers loaded with ``weights_only=True`` (no pickled code);
- ``meta.json``: format version, step, and the SHA-256 of every file above, checked on load;
  a known file the listing lacks (an EMA, say) makes the checkpoint damaged, not ignored.

Each file is written and fsynced in a temporary folder that is then renamed into place and
its parent fsynced; ``RUN/latest`` names the newest complete checkpoint (only a ``step-N`` of
this run), is replaced atomically, and is written last. A kill at any point of a write leaves
the previous checkpoint whole and named by ``latest``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .config import RunConfig
from .errors import DdpmError
from .interrupts import uninterrupted
from .files import atomic_write_text, fsync_dir, reason, shorten, write_new

FORMAT_VERSION = 1
LATEST = "latest"
STEP_NAME = re.compile(r"step-\d{8,}")  # the only names `latest` may give: this run's own checkpoints
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder (read by ddpm.pipelines)
KNOWN_FILES = ("model.safetensors", "ema.safetensors", "config.json", "state.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

    A failed write (full disk, read-only folder, a kill) leaves every earlier checkpoint and
    ``latest`` untouched; a failure raises a one-line DdpmError naming the last good checkpoint.
    """
    final = checkpoint_path(run_dir, step)
    try:
        _write_folder(final, _serialise(config, step, model, ema, state))
        atomic_write_text(run_dir / LATEST, final.name + "\n")
    except (OSError, RuntimeError, SafetensorError) as e:  # serialisers raise their own types
        raise DdpmError(f"cannot write checkpoint {final}: {reason(e)}; "
                        f"the last good checkpoint is {last_good_checkpoint(run_dir)}") from None
    _prune(final.parent, keep, final)
    return final


GUIDE = "guide"  # RUN/guide: the guiding model that training keeps for autoguidance (train.guide_at)


def has_guide(run_dir: Path) -> bool:
    """Whether training kept a guiding model in ``run_dir`` (its meta.json, written last, is there)."""
    return (Path(run_dir) / GUIDE / "meta.json").is_file()


def save_snapshot(folder: Path, *, config: RunConfig, step: int, model: dict[str, torch.Tensor],
                  ema: dict[str, torch.Tensor] | None) -> Path:
    """A checkpoint folder outside ``checkpoints/`` (e.g. ``RUN/guide``, autoguidance's guiding
    model): the same files, written as atomically, but never named by ``latest`` nor pruned,
    and with no optimiser state (it is not a place to resume from)."""
    try:
        _write_folder(folder, _serialise(config, step, model, ema, {"step": step}))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise DdpmError(f"cannot write {folder}: {reason(e)}") from None
    return folder


def _write_folder(final: Path, blobs: dict[str, bytes]) -> None:
    """Write ``blobs`` as the files of folder ``final``, all or nothing: into a hidden temporary
    folder beside it, then one rename."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root, ".step-" if STEP_NAME.fullmatch(final.name) else f".{final.name}.")
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    tmp.mkdir()
    try:
        for name, data in blobs.items():  # meta.json, with every checksum, comes last
            write_new(tmp / name, data)
        fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)  # the rename survives a power cut before `latest` names it


def _serialise(config: RunConfig, step: int, model: dict[str, torch.Tensor],
               ema: dict[str, torch.Tensor] | None, state: dict[str, Any]) -> dict[str, bytes]:
    """Every file of the checkpoint as bytes, meta.json (the checksum of each other file) last."""
    blobs = {"model.safetensors": safetensors_bytes(_cpu_state(model))}
    if ema is not None:
        blobs["ema.safetensors"] = safetensors_bytes(_cpu_state(ema))
    blobs["config.json"] = config.to_json().encode()
    buf = io.BytesIO()
    torch.save(state, buf)
    blobs["state.pt"] = buf.getvalue()
    meta = {"format_version": FORMAT_VERSION, "step": step,
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(blobs.items())}}
    blobs["meta.json"] = json.dumps(meta, indent=2).encode()
    return blobs


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


def _remove_stale_temporaries(ck_root: Path, prefix: str = ".step-") -> None:
    """Half-written checkpoints of a killed process (their names start with a dot)."""
    for p in ck_root.glob(prefix + "*"):
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


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[1])


def _prune(ck_root: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints; each is renamed aside first, so that a kill
    mid-delete leaves no half-deleted folder under a checkpoint's name."""
    done = sorted((p for p in ck_root.glob("step-*") if p.is_dir() and STEP_NAME.fullmatch(p.name)), key=_step_of)
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != newest:
            gone = old.with_name(f".{old.name}.del{os.getpid()}")
            try:
                os.replace(old, gone)
            except OSError:
                continue
            shutil.rmtree(gone, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint), a checkpoint folder or a diffusers pipeline folder
    (its model_index.json) -> the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise DdpmError(f"no run or checkpoint at {p}")
    if (p / "meta.json").is_file() or (p / PIPELINE_INDEX).is_file():
        return p
    named = _read_latest(p)
    if named is not None and (p / "checkpoints" / named / "meta.json").is_file():
        return p / "checkpoints" / named
    found = sorted((q for q in (p / "checkpoints").glob("step-*")
                    if STEP_NAME.fullmatch(q.name) and (q / "meta.json").is_file()), key=_step_of)
    if found:
        return found[-1]
    raise DdpmError(f"{p} is not a checkpoint and holds no checkpoints (expected a run folder from `ddpm train`)")


def _read_latest(run: Path) -> str | None:
    """The checkpoint ``RUN/latest`` names; only a name of this run's own (step-NNNNNNNN) is taken."""
    f = run / LATEST
    if not f.is_file():
        return None
    try:
        with open(f, "rb") as fh:
            text = fh.read(256).decode("utf-8", "replace").strip()
    except OSError as e:
        raise DdpmError(f"cannot read {f}: {reason(e)}") from None
    if not STEP_NAME.fullmatch(text):
        raise DdpmError(f"{f} names {shorten(text)}, not a checkpoint of this run (expected step-NNNNNNNN); "
                        "fix or delete it to use the newest checkpoint")
    return text


def _read_meta(ck: Path) -> tuple[dict[str, str], int, int]:
    try:
        with open(ck / "meta.json", "rb") as fh:
            raw = fh.read(1 << 20)  # a real meta.json is a few hundred bytes
        meta = json.loads(raw)
        return meta["sha256"], meta["format_version"], meta["step"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise DdpmError(f"checkpoint {ck} has an unreadable meta.json ({shorten(str(e))})") from None


def _verify(ck: Path, with_state: bool = False) -> tuple[dict[str, str], int]:
    """Check the listing and every listed file's checksum; a known file outside the listing
    (e.g. an EMA the listing lacks) means the checkpoint is damaged, never silently used."""
    expected, version, step = _read_meta(ck)
    if not (isinstance(expected, dict) and isinstance(version, int) and isinstance(step, int)
            and all(isinstance(k, str) and isinstance(v, str) and "/" not in k and k not in (".", "..")
                    for k, v in expected.items())
            and {"model.safetensors", "config.json"} <= expected.keys()):
        raise DdpmError(f"checkpoint {ck} has a malformed meta.json (not written by `ddpm train`?)")
    if version > FORMAT_VERSION:
        raise DdpmError(f"checkpoint {ck} has format {version}; this ddpm reads up to {FORMAT_VERSION}")
    for name in KNOWN_FILES:
        if name not in expected and (ck / name).exists():
            raise DdpmError(f"checkpoint {ck} is damaged: {name} is there but meta.json does not list it")
    if with_state and "state.pt" not in expected:
        raise DdpmError(f"checkpoint {ck} is damaged: meta.json does not list its training state state.pt")
    for name, digest in expected.items():
        f = ck / name
        if not f.is_file():
            raise DdpmError(f"checkpoint {ck} is incomplete: {name} is missing")
        try:
            ok = _sha256(f) == digest
        except OSError as e:
            raise DdpmError(f"cannot read checkpoint file {f}: {reason(e)}") from None
        if not ok:
            raise DdpmError(f"checkpoint {ck} is damaged: {name} does not match its checksum (truncated?)")
    return expected, step


def _load_weights(f: Path) -> dict[str, torch.Tensor]:
    try:
        with uninterrupted():  # Ctrl-C inside safetensors' native reader would read as a damaged file
            return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DdpmError(f"cannot read weights {f}: {shorten(str(e))}") from None


def load_checkpoint(path: str | Path, *, with_state: bool = False) -> Checkpoint:
    """Load and verify a checkpoint (or a run's latest one, or a diffusers pipeline folder:
    :mod:`ddpm.pipelines`)."""
    ck = resolve_checkpoint(path)
    if (ck / PIPELINE_INDEX).is_file() and not (ck / "meta.json").is_file():
        from .pipelines import load_pipeline

        if with_state:
            raise DdpmError(f"{ck} is a diffusers pipeline: it has no training state to resume")
        return load_pipeline(ck)
    listed, step = _verify(ck, with_state)
    config = RunConfig.load(ck / "config.json")
    state = None
    if with_state:
        try:
            state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise DdpmError(f"cannot read training state {ck / 'state.pt'}: {shorten(str(e))}") from None
    ema = _load_weights(ck / "ema.safetensors") if "ema.safetensors" in listed else None
    return Checkpoint(ck, config, _load_weights(ck / "model.safetensors"), ema, state, step)


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
