"""Autoguidance settings on one trained run: FD-FMNIST per (sampler, steps, w, guiding model).

    python bench/autoguidance_sweep.py RUN dpm++2m:20:0 dpm++2m:20:1 dpm++2m:20:1.5 --name NAME
    python bench/autoguidance_sweep.py RUN dpm++2m:20:1:RUN/checkpoints/step-00000200 ...   # another guide

Each setting is SAMPLER:STEPS:W[@LO,HI][:GUIDE] (GUIDE: a run or checkpoint folder; default the
run's own RUN/guide; @LO,HI autoguides only at noise levels sigma in [LO, HI]). ``--cfg W`` draws a
class-conditional run's every class (n / classes each) with classifier-free guidance w as well,
and adds the class agreement. All draw the same n images (same seeds) and are scored with ``evaluate_images``
against the Fashion-MNIST test set, floor at the same n. Writes RESULTS/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch
from harness import RESULTS, cpu_info, write_record

from ddpm.config import SampleConfig
from ddpm.evaluation.control import guidance_sweep
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.sampling.generate import generate, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("settings", nargs="+", help="SAMPLER:STEPS:W[@LO,HI][:GUIDE]")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", required=True, help="RESULTS/NAME.json")
    ap.add_argument("--raw", action="store_true", help="the run's raw weights, not its EMA (the guide keeps its EMA)")
    ap.add_argument("--cfg", type=float, default=None, metavar="W",
                    help="class-conditional runs: every class, classifier-free guidance w (0: labels only)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.run, use_ema=not a.raw)
    rows = []
    for spec in a.settings:
        sampler, steps, w, *guide = spec.split(":", 3)
        w, _, iv = w.partition("@")
        interval = tuple(float(v) for v in iv.split(",")) if iv else None
        sc = SampleConfig(sampler=sampler, steps=int(steps), n=a.n, batch_size=250, seed=a.seed, clip="clip",
                          autoguidance=float(w), guiding_model=guide[0] if guide and float(w) else None,
                          autoguidance_interval=interval)
        t0 = time.perf_counter()
        agreement = None
        if a.cfg is None:
            s = generate(model, sc)
            rep, nfe = evaluate_images(s.images, seed=a.seed), s.nfe
        else:
            res = guidance_sweep(model, replace(sc, classes="all"), [a.cfg], seed=a.seed)
            rep, agreement, nfe = res.results[0].report, res.results[0].agreement, res.nfe
        dt = time.perf_counter() - t0
        row = {"setting": spec, "sampler": sampler, "steps": int(steps), "autoguidance": float(w),
               "autoguidance_interval": interval,
               "guiding_model": (guide[0] if guide else "RUN/guide") if float(w) else None, "nfe": nfe,
               "guidance": a.cfg, "class_agreement": None if agreement is None else round(agreement, 4),
               "fd_fmnist": round(rep.fd, 3), "fd_floor": round(rep.fd_reference, 3), "kid": round(rep.kid_mean, 4),
               "precision": round(rep.precision, 3), "recall": round(rep.recall, 3),
               ("sample_seconds" if a.cfg is None else "seconds_with_scoring"): round(dt, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = RESULTS / f"{a.name}.json"
    write_record(out, {"command": "python " + " ".join(sys.argv), "run": a.run, "train_step": model.step,
                               "weights": "raw" if a.raw else "ema",
                               "n": a.n, "seed": a.seed, "machine": {"threads": a.threads, **cpu_info()},
                               "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
