"""The DiT against the U-Net at equal parameters and equal CPU-minutes: FD-FMNIST and images/s.

    python bench/dit_vs_unet.py                  # after bench/processes.py has trained and swept fast

Contenders: ``fast`` (the U-Net, 789k parameters) and ``dit`` (the DiT preset, 725k), the same
diffusion (vp, cosine, v, min-SNR) and training settings, from bench/processes.py's run folders
(bench/out/processes/NAME). Equal CPU-minutes: the checkpoints ``--fast-step`` (5,000) of ``fast``
and ``--dit-step`` (10,000) of ``dit``, about the ratio of their step rates apart (measured here, in
turns on one thread, bf16 as both trained: the script reports it, so the match can be checked). FD-FMNIST (n = 1,000, seed 0, x0 clipped) at 8, 16
and 32 network evaluations with the sampler that was best for ``fast`` (RESULTS/processes.json),
and sampling images/s of 64 images at 16 evaluations, the two networks in turns.

Writes RESULTS/dit_vs_unet.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from harness import cpu_info, results_dir, stamp, write_record
from processes import RUNS, _read, fd_of, run_jobs, steps_for


def step_rate_ratio(rounds: int, block: int) -> dict:
    """DiT steps/s over the U-Net's, one thread, bf16, the two Trainers in turns."""
    import torch
    torch.set_num_threads(1)
    from ddpm.config import override, preset
    from ddpm.training.train import Trainer

    data = torch.randint(0, 256, (2048, 1, 28, 28), dtype=torch.uint8)
    tr = {}
    for name in ("fast", "dit"):
        cfg = preset(name)
        cfg = replace(cfg, train=override(cfg.train, precision="bf16", max_steps=10**6, minutes=None, epochs=None))
        tr[name] = Trainer(cfg, Path(tempfile.mkdtemp()), data, torch.device("cpu"))
        for _ in range(3):
            tr[name].train_step()
    times = {n: [] for n in tr}
    for r in range(rounds):
        for n in (("fast", "dit") if r % 2 == 0 else ("dit", "fast")):
            t0 = time.perf_counter()
            for _ in range(block):
                tr[n].train_step()
            times[n].append(time.perf_counter() - t0)
    ratios = [f / d for f, d in zip(times["fast"], times["dit"])]  # dit steps/s over fast's
    return {"dit_over_fast_steps_per_s": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
            "fast_steps_per_s": round(block / statistics.median(times["fast"]), 2),
            "dit_steps_per_s": round(block / statistics.median(times["dit"]), 2)}


def sampling_rate(sampler: str, steps: int, rounds: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from ddpm.sampling import SampleConfig, generate, load_model

    models = {n: load_model(RUNS / p, device="cpu") for n, p in CKPT.items()}
    sc = SampleConfig(sampler=sampler, steps=steps, n=64, batch_size=64, seed=0, clip="clip",
                      eta=0.0 if sampler == "ddim" else None)
    for m in models.values():
        generate(m, sc)
    times = {n: [] for n in models}
    for r in range(rounds):
        for n in (("fast", "dit") if r % 2 == 0 else ("dit", "fast")):
            t0 = time.perf_counter()
            generate(models[n], sc)
            times[n].append(time.perf_counter() - t0)
    ratios = [f / d for f, d in zip(times["fast"], times["dit"])]
    return {"dit_over_fast_images_per_s": round(statistics.median(ratios), 3),
            "fast_images_per_s": round(64 / statistics.median(times["fast"]), 1),
            "dit_images_per_s": round(64 / statistics.median(times["dit"]), 1)}


CKPT: dict[str, str] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--fast-step", type=int, default=5000)
    ap.add_argument("--dit-step", type=int, default=10000)
    a = ap.parse_args()
    CKPT.update(fast=f"fast/checkpoints/step-{a.fast_step:08d}", dit=f"dit/checkpoints/step-{a.dit_step:08d}")
    from ddpm.config import preset
    from ddpm.core.processes import make_process
    from ddpm.nn import build_network

    params = {n: sum(p.numel() for p in build_network(preset(n).model).parameters()) for n in ("fast", "dit")}
    marks = {n: _read(RUNS / n / "bench-train.json") for n in ("fast", "dit")}
    prev = _read(results_dir() / "processes.json")
    sampler = prev["best"]["vp"]["sampler"] if prev else "dpm++2m"
    proc = make_process(preset("fast"))
    jobs = [(CKPT[n], sampler, steps_for(sampler, proc, b, False), a.n, 0.0, False) for b in (8, 16, 32)
            for n in ("fast", "dit")]
    fds = run_jobs(jobs)
    rate = step_rate_ratio(a.rounds, 10)
    samp = sampling_rate(sampler, steps_for(sampler, proc, 16, False), a.rounds)
    rec = {"parameters": params, "train": marks, "checkpoints": dict(CKPT), "step_rate": rate, "sampling": samp, "sampler": sampler,
           "fd": [{k: r[k] for k in ("run", "sampler", "steps", "nfe", "n", "fd")} for r in fds], "cpu": cpu_info()}
    out = results_dir() / "dit_vs_unet.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_record(out, stamp(rec))
    print(json.dumps({k: rec[k] for k in ("parameters", "step_rate", "sampling")}, indent=2))
    for r in fds:
        print(f"{r['run']}: {r['sampler']} {r['nfe']} NFE: FD {r['fd']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
