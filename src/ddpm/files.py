"""Files that are never seen half-written: atomic writes, output checks before long work, result sets.

Checkpoints, pictures, sample sets and reports are written through here (the run's append-only
log and TensorBoard have writers of their own), so a full disk, a read-only folder or a signal
mid-way turns into one line (:class:`WriteError`, both a ``DdpmError`` and an ``OSError``) and
leaves what was on disk before untouched.
"""
from __future__ import annotations

import errno
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .errors import DdpmError

MAX_SHOWN = 80  # characters of a user's value quoted in a message
LOCK_NAME = ".lock"  # RUN/.lock: held while a command writes the run (run_lock)


def shorten(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a 50 MB value never becomes a 50 MB "line"."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r):,} characters)"


class WriteError(DdpmError, OSError):
    """A file that could not be written: one line naming the file, never the temporary beside it."""

    def __init__(self, path: str | Path, reason: str, code: int = 0, note: str = ""):
        super().__init__(code, reason, str(path))
        self.note = note

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}{self.note}"


def reason(e: BaseException) -> str:
    """The short cause of a failed write: errno's words, or the first line of another writer's message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new name in ``folder`` durable (a crash after it cannot undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it (no rename: the caller makes it visible)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    Raises :class:`WriteError` naming ``path``; the temporary never outlives a failure."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file")
        write_new(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)  # a full disk must not also leave litter behind
        raise WriteError(path, reason(e), e.errno or 0) from None
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _discard(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


# ------------------------------------------------------------------ checks before long work


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


# What a run folder holds for itself: an output there would corrupt the run, or be deleted with it
# (a checkpoint folder pruned, `latest` overwritten). RUN/samples and other outputs are not among them.
RUN_OWN = frozenset({"checkpoints", "latest", "config.json", "log.jsonl", "guide", "tb", "distill.json", LOCK_NAME})
# ... and what a checkpoint folder holds (its meta.json marks it)
CHECKPOINT_OWN = frozenset({"model.safetensors", "ema.safetensors", "config.json", "state.pt", "meta.json"})


def is_run(folder: Path) -> bool:
    """A run folder: one written by `ddpm train` or `ddpm distill` (its config or checkpoints)."""
    return (folder / "config.json").is_file() or (folder / "checkpoints").is_dir()


def run_of(checkpoint: Path) -> Path | None:
    """The run a checkpoint folder belongs to: RUN for RUN/checkpoints/step-N and RUN/guide;
    None for one standing alone (copied out of its run), whose folders above are not its."""
    ck = Path(checkpoint)
    run = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent if ck.name == "guide" else None
    return run if run is not None and is_run(run) else None


def run_files_under(path: str | Path) -> tuple[Path, str] | None:
    """(run or checkpoint folder, own name) when ``path`` is, or lies inside, one of a run's own
    files (RUN_OWN) or a checkpoint folder's (CHECKPOINT_OWN)."""
    p = Path(os.path.realpath(path))  # symlinks resolved, a missing tail kept as given
    for part in (p, *p.parents):
        if part.name in RUN_OWN and is_run(part.parent):
            return part.parent, part.name
        if part.name in CHECKPOINT_OWN and (part.parent / "meta.json").is_file():
            return part.parent, part.name
    return None


def check_outside_run_files(path: str | Path, shown: str | Path | None = None) -> None:
    """Refuse, in one line, an output that would land on a run's own files."""
    hit = run_files_under(path)
    if hit is not None:
        run, name = hit
        raise DdpmError(f"{shown or path} lies on the run {run}'s own {name}: write outside it "
                        f"(the run's outputs go to {run / 'samples'} or any folder you name)")


