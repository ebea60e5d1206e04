"""The cost of classifier-free guidance, with glibc's default allocator and with the `ddpm`
command's (which keeps freed blocks for reuse: ddpm.runtime.env.keep_freed_memory).

    python bench/guidance_cost.py --malloc glibc     # writes guidance_cost_glibc.json
    python bench/guidance_cost.py --malloc command   # writes guidance_cost_command.json

Each run is its own process (the allocator is set for a whole process): images/s of guided
(w = 2, one batched pass of 2B rows) against unguided conditional sampling, dpm++2m 20 steps,
n = 100 in one batch, timed interleaved (bench/control.py's guidance_cost), plus the per-row
time of one network forward at 100, 200 and 400 rows, and the process's minor page faults.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from dataclasses import replace

import torch

from control import guidance_cost
from guided_rows import ms_per_row
from harness import cpu_info, save
from ddpm.config import SampleConfig
from ddpm.runtime.env import keep_freed_memory, process_settings
from ddpm.sampling.generate import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="fashion-mnist")
    ap.add_argument("--malloc", choices=["glibc", "command"], required=True)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.malloc == "command" and not keep_freed_memory():
        sys.exit("glibc's mallopt is not available here")
    torch.set_num_threads(a.threads)
    m = load_model(a.run)
    load = os.getloadavg()[0]
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cfg = SampleConfig(sampler="dpm++2m", steps=20, n=a.n, batch_size=250, classes="all")
    cost = guidance_cost(m, replace(cfg, n=a.n), a.guidance, a.rounds)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    rows = ms_per_row(m, (100, 200, 400))
    print(a.malloc, cost, rows, faults, flush=True)
    save(f"guidance_cost_{a.malloc}", {
        "command": f"python bench/guidance_cost.py --malloc {a.malloc}", "run": a.run, "model_step": m.step,
        "threads": a.threads, "cpu": cpu_info(), "load_average_at_start": load, **process_settings(),
        "sampler": "dpm++2m", "steps": 20, **cost, "minor_page_faults_during_cost": faults,
        "forward_ms_per_row": rows})


if __name__ == "__main__":
    main()
