"""Every output path of every subcommand: one line and exit status 2 when it cannot be written,
checked before the long work; a result set that is all new or all old; the work kept when its
place fails after all. Real file systems where the machine allows (a 2 MB tmpfs, a read-only one).
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
import pytest

import ddpm.files
from ddpm.cli import main
from ddpm.files import ResultSet, WriteError, atomic_write_bytes, check_writable_dir, check_writable_file
from ddpm.training.train import train
from helpers import fill_disk, small_disk
from helpers import tiny_config as tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A finished tiny run (a log and checkpoints), the input of sample, plot and eval --nll."""
    root = tmp_path_factory.mktemp("outputs")
    train(tiny(image_dir, max_steps=2), root / "run", progress=False, log=lambda s: None)
    (root / "cfg.json").write_text(tiny(image_dir, max_steps=2).to_json())
    return root / "run"


def files_of(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# argv for each subcommand, with OUT standing for the output path; kind: a "file" or a "dir" output
COMMANDS = {
    "train": ("dir", lambda run, out: ["train", "--config", str(run.parent / "cfg.json"), "--out", out,
                                       "--no-progress"]),
    "demo": ("dir", lambda run, out: ["demo", "--minutes", "0.01", "--out", out, "--device", "cpu"]),
    "sample": ("dir", lambda run, out: ["sample", str(run), "--n", "2", "--steps", "2", "--sampler", "ddim",
                                        "--out", out]),
    "eval": ("dir", lambda run, out: ["eval", "--samples", str(run / "samples" / "samples.npz"), "--out", out]),
    "eval --nll": ("dir", lambda run, out: ["eval", str(run), "--nll", "--n", "2", "--out", out]),
    "noise": ("file", lambda run, out: ["noise", "--image", str(run / "samples" / "grid.png"), "--t", "0,5",
                                        "--timesteps", "10", "--out", out]),
    "schedules": ("file", lambda run, out: ["schedules", "--timesteps", "10", "--out", out]),
    "plot": ("file", lambda run, out: ["plot", str(run), "--out", out]),
}


def argv(name: str, run: Path, out: Path) -> list[str]:
    return COMMANDS[name][1](run, str(out))


@pytest.fixture(scope="module")
def with_samples(run: Path) -> Path:
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--sampler", "ddim"]) == 0
    return run


def bad_places(tmp_path: Path, kind: str) -> list[tuple[str, Path, str]]:
    """(what, output path, words the message must hold) for the faults that need no mount."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    places = [("parent is a file", tmp_path / "a-file" / "out", "a-file"),
              ("parent cannot be made", Path("/proc/no-such/out"), "/proc")]
    if kind == "file":
        places.append(("a folder where the file goes", tmp_path / "a-dir", "folder"))
    else:
        places.append(("a file where the folder goes", tmp_path / "a-file", "a-file"))
    return places


@pytest.mark.parametrize("name", list(COMMANDS))
def test_unwritable_outputs_are_one_line(name: str, with_samples: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    before = files_of(with_samples)
    for what, out, needle in bad_places(tmp_path, COMMANDS[name][0]):
        assert main(argv(name, with_samples, out)) == 2, what
        one_line(capsys, needle)
    assert files_of(with_samples) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]  # nothing made on the way


@pytest.mark.parametrize("name", list(COMMANDS))
def test_read_only_and_full_disks_are_one_line(name: str, with_samples: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    with small_disk(tmp_path / "ro", read_only=True) as ro:
        assert main(argv(name, with_samples, ro / "out" / ("x.png" if COMMANDS[name][0] == "file" else "d"))) == 2
        one_line(capsys, "Read-only file system")
    with small_disk(tmp_path / "full", size="1m") as full:
        fill_disk(full)
        out = full / ("x.png" if COMMANDS[name][0] == "file" else "d")
        assert main(argv(name, with_samples, out)) == 2
        one_line(capsys, "No space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no temporaries, no probe left


@pytest.mark.parametrize("name", ["noise", "schedules", "plot", "sample"])
def test_missing_parents_are_made(name: str, with_samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / ("x.png" if COMMANDS[name][0] == "file" else "d")
    assert main(argv(name, with_samples, out)) == 0
    assert out.exists()


def test_sample_into_a_read_only_run(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    with small_disk(tmp_path / "ro", size="4m") as mnt:
        shutil.copytree(run, mnt / "run")
        os.system(f"mount -o remount,ro {mnt}")
        assert main(["sample", str(mnt / "run"), "--n", "1", "--steps", "2", "--sampler", "ddim"]) == 2
        one_line(capsys, str(mnt / "run" / "samples"), "Read-only file system")


# ------------------------------------------------------------------ result sets


def sample_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", str(run), "--n", "4", "--steps", "3", "--sampler", "ddim", "--out", str(out), *extra]


def test_a_new_set_replaces_the_whole_old_one(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert main(sample_argv(run, out, "--gif")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["denoising.gif", "grid.png", "samples.npz"]
    (out / "notes.txt").write_text("mine")
    assert main(sample_argv(run, out, "--seed", "1")) == 0
    # the GIF belonged to the replaced set: it goes with it; files not of the set stay
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "notes.txt", "samples.npz"]


def test_sigterm_while_writing_keeps_the_old_set(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    assert main(sample_argv(run, out, "--gif")) == 0
    before = files_of(out)
    real, calls = ddpm.files.write_new, [0]

    def write_new(path: Path, data: bytes) -> None:
        calls[0] += 1
        real(path, data)
        if calls[0] == 2 and ".tmp" in path.name:  # the second file of the new set is on disk, the third not
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ddpm.files, "write_new", write_new)
    assert main(sample_argv(run, out, "--gif", "--seed", "7")) == 143
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: stopped by SIGTERM; nothing written; the earlier ") and "\n" not in err
    assert "unchanged" in err
    assert files_of(out) == before  # every old file, same bytes and time; no temporary left


def test_full_disk_mid_set_keeps_old_set_and_the_samples(run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    good = tmp_path / "good"
    assert main(sample_argv(run, good, "--gif", "--seed", "3")) == 0
    with small_disk(tmp_path / "disk", size="1m") as disk:
        out = disk / "s"
        assert main(sample_argv(run, out, "--gif")) == 0
        before = files_of(out)
        gif = (good / "denoising.gif").stat().st_size
        assert gif > 4096  # the GIF needs more pages than are left; the npz and the grid fit
        fill_disk(disk, leave=2 * 4096)
        assert main(sample_argv(run, out, "--gif", "--seed", "3")) == 2
        err = one_line(capsys, f"cannot write {out / 'denoising.gif'}: No space left on device",
                       f"the earlier grid.png, samples.npz, denoising.gif in {out} are unchanged",
                       "the samples.npz is saved as ")
        assert files_of(out) == before
        assert sorted(p.name for p in out.iterdir()) == ["denoising.gif", "grid.png", "samples.npz"]
    saved = Path(err.split("the samples.npz is saved as ")[1])
    assert saved.parent == tmp_path
    with np.load(saved) as a, np.load(good / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])  # the minutes of sampling are not lost


def test_result_set_write_error_names_the_file_not_the_temporary(tmp_path: Path) -> None:
    (tmp_path / "grid.png").mkdir()  # a folder where a member goes
    rs = ResultSet(tmp_path, ("grid.png", "samples.npz"))
    rs.add("samples.npz", b"new")
    rs.add("grid.png", b"png")
    with pytest.raises(WriteError) as e:
        rs.commit()
    assert str(e.value).startswith(f"cannot write {tmp_path / 'grid.png'}: it is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


# ------------------------------------------------------------------ the writer itself


def test_atomic_write_fsyncs_the_file_and_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(tmp_path / "a.bin", b"data")
    assert synced[0].startswith(str(tmp_path / ".a.bin.tmp")) and synced[-1] == str(tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == b"data"


def test_checks_create_nothing(tmp_path: Path) -> None:
    check_writable_dir(tmp_path / "x" / "y")
    check_writable_file(tmp_path / "x" / "f.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ readers of the outputs


def test_eval_reads_a_plain_npy(with_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ddpm.data.sources import load_images_file as _load_npz_images

    with np.load(with_samples / "samples" / "samples.npz") as z:
        images = z["images"]
    np.save(tmp_path / "plain.npy", images)
    assert np.array_equal(_load_npz_images(str(tmp_path / "plain.npy")).numpy(), images)
    for content, needle in [(b"PK\x03\x04broken zip", "cannot read samples"), (b"", "cannot read samples")]:
        (tmp_path / "bad.npz").write_bytes(content)
        assert main(["eval", "--samples", str(tmp_path / "bad.npz")]) == 2
        one_line(capsys, needle)
    np.save(tmp_path / "flat.npy", np.zeros((3, 4), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "flat.npy")]) == 2
    one_line(capsys, "must be uint8 (N, C, H, W)")


def test_eval_output_file_is_checked_before_the_work(with_samples: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "taken").write_text("x")
    assert main(["eval", str(with_samples), "--n", "2", "--out", str(tmp_path / "taken")]) == 2
    one_line(capsys, "taken", "is a file, not a folder")


def test_many_images_are_streamed_to_disk_not_held(run: Path, tmp_path: Path, monkeypatch) -> None:
    """From STREAM_AT images on, `ddpm sample` writes samples.npz batch by batch and holds only
    the grid's images: the same file content as when held, and the result set as ever."""
    import ddpm.cli as cli
    import sys
    gen = sys.modules["ddpm.sampling.generate"]

    held = []
    real = gen.generate

    def spy(*a, **kw):
        s = real(*a, **kw)
        held.append(len(s.images))
        return s

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr(cli, "STREAM_AT", 10)
    monkeypatch.setattr(cli, "STREAM_KEEP", 4)  # the grid's images (64 by default): fewer here, to see it
    argv = ["sample", str(run), "--n", "12", "--batch-size", "5", "--steps", "2", "--sampler", "ddim", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    monkeypatch.setattr(cli, "STREAM_AT", 10**9)
    assert main([*argv, "--out", str(tmp_path / "h")]) == 0
    assert held == [4, 12]  # streamed: only the grid's images held
    streamed, kept = np.load(tmp_path / "s" / "samples.npz"), np.load(tmp_path / "h" / "samples.npz")
    assert np.array_equal(streamed["images"], kept["images"]) and streamed["images"].shape[0] == 12
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png", "samples.npz"]


def test_a_stream_cut_short_leaves_nothing(run: Path, tmp_path: Path, monkeypatch) -> None:
    import ddpm.cli as cli
    import sys
    gen = sys.modules["ddpm.sampling.generate"]

    def stop(*a, on_batch=None, **kw):
        on_batch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "STREAM_AT", 1)
    monkeypatch.setattr(gen, "generate", stop)
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--sampler", "ddim", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 130
    assert not (tmp_path / "s").exists()