def check_writable_dir(path: str | Path, what: str = "output folder", shown: str | Path | None = None) -> Path:
    """Refuse, in one line, a folder that cannot be written (or made) before any long work starts,
    or one that lies on a run's own files (:func:`check_outside_run_files`).

    Nothing is created: a probe file in the nearest existing folder is written and removed.
    ``shown`` is the path the message names (the output file whose folder this is)."""
    path = Path(path)
    shown = path if shown is None else shown
    check_outside_run_files(path, shown)
    if path.exists() and not path.is_dir():
        what_ = "it is" if Path(shown) == path else f"{path} is"
        raise WriteError(shown, f"{what_} a file, not a folder", errno.ENOTDIR)
    base = _nearest_existing(path)
    if not base.is_dir():
        raise WriteError(shown, f"{base} is a file, not a folder", errno.ENOTDIR)
    probe = base / f".ddpm-probe{os.getpid()}"
    try:
        write_new(probe, b"x")  # one byte: a disk with no room left fails here already
    except OSError as e:
        _discard(probe)
        where = f"cannot create files in {base} ({reason(e)})" if base != Path(shown).absolute() else reason(e)
        raise WriteError(shown, where, e.errno or 0) from None
    _discard(probe)
    return path


def check_writable_file(path: str | Path, what: str = "output file") -> Path:
    """Refuse, in one line, an output file that cannot be written: a folder in its place, an
    unwritable or impossible parent, a full disk. Nothing is created."""
    path = Path(path)
    check_outside_run_files(path)
    if path.is_dir():
        raise WriteError(path, f"it is a folder; give a file name for the {what}", errno.EISDIR)
    check_writable_dir(path.parent, shown=path)
    return path


# ------------------------------------------------------------------ run-folder lock


