"""What `--precision bf16` costs on a CPU without native bfloat16, against fp32, interleaved.

    PYTHONPATH=src python bench/bf16_cost.py            # ~5 min on a quiet 2-core AVX2-only CPU
    PYTHONPATH=src python bench/bf16_cost.py --presets seed --only train --train-batch 32 --rounds 2 --warmup 0
                        # one section, merged into the JSON (what a loaded machine allowed)

Contenders, called in turns (fp32, bf16, bf16, fp32, ...) in one process:
  train_<preset>   one optimisation step of ``Trainer.train_step`` as `ddpm train --preset P
                   --precision fp32|bf16` builds it (seed: batch 128; fast: batch 32)
  sample_<preset>  ``--sample-iters`` ancestral iterations (DDPM Algorithm 2) of 64 images with
                   the preset's network, channels-last, as `ddpm sample --precision fp32|bf16`
The ratio reported is bf16 speed over fp32 speed (median of per-round ratios): below 1 is a
slowdown. ``runtime/precision.py`` quotes it in its warning. Writes RESULTS/bf16_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import RESULTS, interleave, median, ratio, write_record
from throughput import machine, our_sampler

from ddpm import preset
from ddpm.data import load_fashion_mnist
from ddpm.nn import build_network
from ddpm.runtime.precision import native_bf16
from ddpm.training.train import Trainer



def trainer(name: str, precision: str, data: torch.Tensor, run_dir: Path, batch: int | None) -> Trainer:
    cfg = preset(name)
    cfg = replace(cfg, train=replace(cfg.train, precision=precision, minutes=None, max_steps=10**6,
                                     batch_size=batch or cfg.train.batch_size))
    return Trainer(cfg, run_dir, data, torch.device("cpu"))


def bench_train(name: str, rounds: int, data: torch.Tensor, batch: int | None, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        steps = {p: trainer(name, p, data, Path(tmp) / p, batch).train_step for p in ("fp32", "bf16")}
        times = interleave(steps, rounds=rounds, warmup=warmup)
    batch = batch or preset(name).train.batch_size
    return {"batch": batch, "fp32_img_per_s": batch / median(times["fp32"]),
            "bf16_img_per_s": batch / median(times["bf16"]), "bf16_over_fp32": ratio(times, "bf16", "fp32"),
            "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def bench_sample(name: str, rounds: int, iters: int, warmup: int) -> dict:
    torch.manual_seed(0)
    net = build_network(preset(name).model).to(memory_format=torch.channels_last)
    runs = {p: our_sampler(net, iters, True, torch.device("cpu"), p) for p in ("fp32", "bf16")}
    times = interleave(runs, rounds=rounds, warmup=warmup)
    return {"n": 64, "timed_iterations": iters,
            "fp32_sec_per_iteration": median(times["fp32"]) / iters,
            "bf16_sec_per_iteration": median(times["bf16"]) / iters, "bf16_over_fp32": ratio(times, "bf16", "fp32"),
            "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def save(result: dict, t0: float) -> None:
    result["seconds"] = time.perf_counter() - t0
    write_record(RESULTS / "bf16_cost.json", result)
    print(f"{result['seconds']:.0f}s: {', '.join(k for k in result if k.startswith(('train', 'sample')))}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="seed,fast")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sample-iters", type=int, default=2)
    ap.add_argument("--train-batch", type=int, help="batch of the training step (default: the preset's)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--only", choices=["train", "sample"], help="one section, merged into the existing JSON")
    a = ap.parse_args()
    cpu = torch.device("cpu")
    old = json.loads((RESULTS / "bf16_cost.json").read_text()) if a.only and (RESULTS / "bf16_cost.json").is_file() else {}
    result: dict = {**old, "machine": machine(cpu) | {"native_bf16": native_bf16(cpu)}}
    t0 = time.perf_counter()
    data = load_fashion_mnist()
    for name in a.presets.split(","):
        for what in ("sample", "train"):
            if a.only not in (None, what):
                continue
            res = (bench_sample(name, a.rounds, a.sample_iters, a.warmup) if what == "sample"
                   else bench_train(name, a.rounds, data, a.train_batch, a.warmup))
            result[f"{what}_{name}"] = {**res, "command": " ".join(["python", "bench/bf16_cost.py", *sys.argv[1:]]),
                                        "loadavg_end": os.getloadavg()}
            save(result, t0)  # each section as it comes: a slow machine still leaves figures
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "seconds"} if isinstance(v, dict) else v
                      for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
