"""Where a training step's time goes, per operator: torch.profiler over a few steps of a preset.

    python bench/profile_step.py --preset seed --steps 10 --threads 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/profile_step.py --name profile_step_avx2

Each step is the trainer's own (forward, loss, backward, Adam, EMA) on Fashion-MNIST-shaped
random images; the first steps are a warm-up and not profiled. Writes
RESULTS/NAME.json: the share of self CPU time of each operator group (convolution
forward and backward, GroupNorm, GEMMs, element-wise, optimiser) and the top operators.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from harness import cpu_info, save
from ddpm.config import override, preset
from ddpm.training.train import Trainer

GROUPS = [  # (group, substrings of the aten op name), first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("mkldnn_convolution", "convolution", "conv2d")),
    ("group norm", ("group_norm", "native_group_norm")),
    ("matrix products (attention, linear)", ("mm", "bmm", "addmm", "matmul", "linear", "baddbmm")),
    ("optimiser and EMA", ("_foreach", "adam", "lerp")),
    ("copies and layout", ("copy_", "contiguous", "clone", "to_", "cat", "empty", "as_strided")),
]


def group_of(name: str) -> str:
    n = name.lower()
    for g, keys in GROUPS:
        if any(k in n for k in keys):
            return g
    return "element-wise and other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="seed")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="profile_step")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = preset(a.preset)
    cfg = dataclasses.replace(cfg, train=override(cfg.train, precision="fp32", epochs=None, max_steps=10**6))
    n = cfg.train.batch_size * 8
    data = torch.randint(0, 256, (n, 1, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8)
    tr = Trainer(cfg, Path(tempfile.mkdtemp()), data, torch.device("cpu"))
    for _ in range(a.warmup):
        tr.train_step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            tr.train_step()
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    # self time of aten ops only: nested aten calls are not double counted
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    result = {
        "preset": a.preset, "batch_size": cfg.train.batch_size, "threads": a.threads, "steps": a.steps,
        "seconds_per_step_profiled": round(wall / a.steps, 4), "cpu": cpu_info(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "load_average": os.getloadavg()[0],
        "share_by_group": {g: round(v / total, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                    for e in top],
    }
    save(a.name, result)
    for g, s in result["share_by_group"].items():
        print(f"{100 * s:5.1f}%  {g}")


if __name__ == "__main__":
    main()
