"""One process with two threads against two processes (torchrun, gloo) with one thread each.

    python bench/ddp.py                       # the fast preset, 300 steps each: ~2 min on 2 cores
    python bench/ddp.py --preset seed --steps 20

Both run `ddpm train` for the same steps, one after the other; images/s is the median of the
log's records after the first (start-up and the first steps excluded), and the loss at the last
step shows whether the two followed the same trajectory. Writes RESULTS/ddp.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import cpu_info, save

from ddpm.training.runlog import read_log


def run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def summary(run_dir: Path, wall: float) -> dict:
    recs = [r for r in read_log(run_dir / "log.jsonl") if "img_per_s" in r]
    return {"img_per_s": statistics.median(r["img_per_s"] for r in recs[1:]), "wall_s": wall,
            "last_step": recs[-1]["step"], "last_loss": recs[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    train = ["-m", "ddpm.cli", "train", "--preset", a.preset, "--max-steps", str(a.steps), "--no-progress",
             "--no-tensorboard", "--out"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        env1 = {**os.environ, "OMP_NUM_THREADS": "2"}
        env2 = {**os.environ, "OMP_NUM_THREADS": "1"}
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        r1 = summary(one, run([sys.executable, *train, str(one)], env1))
        r2 = summary(two, run([*torchrun, *train, str(two)], env2))
    save("ddp", {"command": "python " + " ".join(sys.argv), "preset": a.preset, "steps": a.steps,
                 "machine": cpu_info(), "loadavg_end": os.getloadavg(), "one_process_two_threads": r1,
                 "two_processes_one_thread": r2, "ratio": r2["img_per_s"] / r1["img_per_s"]})


if __name__ == "__main__":
    main()
