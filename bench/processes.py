"""DDPM, EDM and rectified flow side by side: the ``fast`` recipe's network trained under each
process for the same compute, one thread each, then FD-FMNIST against network evaluations
for every sampler that applies, each at its best settings.

    python bench/processes.py                      # train (if not yet), sweep, confirm, plot
    python bench/processes.py --cond               # the class-conditional variants, at their best guidance
    python bench/processes.py --steps 6000 --n 1000 --confirm-n 10000

Contenders: ``fast`` (vp: DDPM's discrete chain, cosine, v, min-SNR), ``edm`` and ``rf``
(``--cond``: ``fast-cond``, ``edm-cond``, ``rf-cond``), identical networks, batch, optimiser,
EMA and seed; only the process, objective, noise-level sampling and weighting differ, each as its
paper has it (``ddpm.config.PRESETS``). Equal compute is equal optimiser steps (``--steps``;
the same network and batch make a step cost the same under every process, and a step budget is
immune to load from other processes, which a wall-clock one is not); each run's steps/s is
recorded beside it. bf16 autocast for training (what ``--precision auto`` picks for this step
on an AVX-512 bf16 CPU), fp32 for sampling.

Sweep: every sampler defined on the process (vp: ddpm, ddim, dpm++2m, heun; edm and rf: ddim,
dpm++2m, heun) at the largest step count whose network evaluations per image (with guidance:
both passes) are at most each of ``--nfe`` (1, 2, 4, 8, 16, 32, 64); n images (seed 0, x0 clipped),
FD-FMNIST against the test set with ``evaluate_images``. Conditional runs: labels drawn in the
training set's proportions, guidance w picked first from ``--guidances`` at 8 steps with
each process's best unconditional sampler, then swept. The best setting of each process is
confirmed at ``--confirm-n``: the best within ``--confirm-max-nfe`` (16) evaluations of the
``--confirm-top`` (2) leading processes.

Resumable: each setting's result is kept in its run folder (bench/out/processes/NAME). Writes
RESULTS/processes[-cond].json and .png (FD against NFE, one line per process and sampler).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import OUT, cpu_info, results_dir, stamp, write_record

NFE = (1, 2, 4, 8, 16, 32, 64)
UNCOND = {"vp": "fast", "edm": "edm", "rectified-flow": "rf"}
COND = {"vp": "fast-cond", "edm": "edm-cond", "rectified-flow": "rf-cond"}
RUNS = OUT / "processes"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- training (one process per run)

def train_one(name: str, steps: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from ddpm.config import override, preset
    from ddpm.training.train import train

    run = RUNS / name
    mark = _read(run / "bench-train.json")
    if mark is not None and mark["steps"] == steps:
        return mark
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, train=override(cfg.train, max_steps=steps, minutes=None, epochs=None,
                                                  precision="bf16", sample_every=0, checkpoint_every=1000))
    t0 = time.perf_counter()
    res = train(cfg, run, device="cpu", progress=False, tensorboard=False, resume=run.exists())
    wall = time.perf_counter() - t0
    mark = {"preset": name, "steps": res.step, "batch_size": cfg.train.batch_size, "threads": 1,
            "precision": "bf16", "wall_s": round(wall, 1), "steps_per_s": round(res.step / wall, 3),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    _write(run / "bench-train.json", mark)
    return mark


def train_all(names: list[str], steps: int) -> dict[str, dict]:
    """Two runs at a time (two cores), each in its own process on one thread."""
    def run(name: str) -> dict:
        subprocess.run([sys.executable, __file__, "--train-one", name, "--steps", str(steps)], check=True)
        return _read(RUNS / name / "bench-train.json")
    with cf.ThreadPoolExecutor(2) as ex:
        return dict(zip(names, ex.map(run, names)))


# ---------------------------------------------------------------- sampling and FD

def steps_for(sampler: str, process, nfe: int, guided: bool) -> int | None:
    """The most steps whose evaluations per image are at most ``nfe`` (None: not even one step fits)."""
    from ddpm.samplers import count_nfe
    per = 2 if guided else 1
    best = None
    for s in range(1, nfe + 1):
        if count_nfe(sampler, process, s) * per <= nfe:
            best = s
    return best


def fd_of(name: str, sampler: str, steps: int, n: int, guidance: float, cond: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    from ddpm.evaluation.evaluate import evaluate_images
    from ddpm.sampling import SampleConfig, generate, load_model

    run = RUNS / name
    key = run / f"bench-fd-{sampler}-{steps}-n{n}-w{guidance:g}.json"
    if "/" in name:  # a checkpoint folder of a run: its cache beside the runs, not among its files
        key = RUNS / "fd-cache" / f"{name.replace('/', '_')}-{sampler}-{steps}-n{n}-w{guidance:g}.json"
        key.parent.mkdir(exist_ok=True)
    hit = _read(key)
    if hit is not None:
        return hit
    model = load_model(run, device="cpu")
    eta = 0.0 if sampler == "ddim" else None
    sc = SampleConfig(sampler=sampler, steps=steps, n=n, batch_size=250, seed=0, eta=eta, clip="clip",
                      guidance=guidance if cond else 0.0)
    t0 = time.perf_counter()
    s = generate(model, sc)
    dt = time.perf_counter() - t0
    rep = evaluate_images(s.images)
    out = {"run": name, "sampler": sampler, "steps": steps, "nfe": s.nfe, "n": n, "guidance": guidance,
           "fd": rep.fd, "floor": rep.fd_reference, "sample_s": round(dt, 1),
           "train_step": model.step}
    _write(key, out)
    print(f"[{name}] {sampler} {steps} steps ({s.nfe} NFE) w={guidance:g} n={n}: FD {rep.fd:.2f}", flush=True)
    return out


def _fd_job(args: tuple) -> dict:
    return fd_of(*args)


def run_jobs(jobs: list[tuple]) -> list[dict]:
    """Two settings at a time, each in its own process on one thread."""
    with cf.ProcessPoolExecutor(2) as ex:
        return list(ex.map(_fd_job, jobs))


def samplers_for(process_name: str) -> list[str]:
    from ddpm.samplers import SAMPLERS
    return [n for n, s in SAMPLERS.items() if n != "consistency" and (s.processes is None or process_name in s.processes)]


def sweep(table: dict[str, str], n: int, cond: bool, guidances: list[float], best_uncond: dict | None,
          budgets: tuple[int, ...] = NFE) -> dict:
    from ddpm.config import preset
    from ddpm.core.processes import make_process

    rows: dict[str, dict] = {}
    chosen_w: dict[str, float] = {}
    if cond:  # guidance first, at 16 evaluations with the process's best unconditional sampler
        jobs = []
        for pname, name in table.items():
            sampler = (best_uncond or {}).get(pname, {}).get("sampler", "heun" if pname != "vp" else "dpm++2m")
            st = steps_for(sampler, make_process(preset(name)), 16, True)
            jobs += [(name, sampler, st, n, w, True) for w in guidances]
        res = run_jobs(jobs)
        for pname, name in table.items():
            mine = [r for r in res if r["run"] == name]
            chosen_w[pname] = min(mine, key=lambda r: r["fd"])["guidance"]
    jobs = []
    for pname, name in table.items():
        proc = make_process(preset(name))
        w = chosen_w.get(pname, 0.0)
        # conditional runs: the process's best unconditional sampler only, 4 to 32 evaluations
        samplers = [best_uncond[pname]["sampler"]] if cond and best_uncond else samplers_for(pname)
        for sampler in samplers:
            for budget in budgets:
                st = steps_for(sampler, proc, budget, cond and w > 0)
                if st is not None:
                    jobs.append((name, sampler, st, n, w, cond))
    jobs = list(dict.fromkeys(jobs))  # a step count that fits two budgets is run once
    for r in run_jobs(jobs):
        pname = next(p for p, nm in table.items() if nm == r["run"])
        rows.setdefault(pname, {}).setdefault(r["sampler"], []).append(r)
    return {"rows": rows, "guidance": chosen_w}


def plot(result: dict, path: Path, n: int) -> None:
    """One panel per process: FD against NFE (log-log, drawn as nfe_sweep draws it), one line per sampler."""
    import numpy as np
    from nfe_sweep import _x_label, _y_label

    from ddpm.pictures import plots
    from ddpm.pictures.plots import COLOURS, Panel, Series, render
    from ddpm.pictures.viz import save_png
    from ddpm.samplers import SAMPLERS

    panels = []
    for pname, by_sampler in result["rows"].items():
        series = []
        for i, sampler in enumerate(SAMPLERS):
            pts = sorted((r["nfe"], r["fd"]) for r in by_sampler.get(sampler, []))
            if pts:
                series.append(Series(np.log10([p[0] for p in pts]), np.array([p[1] for p in pts]), sampler,
                                     COLOURS[i], 2.5))
        w = result.get("guidance", {}).get(pname)
        title = pname + ("" if w is None else f", guidance {w:g}")
        panels.append(Panel(title, "network evaluations per image (log scale)", f"FD-FMNIST, n={n} (log)", series,
                            log_y=True))
    saved = plots.fmt, plots.fmt_log
    plots.fmt, plots.fmt_log = _x_label, _y_label
    try:
        img = render(panels, columns=len(panels), size=(520 * len(panels), 560))
    finally:
        plots.fmt, plots.fmt_log = saved
    save_png(img, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cond", action="store_true", help="the class-conditional variants")
    ap.add_argument("--steps", type=int, default=6000, help="optimiser steps per run (equal compute)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--confirm-n", type=int, default=10000)
    ap.add_argument("--guidances", default="0,1,2")
    ap.add_argument("--nfe", default=",".join(map(str, NFE)), help="the evaluation budgets swept")
    ap.add_argument("--confirm-max-nfe", type=int, default=16,
                    help="confirm each process's best setting within this many evaluations")
    ap.add_argument("--confirm-top", type=int, default=2, help="confirm the best settings of this many processes")
    ap.add_argument("--train-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--no-confirm", action="store_true")
    a = ap.parse_args()
    if a.train_one:
        train_one(a.train_one, a.steps)
        return
    table = COND if a.cond else UNCOND
    RUNS.mkdir(parents=True, exist_ok=True)
    marks = train_all(list(table.values()), a.steps)
    if a.train_only:
        print(json.dumps(marks, indent=2))
        return
    best_uncond = None
    if a.cond:
        prev = _read(results_dir() / "processes.json")
        best_uncond = None if prev is None else prev.get("best")
    budgets = tuple(int(b) for b in a.nfe.split(","))
    res = sweep(table, a.n, a.cond, [float(w) for w in a.guidances.split(",")], best_uncond, budgets)
    best, best_within = {}, {}
    for pname, by_sampler in res["rows"].items():
        allpts = [r for pts in by_sampler.values() for r in pts]
        for into, pts in ((best, allpts), (best_within, [r for r in allpts if r["nfe"] <= a.confirm_max_nfe])):
            b = min(pts, key=lambda r: r["fd"])
            into[pname] = {"sampler": b["sampler"], "steps": b["steps"], "nfe": b["nfe"], "fd": b["fd"],
                           "guidance": b["guidance"]}
    if not a.no_confirm:
        best = best_within  # the confirmed settings: the best within --confirm-max-nfe
        top = sorted(best, key=lambda p: best[p]["fd"])[: a.confirm_top]  # the leading processes
        jobs = [(table[p], best[p]["sampler"], best[p]["steps"], a.confirm_n, best[p]["guidance"], a.cond)
                for p in top]
        for p, r in zip(top, run_jobs(jobs)):
            best[p][f"fd_n{a.confirm_n}"] = r["fd"]
    name = "processes-cond" if a.cond else "processes"
    out = results_dir() / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"train": marks, "n": a.n, "nfe_budgets": list(budgets), **res, "best": best,
              "best_overall": {p: min((r for pts in by.values() for r in pts), key=lambda r: r["fd"])
                               for p, by in res["rows"].items()},
              "confirm_max_nfe": None if a.no_confirm else a.confirm_max_nfe,
              "confirm_top": None if a.no_confirm else a.confirm_top, "cpu": cpu_info()}
    write_record(out, stamp(record))
    plot(res, out.with_suffix(".png"), a.n)
    print(json.dumps(best, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
