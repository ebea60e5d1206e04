"""Distillation of a trained run, scored: FD-FMNIST of the student at its steps against the
teacher with DDIM at the same and the first round's steps, and DPM-Solver++ at 20.

    PYTHONPATH=src python bench/distill_quality.py runs/ref-fast --teacher-steps 8 --student-steps 2 \\
        --steps-per-round 150 --lr 5e-4 --n 1000
    PYTHONPATH=src python bench/distill_quality.py runs/ref-fast --method consistency --teacher-steps 16 \\
        --steps-per-round 250 --lr 1e-4 --n 1000     # the student at 1, 2 and 4 consistency steps

Runs the `ddpm` command (distill, then eval of each contender, n images each, the same seed)
and writes RESULTS/distill_quality.json with each FD, the wall time of each command and
the distillation's cost in images seen next to the teacher's (``--name NAME``: NAME.json). The
teacher's run is only read. A conditional teacher is evaluated as `ddpm eval` does without
``--class``: its null class, the unconditional model inside it; with ``--guidance 0,1`` each
contender is also scored class by class (``--class all``, n/10 per class) at each weight.
``--cond-drop P`` sets the student's null-class share (a conditional teacher's labels are dropped
at its own training rate by default). ``--keep DIR`` keeps the student's run folder; ``--student DIR`` scores an existing student
instead of distilling one (its figures then carry no distillation time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, cpu_info, write_record

ROOT = Path(__file__).resolve().parent.parent


def ddpm(*argv: str) -> float:
    """Run `ddpm ARGV` and return its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpm.cli", *argv], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def fd_of(folder: Path) -> dict:
    (report,) = list(folder.glob("eval-*.json"))
    d = json.loads(report.read_text())
    return {k: d.get(k) for k in ("fd", "fd_reference", "sampler", "steps", "nfe", "n_samples")}


def fd_by_guidance(folder: Path) -> dict:
    """A class-by-class report (``--class all --guidance W,...``): FD and class agreement per w."""
    (report,) = list(folder.glob("eval-*.json"))
    d = json.loads(report.read_text())
    return {str(r["guidance"]): {"fd": r["report"]["fd"], "agreement": r.get("agreement"), "nfe": r["report"].get("nfe"),
                                 "n_samples": r["report"]["n_samples"]} for r in d["results"]}


def images_seen(run: Path) -> int:
    """Optimiser steps x batch, the steps from the newest checkpoint's name (step-NNNNNNNN); the
    log's last line can be up to log_every steps short."""
    cfg = json.loads((run / "config.json").read_text())
    steps = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    return steps * int(cfg["train"]["batch_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("teacher")
    ap.add_argument("--teacher-steps", type=int, default=8)
    ap.add_argument("--student-steps", type=int, default=2)
    ap.add_argument("--steps-per-round", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--method", default="progressive", choices=["progressive", "consistency"])
    ap.add_argument("--target-decay", type=float, help="consistency: the target network's decay (default the command's)")
    ap.add_argument("--cond-drop", type=float,
                    help="conditional teachers: the student's null-class share (default the command's: the teacher's)")
    ap.add_argument("--no-teacher", action="store_true",
                    help="score the student only (the teacher's figures at the same --n and seed are in an earlier JSON)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--name", default="distill_quality", help="name of the JSON in RESULTS/")
    ap.add_argument("--guidance", help="also score each contender class by class at these weights, e.g. 0,1")
    ap.add_argument("--keep", type=Path, help="keep the student's run folder here")
    ap.add_argument("--student", type=Path, help="score this existing student instead of distilling one")
    a = ap.parse_args()
    res: dict = {"command": " ".join(["python", "bench/distill_quality.py", *sys.argv[1:]]),
                 "loadavg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_info()}
    k = str(a.student_steps)
    with tempfile.TemporaryDirectory() as tmp:
        student = a.student or a.keep or Path(tmp) / "student"
        if a.student is None:
            res["distill_seconds"] = ddpm("distill", a.teacher, "--out", str(student), "--teacher-steps",
                                          str(a.teacher_steps), "--student-steps", k, "--steps-per-round",
                                          str(a.steps_per_round), "--lr", str(a.lr), "--method", a.method,
                                          *(["--target-decay", str(a.target_decay)] if a.target_decay is not None
                                            else []),
                                          *(["--cond-drop", str(a.cond_drop)] if a.cond_drop is not None else []),
                                          "--device", "cpu", "--no-progress")
        res["student"] = str(student) if a.student or a.keep else None
        res["distill_images_seen"] = images_seen(student)
        res["student_cond_drop"] = json.loads((student / "config.json").read_text())["train"].get("cond_drop")
        res["teacher_images_seen"] = images_seen(Path(a.teacher))
        if a.method == "consistency":
            contenders = {f"student_consistency_{j}": (str(student), "consistency", str(j), "trailing")
                          for j in (1, 2, 4)}
        else:
            contenders = {f"student_ddim_{k}": (str(student), "ddim", k, "trailing"),
                          f"teacher_ddim_{k}": (a.teacher, "ddim", k, "trailing")}
        if not a.no_teacher:
            contenders |= {f"teacher_ddim_{a.teacher_steps}": (a.teacher, "ddim", str(a.teacher_steps), "trailing"),
                           "teacher_dpm++2m_20": (a.teacher, "dpm++2m", "20", "uniform"),
                           # the sampler's own spacing, as `ddpm sample/eval` use it by default
                           "teacher_dpm++2m_20_quadratic": (a.teacher, "dpm++2m", "20", "quadratic")}
        for name, (run, sampler, steps, spacing) in contenders.items():
            out = Path(tmp) / name
            secs = ddpm("eval", run, "--sampler", sampler, "--steps", steps, "--spacing", spacing,
                        "--n", str(a.n), "--out", str(out), "--device", "cpu")
            res[name] = {**fd_of(out), "eval_seconds": secs}
            if a.guidance:
                out = Path(tmp) / f"{name}_classes"
                secs = ddpm("eval", run, "--sampler", sampler, "--steps", steps, "--spacing", spacing,
                            "--class", "all", "--guidance", a.guidance, "--n", str(a.n), "--out", str(out),
                            "--device", "cpu")
                res[name]["by_guidance"] = {**fd_by_guidance(out), "eval_seconds": secs}
    res["loadavg_end"] = os.getloadavg()
    write_record(RESULTS / f"{a.name}.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
