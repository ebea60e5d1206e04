"""Shared helpers of the benchmarks: the seed reference by path, interleaved timing, peak memory,
and where and in what shape a benchmark writes its record.

Every figure the benchmarks report is a ratio of contenders timed in one process, in turns
(A, B, A, B, ...), so that load from other processes on the machine hits both alike.

Every record a benchmark writes carries a ``record`` object of one schema (:func:`stamp`): the
suite, the script, the commit, the command, the machine kind and the date. Records go to
``bench/out/results/SUITE/`` (:data:`RESULTS`, not committed), so a re-run never overwrites the
committed evidence in ``RESULTS/SUITE/``; ``DDPM_BENCH_PUBLISH=1`` writes there instead
(a record meant to be committed and quoted), ``DDPM_BENCH_RESULTS=DIR`` anywhere else. The
scripts' docstrings write ``RESULTS/NAME.json`` for that folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"  # run folders, grids, caches (not committed)
PUBLISHED = Path(__file__).resolve().parent / "results"  # the small JSON each quoted figure comes from (committed)
REFERENCE = Path(os.environ.get("SEED_REFERENCE", ROOT.parent / "shared" / "bench" / "seed_reference.py"))
SCHEMA = "ddpm-bench/1"

# script -> the suite (folder of results) its records belong to
SUITE_OF = {
    "throughput": "speed", "levers": "speed", "profile_step": "speed", "sample_gap": "speed",
    "guidance_cost": "speed", "ui_latency": "speed", "scale": "speed", "ddp": "speed", "precision_trial": "speed",
    "engines": "engines", "engine_fd": "engines", "bf16_cost": "engines", "int8_schemes": "engines",
    "sampler_oracle": "samplers", "sampler_defaults_fd": "samplers", "spacing_fd": "samplers",
    "control": "control", "guided_rows": "control", "autoguidance_sweep": "control",
    "inpaint": "editing", "distill_quality": "distillation", "distill_step_cost": "distillation",
    "quality": "quality", "nfe_sweep": "quality", "ablate": "quality", "demo_autoguidance": "quality",
    "learned_variance": "quality", "processes": "quality", "eval_floor": "shipped", "ship_model": "shipped", "fit_features": "shipped",
    "dit_steps": "speed", "core_overhead": "speed", "dit_vs_unet": "quality",
}


def suite_of(script: str | None = None) -> str:
    """The suite of a script (by default the one running), ``misc`` for one not in SUITE_OF."""
    return SUITE_OF.get(Path(script or sys.argv[0]).stem, "misc")


def results_dir(script: str | None = None) -> Path:
    """The folder a script's records go to (see the module's docstring)."""
    if os.environ.get("DDPM_BENCH_PUBLISH") == "1":
        base = PUBLISHED
    else:
        base = Path(os.environ.get("DDPM_BENCH_RESULTS", OUT / "results"))
    return base / suite_of(script)


RESULTS = results_dir()


def git_commit() -> dict:
    """The commit the code ran at, and whether the work tree had changes beside it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "src", "bench")) if commit else None
    return {"commit": commit, "dirty": dirty}


def stamp(result: dict, command: list[str] | None = None) -> dict:
    """``result`` with the ``record`` object of the one schema first (suite, script, commit,
    command, machine kind, CPU, threads, torch, date); an existing ``record`` is replaced."""
    import torch

    cpu = cpu_info()
    record = {"schema": SCHEMA, "suite": suite_of(), "script": f"bench/{Path(sys.argv[0]).name}",
              **git_commit(), "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}",
                                                   *(sys.argv[1:] if command is None else command)]),
              "machine": {"kind": cpu["kind"], "cpu_model": cpu["cpu_model"], "threads": torch.get_num_threads(),
                          "torch": torch.__version__, **({"kernel_caps": cpu["kernel_caps"]} if "kernel_caps" in cpu else {})},
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return {"record": record, **{k: v for k, v in result.items() if k != "record"}}


def load_reference() -> ModuleType:
    """The seed's own code (DESIGN.md, "Measuring"), imported by path, never copied."""
    spec = importlib.util.spec_from_file_location("seed_reference", REFERENCE)
    if spec is None or spec.loader is None or not REFERENCE.is_file():
        sys.exit(f"seed reference not found at {REFERENCE} (set SEED_REFERENCE)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def interleave(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
               ) -> dict[str, list[float]]:
    """Seconds per call of each contender, called in turns for ``rounds`` rounds after
    ``warmup`` untimed rounds; the order within a round alternates to cancel drift."""
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """How many times faster ``num`` is than ``den`` (median of per-round ratios, so that a
    round slowed by outside load counts once rather than skewing one side)."""
    return float(statistics.median(b / a for a, b in zip(times[num], times[den])))


# A process's ru_maxrss counts the memory of the process it was forked from (Linux carries
# the parent's high-water mark across fork and exec), so the child is started from a small
# launcher that has not imported torch, and the launcher reports the child's rusage.
_LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
out = p.stdout.read()
_, status, ru = os.wait4(p.pid, 0)
sys.stdout.write(out.decode())
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "ru_maxrss_kib": ru.ru_maxrss}))
"""


def peak_rss_mib(argv: list[str]) -> tuple[float, str]:
    """Run ``argv`` as a child; return (its peak resident memory in MiB, its stdout)."""
    p = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], stdout=subprocess.PIPE, cwd=ROOT, check=True)
    lines = p.stdout.decode().strip().splitlines()
    report = json.loads(lines[-1])
    if report["exit"]:
        raise RuntimeError(f"{argv} exited with {report['exit']}")
    return report["ru_maxrss_kib"] / 1024, "\n".join(lines[:-1])  # Linux reports KiB


def vm_mib(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS now, VmHWM the peak of this address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_info() -> dict:
    """Which CPU a figure is from: the model name and the vector extensions that change results
    (AVX-512 and native bfloat16 make bf16 autocast pay; AVX2-only machines emulate it)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    from ddpm.runtime.precision import KERNEL_CAP_VARS

    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", *KERNEL_CAP_VARS) if k in os.environ}
    return {"cpu_model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "kind": "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other"),
            **({"kernel_caps": caps} if caps else {})}  # a capped run emulates another kind: say so


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is missing or unreadable (a cache miss)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def choose(csv: str, table: dict, what: str) -> list[str]:
    """The comma-separated names of ``csv``, each checked against ``table`` (exits on a bad one)."""
    names = [n for n in csv.split(",") if n]
    bad = [n for n in names if n not in table]
    if bad:
        sys.exit(f"unknown {what} {bad[0]!r}; choose from {', '.join(table)}")
    return names


def save(name: str, result: dict, folder: Path | None = None) -> Path:
    """Write ``result``, stamped, as ``folder/name.json`` (:data:`RESULTS` by default) and print it."""
    return write_record((folder or RESULTS) / f"{name}.json", result)


def write_record(path: Path, result: dict, indent: int = 2) -> Path:
    """Write ``result`` stamped with the record schema at ``path`` (its folder made), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(stamp(result), indent=indent, default=list) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}")
    return path
