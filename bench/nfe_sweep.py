"""Quality per network evaluation: FD-FMNIST against NFE for every sampler, one trained model.

    python bench/nfe_sweep.py RUN                                  # n=500, steps 10,20,50,100,200,T
    python bench/nfe_sweep.py bench/out/quality-runs/fast --steps 10,20,50,100,500
    python bench/nfe_sweep.py RUN --samplers ddpm,dpm++2m --steps 10,20,T

For each sampler of ``ddpm.samplers.SAMPLERS`` (ddpm ancestral respaced, ddim with eta=0,
dpm++2m, heun) at each step count <= T: n images with the same seed, x0 clipped, evaluated
with ``evaluate_images`` (FD-FMNIST against the test set, the real-data floor at the same n).
``--also ddpm:500`` adds single settings (say, the full-T ancestral reference alone) without
running every sampler at that step count.

Time to quality: the cheapest setting (fewest network evaluations) whose FD is within
``--tolerance`` (10%) of the ddpm sampler's FD at the most steps measured (the issue's target
is 200 ancestral steps: ``--also ddpm:200`` with smaller ``--steps``), timed drawing 64 images
in turns with two baselines: that ancestral reference on the same network (``speedup_same_network``,
the like-for-like figure) and the seed's own 200-step ``p_sample_loop`` on the seed's larger
U-Net (``speedup``; ../shared/bench/seed_reference.py). Ratios are medians of per-round ratios.

Resumable: each setting's result is kept in bench/out/nfe_sweep-cache.json (keyed by the
checkpoint, the sampler's grid, n and seed) and not recomputed. Writes RESULTS/NAME.json
and bench/out/NAME.png (``--name``, default nfe_sweep): FD against NFE, log-log, one line per
sampler, the floor dashed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import OUT, RESULTS, cpu_info, load_reference, write_record

from ddpm.pictures import plots
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.pictures.plots import COLOURS, Panel, Series, render
from ddpm.samplers import SAMPLERS, count_nfe
from ddpm.sampling import SampleConfig, generate, load_model
from ddpm.pictures.viz import save_png

CLIP = "clip"


def parse_steps(spec: str, T: int) -> list[int]:
    out = []
    for s in spec.split(","):
        s = s.strip()
        if s:
            v = T if s.upper() == "T" else int(s)
            if 1 <= v <= T and v not in out:
                out.append(v)
            elif v > T:
                print(f"dropping {v} steps: the model has T = {T}", flush=True)
    return sorted(out)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def sample_config(sampler: str, steps: int, n: int, batch: int, seed: int) -> SampleConfig:
    eta = 0.0 if sampler == "ddim" else None  # the other samplers refuse an eta they would ignore
    return SampleConfig(sampler=sampler, steps=steps, n=n, batch_size=batch, seed=seed, eta=eta, clip=CLIP)


def time_to_quality(model, best: dict, ref_row: dict, seed: int, rounds: int) -> dict:
    """Seconds to draw 64 images with ``best``, in turns with two baselines: ancestral sampling of
    the same network at ``ref_row``'s steps (like for like: the FD reference), and the seed's own
    200-step p_sample_loop on the seed's (larger) network."""
    ref = load_reference()
    torch.manual_seed(0)
    seed_net = ref.make_model().eval()
    sc = sample_config(best["sampler"], best["steps"], 64, 64, seed)
    sc_ref = sample_config("ddpm", ref_row["steps"], 64, 64, seed)
    contenders = {"ours": lambda: generate(model, sc), "ours_ddpm_reference": lambda: generate(model, sc_ref),
                  "seed": lambda: ref.p_sample_loop(seed_net, (64, 1, 28, 28))}
    contenders["ours"]()  # warm-up (the seed's loop is 200 calls long: its first calls warm it)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"  time-to-quality round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    per_round = lambda other: statistics.median(o / b for b, o in zip(times["ours"], times[other]))  # noqa: E731
    return {
        "setting": {k: best[k] for k in ("sampler", "steps", "nfe", "fd")},
        "images": 64,
        "ours_seconds": times["ours"], "ours_ddpm_reference_seconds": times["ours_ddpm_reference"],
        "seed_p_sample_loop_seconds": times["seed"],
        "ours_median_s": statistics.median(times["ours"]), "seed_median_s": statistics.median(times["seed"]),
        "ours_ddpm_reference_median_s": statistics.median(times["ours_ddpm_reference"]),
        "speedup": per_round("seed"),
        "speedup_same_network": per_round("ours_ddpm_reference"),
        "rounds": rounds,
        "seed_setting": f"seed_reference.p_sample_loop: 200 ancestral steps, {ref.timesteps} timesteps, 64 images, "
                        "the seed's network (not the one measured for FD)",
        "same_network_setting": f"ddpm, {ref_row['steps']} steps on the same network: the FD reference",
    }


