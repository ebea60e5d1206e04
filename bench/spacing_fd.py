"""FD-FMNIST of one trained model on each timestep spacing, sampler by sampler, the same images.

Each row is one ``ddpm eval RUN --sampler S --steps N --spacing G --n N`` run in this process,
so the rows share the model, the reference statistics and the seed (the same starting noise on
every grid). This is what chose the deterministic samplers' default spacing
(``ddpm.samplers.SAMPLERS``; the history page, "Sampler spacing on trained models").

    python bench/spacing_fd.py fashion-mnist --rows ddim:50 dpm++2m:10 --class all --guidance 0 \\
        --name spacing_shipped
    python bench/spacing_fd.py bench/out/q20avx512c/quality-runs/fast --rows dpm++2m:20 ddim:50 \\
        --name spacing_fast20_seed2

Writes RESULTS/NAME.json after every row (eval reports under bench/out/NAME/).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import OUT, RESULTS, cpu_info, write_record  # noqa: E402

from ddpm.cli import main as ddpm_main  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a trained run folder or a packaged model name (not modified)")
    p.add_argument("--rows", nargs="+", required=True, metavar="SAMPLER:STEPS")
    p.add_argument("--spacings", nargs="+", default=["quadratic", "uniform"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="classes", help="passed to ddpm eval (conditional models)")
    p.add_argument("--guidance", help="passed to ddpm eval with --class")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--name", required=True, help="RESULTS/NAME.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    extra = (["--class", a.classes] if a.classes else []) + (["--guidance", a.guidance] if a.guidance else [])
    path = RESULTS / f"{a.name}.json"
    doc = {"what": f"FD-FMNIST of {a.run} per sampler, steps and timestep spacing, the same seed and "
                   f"images on every grid, n = {a.n}, fp32",
           "command": "python " + " ".join(sys.argv), "machine": {"threads": a.threads, **cpu_info()},
           "torch": torch.__version__, "rows": []}
    for row in a.rows:
        sampler, steps = row.rsplit(":", 1)
        for spacing in a.spacings:
            out = OUT / a.name / f"{sampler}-{steps}-{spacing}"
            for old in out.glob("eval-*.json"):
                old.unlink()
            argv = ["eval", a.run, "--sampler", sampler, "--steps", steps, "--spacing", spacing, "--n", str(a.n),
                    "--seed", str(a.seed), *extra, "--no-progress", "--out", str(out)]
            t0 = time.perf_counter()
            if ddpm_main(argv) != 0:
                sys.exit(f"ddpm {' '.join(argv)} failed")
            rep = json.loads(next(out.glob("eval-*.json")).read_text())
            res = rep["results"][0]["report"] if "results" in rep else rep  # a --class sweep, or a plain eval
            r = {"sampler": sampler, "steps": int(steps), "spacing": spacing, "fd": round(res["fd"], 3),
                 "fd_floor": round(res["fd_reference"], 3), "precision": res.get("precision"),
                 "recall": res.get("recall"), "seconds": round(time.perf_counter() - t0, 1),
                 "command": "ddpm " + " ".join(argv)}
            if "results" in rep:
                r["agreement"] = rep["results"][0].get("agreement")
            doc["rows"].append(r)
            write_record(path, doc, indent=1)
            print(json.dumps({k: r[k] for k in ("sampler", "steps", "spacing", "fd", "seconds")}), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
