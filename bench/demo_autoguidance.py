"""The demo's run with and without autoguidance: train ``ddpm demo``'s preset for its budget, then
FD-FMNIST (and, conditional, class agreement) per (classifier-free w, autoguidance w).

    python bench/demo_autoguidance.py --minutes 5 --threads 2 --settings 0:0 0:1 0:1.5 0:2 --name demo_uncond_ag
    python bench/demo_autoguidance.py --cond --minutes 5 --threads 2 --settings 2:0 2:1 2:1.5 1:1.5 --name demo_cond_ag

Training is ``ddpm.demo.run_demo`` itself (the preset keeps its guide at 20% of the budget), so
the steps are the demo's. Every setting draws the same n images (same seeds) with the demo's
sampler (DPM-Solver++(2M), 20 steps; ``--spacings`` scores each on several grids); conditional
runs draw every class, n / 10 each. Writes RESULTS/NAME.json and keeps the run in bench/out/NAME (``--reuse [RUN]`` scores it, or
bench/out/RUN, again).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch
from harness import OUT, RESULTS, cpu_info, write_record

from ddpm.config import SampleConfig
from ddpm.demo import run_demo
from ddpm.evaluation.control import guidance_sweep
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.sampling.generate import generate, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cond", action="store_true", help="the default demo (fast-cond); else --uncond's (fast)")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--settings", nargs="+", required=True, help="CFG_W:AUTOGUIDANCE_W, e.g. 2:1.5")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", nargs="?", const="", metavar="RUN",
                    help="score bench/out/RUN (default NAME) again, no training")
    ap.add_argument("--spacings", nargs="+", default=[None], metavar="SPACING",
                    help="score every setting on each of these grids (default: the sampler's own)")
    ap.add_argument("--name", required=True, help="RESULTS/NAME.json, run in bench/out/NAME")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = OUT / (a.reuse or a.name)
    train_s = None
    if a.reuse is None:
        if run.exists():
            sys.exit(f"{run} exists: pass --reuse to score it, or remove it")
        t0 = time.perf_counter()
        run_demo(minutes=a.minutes, out=str(run), cond=a.cond)
        train_s = round(time.perf_counter() - t0, 1)
    if not run.is_dir():
        sys.exit(f"no run at {run}: train one first (leave out --reuse)")
    model = load_model(run)
    base = SampleConfig(sampler="dpm++2m", steps=20, n=a.n, batch_size=250, seed=a.seed, clip="clip",
                        classes="all" if a.cond else None)
    rows = []
    for spec, spacing in [(spec, g) for g in a.spacings for spec in a.settings]:
        cfg_w, ag_w = (float(v) for v in spec.split(":"))
        sc = replace(base, autoguidance=ag_w, spacing=spacing)
        t0 = time.perf_counter()
        if a.cond:
            r = guidance_sweep(model, sc, [cfg_w], seed=a.seed)
            res = r.results[0]
            rep, agreement, nfe = res.report, res.agreement, r.nfe
        else:
            if cfg_w:
                sys.exit("classifier-free guidance needs --cond")
            s = generate(model, sc)
            rep, agreement, nfe = evaluate_images(s.images, seed=a.seed), None, s.nfe
        row = {"guidance": cfg_w, "autoguidance": ag_w, "spacing": spacing or "default", "nfe": nfe,
               "fd_fmnist": round(rep.fd, 3),
               "fd_floor": round(rep.fd_reference, 3), "kid": round(rep.kid_mean, 4),
               "precision": round(rep.precision, 3), "recall": round(rep.recall, 3),
               "class_agreement": None if agreement is None else round(agreement, 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    cfg = model.config
    out = RESULTS / f"{a.name}.json"
    write_record(out, {
        "command": "python " + " ".join(sys.argv), "preset": cfg.preset, "run": str(run),
        "train_minutes": cfg.train.minutes, "demo_seconds_with_its_grid": train_s, "train_step": model.step,
        "batch_size": cfg.train.batch_size, "images_seen": model.step * cfg.train.batch_size,
        "guide_step": json.loads((run / "guide" / "meta.json").read_text()).get("step"),
        "sampler": "dpm++2m", "steps": 20, "n": a.n, "seed": a.seed,
        "machine": {"threads": a.threads, **cpu_info()}, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
