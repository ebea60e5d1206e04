"""Faults that used to end in a traceback or a run no command could use: names that are not
UTF-8, a decompression-bomb mask, an ONNX opset outside the exporter's range, a hand-edited
distill.json, flags given with distill --resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.cli import main
from helpers import tiny_run, write_config
from helpers import tiny_config as tiny

BAD = os.fsdecode(b"\xff-name")  # bytes that are not UTF-8, as Python hands them over (PEP 383)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    return tiny_run(tmp_path_factory.mktemp("faults"), image_dir)


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


NOT_UTF8 = [
    ["train", "--config", "{cfg}", "--out", "{bad}"],
    ["train", "--config", "{cfg}", "--name", BAD],
    ["sample", "{run}", "--n", "2", "--out", "{bad}"],
    ["sample", "{bad}"],
    ["eval", "--samples", "{bad}/s.npz"],
    ["export", "{run}", "--onnx", "--out", "{bad}/m.onnx"],
    ["noise", "--image", "{bad}.png", "--out", "{tmp}/n.png"],
    ["plot", "{run}", "--out", "{bad}.png"],
    ["distill", "{run}", "--out", "{bad}"],
    ["inpaint", "{run}", "--image", "{bad}.png", "--mask", "{tmp}/m.png"],
    ["edit", "{run}", "--image", "{tmp}/i.png", "--strength", "0.5", "--out", "{bad}"],
    ["ui", "{bad}"],
]


@pytest.mark.parametrize("argv", NOT_UTF8, ids=lambda a: " ".join(a[:1] + a[-2:-1]))
def test_names_that_are_not_utf8_are_refused_first(argv: list[str], run: Path, image_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny(image_dir))
    before = files_of(run)
    args = [a.format(cfg=cfg, run=run, bad=tmp_path / BAD, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the name b'") and "\\xff-name" in err and err.endswith(
        "' is not UTF-8; ddpm reads and writes names in UTF-8 only: rename it or choose another"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]  # nothing made
    assert files_of(run) == before


def test_not_utf8_under_a_strict_utf8_terminal(run: Path, tmp_path: Path) -> None:
    """One line, no traceback, even where printing the name itself would fail."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}
    out = os.fsencode(tmp_path) + b"/\xff"
    res = subprocess.run([os.fsencode(sys.executable), b"-m", b"ddpm.cli", b"sample", os.fsencode(run), b"--n",
                          b"2", b"--out", out], env=env, capture_output=True)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(b"error: the name "), res.stderr
    assert not os.path.exists(out)


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG header of side x side 1-bit pixels and almost no data: Pillow refuses it as a
    decompression bomb when it opens the file."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("flag", ["--mask", "--image"])
