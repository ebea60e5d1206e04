"""Training steps per second of the DiT presets against the fast U-Net, interleaved, on CPU.

    PYTHONPATH=src python bench/dit_steps.py                     # ~1 min on a 2-core CPU
    DDPM_BENCH_PUBLISH=1 PYTHONPATH=src python bench/dit_steps.py --threads 2

Contenders, called in turns in one process: one ``Trainer.train_step`` (fp32, the preset's
batch of 32, 28x28 grey images) of ``fast`` (the U-Net), ``dit`` (patch 4: 7x7 tokens) and
``dit`` at patch 2 (14x14 tokens), the choice the dit preset was made on. The data is random
pixels: a step's cost does not depend on them. Writes RESULTS/dit_steps.json with each one's
parameters, steps per second and speed over fast's (median of per-round ratios).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from harness import RESULTS, interleave, median, ratio, write_record
from throughput import machine

from ddpm import preset
from ddpm.config import RunConfig
from ddpm.nn import count_parameters
from ddpm.training.train import Trainer


def contenders() -> dict[str, RunConfig]:
    dit = preset("dit")
    return {"fast": preset("fast"), "dit": dit,
            "dit_patch2": replace(dit, model=replace(dit.model, patch_size=2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result: dict = {"machine": machine(torch.device("cpu")),
                    "command": " ".join(["python", "bench/dit_steps.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, cfg in contenders().items():
            cfg = replace(cfg, train=replace(cfg.train, precision="fp32", minutes=None, max_steps=10**6))
            trainers[name] = Trainer(cfg, Path(tmp) / name, data, torch.device("cpu"))
        times = interleave({n: tr.train_step for n, tr in trainers.items()}, rounds=a.rounds, warmup=a.warmup)
        for name, tr in trainers.items():
            result[name] = {"parameters": count_parameters(tr.model), "steps_per_s": 1 / median(times[name]),
                            "speed_over_fast": ratio(times, name, "fast"),
                            "seconds": [round(x, 4) for x in times[name]]}
    write_record(RESULTS / "dit_steps.json", result)
    for name in trainers:
        r = result[name]
        print(f"{name:11s} {r['parameters']:>9,} parameters  {r['steps_per_s']:5.1f} steps/s  "
              f"{r['speed_over_fast']:.2f}x fast")


if __name__ == "__main__":
    main()