def _y_label(v: float) -> str:
    return f"{v:g}" if v >= 1 else f"{v:.2g}"


def _x_label(v: float) -> str:  # x is drawn as log10(NFE): label the ticks with NFE itself
    return f"{10 ** v:,.0f}" if v >= 0 else f"{10 ** v:.2g}"


def figure_note(result: dict) -> str:
    note = (f"{result['preset']} preset, step {result['train_step']:,}, T={result['T']}; n={result['n']}, "
            f"seed {result['seed']}, x0 clipped, DDIM eta=0")
    ttq = result["time_to_quality"]
    if ttq:
        s, ref = ttq["setting"], ttq["reference"]
        note += (f"; {s['sampler']} {s['steps']} steps, within {ttq['tolerance']:.0%} of ddpm at {ref['steps']}: "
                 f"{ttq['speedup_same_network']:.1f}x faster than it on the same network")
    return note


def figure(rows: list[dict], floor: float, n: int, title: str, note: str, path: Path) -> Path:
    """FD against NFE, both on log scales. ddpm.pictures.plots draws a linear x axis, so x is passed as
    log10(NFE) and, while rendering, the helpers' tick formatters are swapped for ones that
    print NFE (x) and plain numbers (y); the floor is the panel's dashed line, and a
    near-invisible one-point series puts it in range and in the legend."""
    series = []
    for i, name in enumerate(SAMPLERS):
        pts = sorted((r["nfe"], r["fd"]) for r in rows if r["sampler"] == name)
        if pts:
            x = np.log10([p[0] for p in pts])
            series.append(Series(x, np.array([p[1] for p in pts]), f"{name}", COLOURS[i], 2.5))
    xs = np.concatenate([s.x for s in series])
    series.append(Series(np.array([xs.min()]), np.array([floor]), f"real-data floor at n={n} (dashed)",
                         plots.FRAME, 0.01))
    panel = Panel(title, "network evaluations per image (log scale)", f"FD-FMNIST, n={n} (log scale)", series,
                  log_y=True, hline=floor, note=note)
    saved = plots.fmt, plots.fmt_log
    plots.fmt, plots.fmt_log = _x_label, _y_label
    try:
        img = render([panel], columns=1, size=(1000, 680))
    finally:
        plots.fmt, plots.fmt_log = saved
    return save_png(img, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (or checkpoint) from ddpm train")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", default="10,20,50,100,200,T", help="comma-separated step counts; T = all")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--also", default="", help="extra single settings, e.g. ddpm:T,heun:100")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds of the time-to-quality pair")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see quality.py)")
    ap.add_argument("--out", type=Path, default=OUT, help="the cache and the plot (default bench/out)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of NAME.json (default bench/out/results/quality)")
    ap.add_argument("--name", default="nfe_sweep", help="the JSON's and the plot's name (default nfe_sweep)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    model = load_model(a.run, device="cpu")
    T = model.schedule.T
    samplers = [s for s in a.samplers.split(",") if s]
    for s in samplers:
        if s not in SAMPLERS:
            sys.exit(f"unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
    settings = [(s, k) for s in samplers for k in parse_steps(a.steps, T)]
    for item in filter(None, a.also.split(",")):
        s, k = item.split(":")
        settings += [(s, k2) for k2 in parse_steps(k, T) if (s, k2) not in settings]
    ab = model.schedule.alpha_bar
    settings.sort(key=lambda sk: (count_nfe(sk[0], ab, sk[1]), list(SAMPLERS).index(sk[0])))

    a.out.mkdir(parents=True, exist_ok=True)
    cache_path = a.out / "nfe_sweep-cache.json"
    cache = _read_json(cache_path)
    rows, floor = [], None
    for sampler, steps in settings:
        spacing = SAMPLERS[sampler].default_spacing  # a default that changes must not reuse the old grid's FD
        key = f"{Path(model.source).resolve()}|{sampler}|{steps}|{spacing}|{CLIP}|n{a.n}|seed{a.seed}"
        r = cache.get(key)
        if r is None:
            nfe = count_nfe(sampler, ab, steps)
            print(f"{sampler} {steps} steps ({nfe} NFE), {a.n} images ...", flush=True)
            t0 = time.perf_counter()
            s = generate(model, sample_config(sampler, steps, a.n, a.batch_size, a.seed))
            dt = time.perf_counter() - t0
            rep = evaluate_images(s.images)
            r = {"sampler": sampler, "steps": steps, "spacing": spacing, "nfe": s.nfe, "fd": rep.fd,
                 "fd_floor": rep.fd_reference,
                 "kid_mean": rep.kid_mean, "kid_std": rep.kid_std, "precision": rep.precision,
                 "recall": rep.recall, "mean_confidence": rep.mean_confidence,
                 "class_entropy_bits": rep.class_entropy_bits, "sample_seconds": round(dt, 1),
                 "loadavg": round(os.getloadavg()[0], 2)}
            cache[key] = r
            _write_json(cache_path, cache)
            print(f"  FD {rep.fd:.2f} (floor {rep.fd_reference:.2f}), {dt:.0f} s", flush=True)
        rows.append(r)
        floor = r["fd_floor"]

    ddpm_rows = [r for r in rows if r["sampler"] == "ddpm"]
    ttq = None
    if ddpm_rows:
        ref_row = max(ddpm_rows, key=lambda r: r["steps"])
        limit = ref_row["fd"] * (1 + a.tolerance)
        ok = sorted((r for r in rows if r["fd"] <= limit), key=lambda r: (r["nfe"], r["fd"]))
        best = ok[0]
        print(f"time to quality: {best['sampler']} {best['steps']} steps ({best['nfe']} NFE, FD {best['fd']:.2f}) "
              f"is the cheapest within {a.tolerance:.0%} of ddpm at {ref_row['steps']} steps (FD {ref_row['fd']:.2f})",
              flush=True)
        ttq = time_to_quality(model, best, ref_row, a.seed, a.rounds)
        ttq.update({"reference": {"sampler": "ddpm", "steps": ref_row["steps"], "fd": ref_row["fd"],
                                  "is_full_T": ref_row["steps"] == T},
                    "fd_limit": limit, "tolerance": a.tolerance})

    table = ["| sampler | steps | NFE | FD-FMNIST | KID x1e3 | precision | recall | seconds for n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(SAMPLERS).index(r["sampler"]), r["steps"])):
        table.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fd']:.2f} | {r['kid_mean'] * 1e3:.2f} ± "
                     f"{r['kid_std'] * 1e3:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['sample_seconds']:.0f} |")
    result = {
        "command": "python " + " ".join(sys.argv),
        "run": str(a.run), "checkpoint": str(model.source), "train_step": model.step, "T": T,
        "preset": model.config.preset, "schedule": model.config.diffusion.schedule,
        "objective": model.config.diffusion.objective,
        "n": a.n, "seed": a.seed, "clip": CLIP, "ddim_eta": 0.0, "fd_floor": floor,
        "machine": {"torch": torch.__version__, "threads": a.threads, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "wall_s_this_invocation": round(time.perf_counter() - t_start, 1), **cpu_info()},
        "results": rows,
        "time_to_quality": ttq,
    }
    a.results.mkdir(parents=True, exist_ok=True)
    write_record(a.results / f"{a.name}.json", result)
    png = figure(rows, floor, a.n, "Sample quality against network evaluations", figure_note(result),
                 a.out / f"{a.name}.png")
    print("\n".join(table))
    if ttq:
        print(f"time to quality: ours {ttq['ours_median_s']:.2f} s for 64 images; against ddpm "
              f"{ttq['reference']['steps']} steps on the same network {ttq['speedup_same_network']:.1f}x, "
              f"against the seed's 200-step loop on its network {ttq['speedup']:.1f}x")
    print(f"wrote {a.results / (a.name + '.json')} and {png}")


if __name__ == "__main__":
    main()
