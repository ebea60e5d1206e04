"""No slowdown from the processes table: the training and sampling steps of ``fast`` and ``seed``
under today's code against an earlier commit's, side by side.

    python bench/core_overhead.py                 # against d004f07 (before the processes table)
    python bench/core_overhead.py --old REV --rounds 9 --threads 1

Two child processes, one importing ``ddpm`` from the earlier commit's ``src`` (``git archive``
into bench/out/old-REV) and one from this checkout's, each building the same contenders (same
seed, same synthetic uint8 batch data); the parent asks them in turns (A, B, B, A, ...) to time a
block of work, so that load from elsewhere hits both alike, and reports the median of the per-round
ratios new / old (1.0: the same; the issue's bar is within 2%).

  train   ``Trainer.train_step`` (batch, levels drawn, loss, backward, Adam, EMA), fp32
  sample  ``generate``: fast with dpm++2m (20 steps), seed with ddpm (its T = 200 steps), fp32

Writes RESULTS/core_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import OUT, ROOT, cpu_info, results_dir, stamp, write_record

CHILD = r'''
import json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
from ddpm.config import override, preset
from ddpm.sampling.generate import LoadedModel, SampleConfig, generate
from ddpm.core.schedules import make_schedule
from ddpm.training.train import Trainer
from dataclasses import replace

torch.manual_seed(0)
data = torch.randint(0, 256, (2048, 1, 28, 28), dtype=torch.uint8)
made = {}
def trainer(name):
    if name not in made:
        cfg = preset(name)
        cfg = replace(cfg, train=override(cfg.train, precision="fp32", max_steps=10**6, epochs=None, minutes=None))
        made[name] = Trainer(cfg, Path(tempfile.mkdtemp()), data, torch.device("cpu"))
    return made[name]
SAMPLE = {"fast": ("dpm++2m", 20, 32), "seed": ("ddpm", 200, 16)}
print("ready", flush=True)
for line in sys.stdin:
    what, name, k = line.split()
    tr = trainer(name)
    t0 = time.perf_counter()
    if what == "train":
        for _ in range(int(k)):
            tr.train_step()
    else:
        sampler, steps, n = SAMPLE[name]
        net = tr.model.eval()
        lm = LoadedModel(net, make_schedule(tr.cfg), tr.cfg, 0, Path(tempfile.mkdtemp()))
        for _ in range(int(k)):
            generate(lm, SampleConfig(sampler=sampler, steps=steps, n=n, batch_size=n, precision="fp32"))
        net.train()
    print(json.dumps({"s": time.perf_counter() - t0}), flush=True)
'''


def old_src(rev: str) -> Path:
    dest = OUT / f"old-{rev}"
    if not (dest / "src" / "ddpm").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


class Child:
    def __init__(self, src: Path, threads: int):
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, str(threads)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert self.p.stdout.readline().strip() == "ready"

    def time(self, what: str, name: str, k: int) -> float:
        self.p.stdin.write(f"{what} {name} {k}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())["s"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="d004f07", help="the earlier commit")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=20, help="training steps per timed block")
    a = ap.parse_args()
    old, new = Child(old_src(a.old), a.threads), Child(ROOT / "src", a.threads)
    blocks = {("train", "fast"): a.train_steps, ("train", "seed"): max(2, a.train_steps // 5),
              ("sample", "fast"): 1, ("sample", "seed"): 1}
    result = {}
    for (what, name), k in blocks.items():
        old.time(what, name, k), new.time(what, name, k)  # warm-up: build, first calls
        t_old, t_new = [], []
        for r in range(a.rounds):
            pair = [(old, t_old), (new, t_new)]
            for child, times in (pair if r % 2 == 0 else pair[::-1]):
                times.append(child.time(what, name, k))
        ratios = [n / o for n, o in zip(t_new, t_old)]
        result[f"{what}_{name}"] = {"ratio_new_over_old": round(statistics.median(ratios), 4),
                                    "ratios": [round(x, 4) for x in ratios],
                                    "old_s_per_block": round(statistics.median(t_old), 4),
                                    "new_s_per_block": round(statistics.median(t_new), 4), "per_block": k}
        print(f"{what} {name}: new / old = {result[f'{what}_{name}']['ratio_new_over_old']:.3f}", flush=True)
    old.close(), new.close()
    out = results_dir() / "core_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_record(out, stamp({"old": a.old, "threads": a.threads, "rounds": a.rounds, "results": result,
                             "cpu": cpu_info(), "loadavg": [round(x, 2) for x in os.getloadavg()]}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