@contextmanager
def run_lock(run: Path, command: Sequence[str] | None = None) -> Iterator[Path]:
    """Hold ``run``'s advisory lock (``RUN/.lock``, fcntl.flock) while it is written, so that a
    second command writing the same run fails at once, in one line naming who holds it. The
    kernel releases the lock when the process dies, however it dies; the file stays, naming
    the last holder. Where flock does not exist (not POSIX) no lock is taken."""
    try:
        import fcntl
    except ImportError:
        yield run / LOCK_NAME
        return
    import json
    import socket
    import sys
    import time

    path = run / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DdpmError(f"run {run} is being written by another ddpm ({_holder(fd)}); wait for it to "
                            "finish or stop it") from None
        who = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(command or sys.argv),
               "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def check_unlocked(run: Path) -> None:
    """Refuse at once, before any work, a run another command is writing now (its lock held);
    nothing is created. The lock itself is taken later, at the first write (:func:`run_lock`)."""
    try:
        import fcntl
        fd = os.open(run / LOCK_NAME, os.O_RDWR)
    except (ImportError, OSError):  # not POSIX, or never locked: nobody writes it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DdpmError(f"run {run} is being written by another ddpm ({_holder(fd)}); wait for it to "
                        "finish or stop it") from None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, from the lock file (as much as can be read)."""
    import json

    try:
        who = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {who['pid']} on {who['host']}, {shorten(who['command'], 240)}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded"


# ------------------------------------------------------------------ signals


class Stopped(KeyboardInterrupt):
    """SIGTERM (or SIGINT) turned into an exception, so that clean-up runs; exit status 128 + signum."""

    def __init__(self, signum: int, message: str = ""):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}{'; ' + message if message else ''}")
        self.signum = signum


def raise_stopped(signum: int, frame: object) -> None:
    """A signal handler: SIGTERM becomes :class:`Stopped` (the default would skip every clean-up)."""
    raise Stopped(signum)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (the renames of a result set)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no POSIX masks: the window stays small anyway
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ result sets


class ResultSet:
    """The outputs of one command (e.g. grid.png, samples.npz, denoising.gif), all new or all old.

    Every file is first written in full to a temporary name beside its place and fsynced; only
    then are they renamed into place, with SIGINT/SIGTERM held for those few renames. Members of
    the set not written this time are removed with it, so an earlier GIF never sits beside new
    samples. A failure or a signal before the renames removes the temporaries and leaves the
    earlier set as it was; ``keep`` names the member saved elsewhere if its place cannot be written.
    """

    def __init__(self, folder: str | Path, members: Sequence[str], keep: str | None = None):
        self.folder, self.members, self.keep = Path(folder), tuple(members), keep
        self.files: dict[str, bytes | Path] = {}

    def add(self, name: str, data: bytes | Path) -> None:
        """A member: its bytes, or a temporary file already written beside its place
        (:meth:`temporary`, e.g. by :class:`NpyStream`), renamed into place with the rest."""
        if name not in self.members:
            raise ValueError(f"{name} is not a member of this result set {self.members}")
        self.files[name] = data

    def temporary(self, name: str) -> Path:
        """Where a member too large to hold in memory is written before :meth:`add` (its folder made)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return _tmp_name(self.folder / name)

    def commit(self) -> list[Path]:
        """Write the set; on failure a one-line WriteError that says the earlier files are unchanged."""
        temps: dict[str, Path] = {}
        current = self.folder  # what the message names: the member being written, never its temporary
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name, data in self.files.items():
                current = self.folder / name
                temps[name] = data if isinstance(data, Path) else _tmp_name(current)
                if current.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file")
                if isinstance(data, Path):
                    _fsync_file(data)
                else:
                    write_new(temps[name], data)
        except OSError as e:
            self._drop(temps)
            raise WriteError(current, reason(e), e.errno or 0, self._failure_note()) from None
        except KeyboardInterrupt as e:
            self._drop(temps)
            raise Stopped(getattr(e, "signum", signal.SIGINT), f"nothing written; {self._unchanged()}") from None
        except BaseException:
            self._drop(temps)
            raise
        with signals_held():
            for name, tmp in temps.items():
                os.replace(tmp, self.folder / name)
            for name in self.members:
                if name not in self.files:
                    _discard(self.folder / name)
        fsync_dir(self.folder)
        return [self.folder / name for name in self.members if name in self.files]

    def _drop(self, temps: dict[str, Path]) -> None:
        for tmp in temps.values():
            _discard(tmp)

    def _unchanged(self) -> str:
        old = [n for n in self.members if (self.folder / n).exists()]
        return f"the earlier {', '.join(old)} in {self.folder} are unchanged" if old else "no earlier files there"

    def _failure_note(self) -> str:
        note = f"; {self._unchanged()}"
        if self.keep in self.files:
            kept = self.files[self.keep]
            saved = save_fallback(self.keep, kept.read_bytes() if isinstance(kept, Path) else kept)
            note += f"; the {self.keep} is saved as {saved}" if saved else f"; the {self.keep} could not be saved anywhere"
        return note


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NpyStream:
    """One array of a known shape written into an uncompressed .npz batch by batch, so that a
    large result never has to be held in memory; further small arrays follow with :meth:`add`."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: object):
        import zipfile

        import numpy as np

        self.path, self.shape, self.written = path, shape, 0
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.member = self.zip.open(f"{name}.npy", "w", force_zip64=True)
        self.dtype = np.dtype(dtype)
        np.lib.format.write_array_header_1_0(self.member, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                           "fortran_order": False, "shape": shape})

    def write(self, rows: object) -> None:
        import numpy as np

        a = np.ascontiguousarray(rows, dtype=self.dtype)
        if a.shape[1:] != self.shape[1:] or self.written + len(a) > self.shape[0]:
            raise ValueError(f"rows of shape {a.shape} do not continue an array of shape {self.shape}")
        self.member.write(a.tobytes())
        self.written += len(a)

    def add(self, name: str, array: object) -> None:
        """A further array, after the streamed one is complete."""
        import numpy as np

        self._finish_member()
        with self.zip.open(f"{name}.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(array))

    def close(self) -> Path:
        self._finish_member()
        self.zip.close()
        return self.path

    def discard(self) -> None:
        try:
            self.member.close()
            self.zip.close()
        except (OSError, ValueError):
            pass
        _discard(self.path)

    def _finish_member(self) -> None:
        if self.member is not None:
            if self.written != self.shape[0]:
                raise ValueError(f"{self.written} rows written of {self.shape[0]}")
            self.member.close()
            self.member = None


def save_fallback(name: str, data: bytes) -> Path | None:
    """Keep minutes of work when its place cannot be written: the temp folder, else the current one."""
    stem, dot, ext = name.partition(".")
    for folder in (Path(tempfile.gettempdir()), Path.cwd()):
        path = None
        try:
            fd, name_ = tempfile.mkstemp(prefix=f"ddpm-{stem}-", suffix=dot + ext, dir=folder)
            os.close(fd)
            path = Path(name_)
            write_new(path, data)
            return path
        except OSError:
            if path is not None:
                _discard(path)
    return None