def test_a_decompression_bomb_mask_or_image_is_one_line(flag: str, run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 255).save(good)
    files = {"--mask": good, "--image": good, flag: bomb_png(tmp_path / "bomb.png")}
    assert main(["inpaint", str(run), "--image", str(files["--image"]), "--mask", str(files["--mask"]),
                 "--out", str(tmp_path / "out"), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot read {'mask' if flag == '--mask' else 'image'} {tmp_path / 'bomb.png'}: "
                          "Image size (400000000 pixels) exceeds limit"), err
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_a_decompression_bomb_for_the_noise_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["noise", "--image", str(bomb_png(tmp_path / "bomb.png")), "--out", str(tmp_path / "n.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot read image {tmp_path / 'bomb.png'}: Image size"), err
    assert not (tmp_path / "n.png").exists()


@pytest.mark.parametrize("opset", ["-1", "0", "13", "24", "1000"])
def test_an_opset_the_exporter_cannot_write_is_one_line(opset: str, run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnx")
    from ddpm.export import MIN_OPSET, max_opset

    top = max_opset()
    argv = ["export", str(run), "--onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*argv, "--opset", str(top + 1 if opset == "24" else opset)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --opset must be between {MIN_OPSET} and {top} "), err
    assert "\n" not in err and not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def student(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ddpm.training.distill import DistillConfig, distill

    out = tmp_path_factory.mktemp("student") / "s"
    d = DistillConfig(str(run), teacher_steps=4, student_steps=2, steps_per_round=2)
    distill(d, out, device="cpu", progress=False, log=lambda s: None)
    return out


def student_copy(student: Path, tmp_path: Path, distill_json: str) -> Path:
    import shutil

    s = Path(shutil.copytree(student, tmp_path / "s"))
    (s / "distill.json").write_text(distill_json)
    return s


HAND_EDITED = [
    ("{", "Expecting property name"),
    ("[]", "a config must be a JSON object, got list"),
    ('{"method": "consistency"}', "missing 1 required positional argument: 'teacher'"),
    ('{"teacher": 5}', "teacher must be a string, got 5"),
    ('{"teacher": "t", "student_steps": "4"}', "student_steps must be an integer, got '4'"),
    ('{"teacher": "t", "student_steps": null}', "student_steps must be an integer, got None"),
    ('{"teacher": "t", "method": "fast"}', "unknown method 'fast'; choose one of: progressive, consistency"),
    ('{"teacher": "t", "extra": 1}', "unknown config key extra"),
    ("[" * 100_000 + "]" * 100_000, "recursion"),
]


@pytest.mark.parametrize("text,message", HAND_EDITED, ids=[m[:24] for _, m in HAND_EDITED])
def test_a_hand_edited_distill_json_is_one_line_everywhere(text: str, message: str, student: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """sample, eval, distill --resume and what the web page's run list reads (student_in)."""
    from ddpm.errors import DdpmError
    from ddpm.training.distill import student_in

    s = student_copy(student, tmp_path, text)
    before = files_of(s)
    with pytest.raises(DdpmError, match="is not a distillation run") as e:
        student_in(s)
    assert message in str(e.value) and "\n" not in str(e.value)
    for argv in (["sample", str(s), "--n", "2", "--out", str(tmp_path / "o")],
                 ["eval", str(s), "--n", "2", "--out", str(tmp_path / "o")],
                 ["distill", str(student.parent), "--out", str(s), "--resume"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and (message in err or "teacher" in err), (argv, err)
    assert files_of(s) == before and not (tmp_path / "o").exists()


def test_a_bad_value_in_distill_json_is_one_line(student: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (student / "distill.json").read_text()
    s = student_copy(student, tmp_path, text.replace('"student_steps": 2', '"student_steps": -3'))
    assert main(["sample", str(s), "--n", "2", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: steps must be between 1 and T=20, got -3"
    s2 = student_copy(student, tmp_path / "b", text.replace('"lr": 0.0001', '"lr": NaN'))
    assert main(["distill", json.loads(text)["teacher"], "--out", str(s2), "--resume"]) == 2
    assert "--steps-per-round, --lr and --batch-size must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [
    (["--lr", "0.5"], "--lr (the run has 0.0001)"),
    (["--method", "progressive", "--student-steps", "1"], "--method (the run has 'consistency'), --student-steps "
                                                          "(the run has 2)"),
    (["--batch-size", "4"], "--batch-size (the run has None)"),
])
def test_distill_resume_refuses_flags_it_would_ignore(flags: list[str], named: str, student: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    s = student_copy(student, tmp_path, (student / "distill.json").read_text())
    teacher = json.loads((s / "distill.json").read_text())["teacher"]
    before = files_of(s)
    assert main(["distill", teacher, "--out", str(s), "--resume", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --resume continues the distillation as it began; it cannot change {named}: drop "
                   f"{'them' if ', ' in named else 'it'} or distil into a new --out"), err
    assert files_of(s) == before


def test_distill_resume_takes_the_same_flags_and_another_spelling_of_the_teacher(
        student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    s = student_copy(student, tmp_path, (student / "distill.json").read_text())
    teacher = Path(json.loads((s / "distill.json").read_text())["teacher"])
    monkeypatch.chdir(teacher.parent)
    assert main(["distill", teacher.name, "--out", str(s), "--resume", "--lr", "1e-4", "--student-steps", "2",
                 "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
