"""Quality per compute: the same wall-clock training budget, three contenders, one sampler.

    python bench/quality.py --minutes 20 --n 1000      # the issue's budget: ~1 h of training on a CPU
    python bench/quality.py --minutes 5 --n 1000       # a quick look
    python bench/quality.py --only fast --fresh        # retrain one contender
    python bench/quality.py --only fast --train-only & python bench/quality.py --only seed-recipe --train-only
    python bench/quality.py --only ''                  # then evaluate everything trained (side by side: 1 core each)
    python bench/quality.py --only '' --autoguidance 1 --name quality_ag   # runs with RUN/guide: autoguided

Contenders, trained one after the other on the same machine for ``--minutes`` each:
  seed-recipe     our code, ``--preset seed`` (the seed's recipe: T=200 linear, huber, eps,
                  Adam 1e-3, batch 128), sampled from its EMA weights
  fast            our code, ``--preset fast`` (the CPU preset: smaller U-Net, cosine T=500,
                  v-objective, batch 32, cosine lr, bf16 where native), sampled from its EMA weights
  seed-reference  the seed's own code, ``seed_reference.py train --minutes M`` as a child
                  process (no EMA: its raw weights), loaded into our UNet by position

All three are sampled with the same sampler (DPM-Solver++(2M), 20 steps, x0 clipped, by
default) and seed, evaluated with ``evaluate_images`` against the Fashion-MNIST test set, and
compared with the real-data floor at the same n. The wall clock is shared with whatever else
runs on the machine, so every contender's training steps reached (and images seen) are
recorded next to its budget, with the load average before and after. One torch thread by
default (``--threads``), for ours and the seed's child alike: on this 2-core machine, with one
core taken by another process, a 2-thread forward of the fast U-Net ran 10x slower than a
1-thread one (28 against 265 images/s, OpenMP threads waiting on each other).

Resumable per contender: a run folder under ``bench/out/quality-runs/NAME`` that holds a
checkpoint (or ``seed_model.pt``) is not retrained, and an evaluation already made with the
same sampler, steps, n and seed is read back from that folder.

Writes RESULTS/quality.json and bench/out/quality-NAME.png (the first 64 samples).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from ablate import VARIANTS, with_changes
from harness import OUT, REFERENCE, RESULTS, choose, cpu_info, read_json, write_record

from ddpm.checkpoint import GUIDE, resolve_checkpoint
from ddpm.config import RunConfig, override, preset
from ddpm.errors import DdpmError
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.nn import build_network
from ddpm.sampling import LoadedModel, SampleConfig, generate, load_model, make_schedule
from ddpm.training.train import train
from ddpm.pictures.viz import save_grid

CONTENDERS = {
    "seed-recipe": "our code, --preset seed (the seed's recipe), EMA weights",
    "fast": "our code, --preset fast (the CPU preset), EMA weights",
    "seed-reference": "the seed's own code (seed_reference.py train), raw weights (it keeps no EMA)",
    "fast-cond": "our code, --preset fast-cond (the CPU preset, class-conditional), EMA weights, sampled "
                 "unguided (null class); bench/control.py sweeps its guidance",
}
PRESET_OF = {"seed-recipe": "seed", "fast": "fast", "fast-cond": "fast-cond"}
TRAIN_MARK = "bench-train.json"
FMNIST_TRAIN = 60_000


def budget_config(name: str, minutes: float, variant: str | None = None) -> RunConfig:
    """The contender's preset at a wall-clock budget; ``variant`` (a name in bench/ablate.py's VARIANTS)
    changes the CPU presets (fast, fast-cond) the way the ablations do."""
    cfg = preset(PRESET_OF[name])
    if variant and name.startswith("fast"):
        cfg = with_changes(cfg, VARIANTS[variant])
    return dataclasses.replace(cfg, train=override(cfg.train, minutes=minutes, epochs=None, max_steps=None,
                                                   sample_every=0))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _has_weights(name: str, run: Path) -> bool:
    if name == "seed-reference":
        return (run / "seed_model.pt").is_file()
    try:
        resolve_checkpoint(run)
        return True
    except DdpmError:
        return False


def train_contender(name: str, run: Path, minutes: float, threads: int, variant: str | None = None) -> dict:
    """Train one contender for ``minutes`` unless its folder already holds weights; the record."""
    mark = read_json(run / TRAIN_MARK)
    if _has_weights(name, run):
        if mark is None:
            print(f"[{name}] {run} holds weights but no {TRAIN_MARK}: training was interrupted; "
                  f"evaluating what is there", flush=True)
            return {"budget_minutes": minutes, "complete": False}
        if mark["budget_minutes"] != minutes:
            sys.exit(f"{run} was trained with a {mark['budget_minutes']}-minute budget, not {minutes}: "
                     f"pass --fresh to retrain it")
        print(f"[{name}] already trained: {mark['steps']} steps in {mark['budget_minutes']} min (skipping)",
              flush=True)
        return mark
    if run.exists():
        shutil.rmtree(run)  # a start that never reached its first checkpoint
    run.mkdir(parents=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    print(f"[{name}] training for {minutes} min on {threads} thread(s) -> {run}", flush=True)
    if name == "seed-reference":
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        p = subprocess.run([sys.executable, str(REFERENCE), "train", "--minutes", str(minutes), "--out", str(run)],
                           stdout=subprocess.PIPE, text=True, env=env, check=True)
        (run / "stdout.txt").write_text(p.stdout)
        steps, batch = int(json.loads(p.stdout.strip().splitlines()[-1])["steps"]), 128
    else:
        cfg = budget_config(name, minutes, variant)
        res = train(cfg, run, device="cpu", progress=False, tensorboard=False)
        steps, batch = res.step, cfg.train.batch_size
    wall = time.perf_counter() - t0
    mark = {"budget_minutes": minutes, "complete": True, "steps": steps, "batch_size": batch,
            "images_seen": steps * batch, "epochs_seen": round(steps * batch / FMNIST_TRAIN, 3),
            "steps_per_minute": round(steps / minutes, 1), "wall_s_with_setup": round(wall, 1),
            "threads": threads, "variant": variant if name.startswith("fast") else None,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    _write_json(run / TRAIN_MARK, mark)
    print(f"[{name}] {steps} steps ({steps * batch:,} images) in {minutes} min", flush=True)
    return mark


def load_contender(name: str, run: Path) -> LoadedModel:
    """Our runs through load_model (EMA); the seed's weights copied by position into our UNet."""
    if name != "seed-reference":
        return load_model(run, device="cpu")
    cfg = preset("seed")
    net = build_network(cfg.model)
    src = list(torch.load(run / "seed_model.pt", map_location="cpu", weights_only=True).values())
    dst = net.state_dict()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst.values())):
        sys.exit("the seed reference's state dict does not line up with UNet(preset('seed').model)")
    net.load_state_dict({k: v.clone() for k, v in zip(dst, src)})
    steps = (read_json(run / TRAIN_MARK) or {}).get("steps", -1)
    return LoadedModel(net.eval(), make_schedule(cfg), cfg, steps, run / "seed_model.pt")


def evaluate_contender(name: str, run: Path, sc: SampleConfig, out: Path) -> dict:
    """Sample, save the grid, evaluate; read back an evaluation of the same weights and settings."""
    model = load_contender(name, run)
    if sc.autoguidance and not (run / GUIDE / "meta.json").is_file():
        sc = dataclasses.replace(sc, autoguidance=0.0)  # no guiding model kept (seed presets): plain
    ag = f"-ag{sc.autoguidance:g}" if sc.autoguidance else ""
    key = f"bench-eval-{sc.sampler}-{sc.steps}-{sc.clip}-n{sc.n}-seed{sc.seed}{ag}.json"
    grid = out / f"quality-{name}{ag}.png"
    cached = read_json(run / key)
    if cached is not None and cached.get("train_step") == model.step and grid.is_file():
        print(f"[{name}] evaluation read back from {run / key}", flush=True)
        return cached
    print(f"[{name}] sampling {sc.n} images: {sc.sampler}, {sc.steps} steps", flush=True)
    t0 = time.perf_counter()
    s = generate(model, sc)
    sample_s = time.perf_counter() - t0
    save_grid(s.images[:64], grid)
    rep = evaluate_images(s.images)
    rep = dataclasses.replace(rep, sampler=sc.sampler, steps=s.steps, nfe=s.nfe, source=str(model.source))
    print(f"[{name}] {rep.summary()}", flush=True)
    result = {"train_step": model.step, "sample_seconds": round(sample_s, 1), "grid": str(grid),
              "autoguidance": sc.autoguidance, **rep.to_dict()}
    _write_json(run / key, result)
    return result


def contender_row(name: str, mark: dict, ev: dict) -> dict:
    steps = mark.get("steps", ev["train_step"])
    return {
        "what": CONTENDERS[name],
        "budget_minutes": mark["budget_minutes"],
        "training_complete": mark.get("complete", False),
        "steps": steps,
        "batch_size": mark.get("batch_size"),
        "images_seen": mark.get("images_seen"),
        "epochs_seen": mark.get("epochs_seen"),
        "loadavg_during_training": [mark.get("loadavg_before"), mark.get("loadavg_after")],
        "n": ev["n_samples"],
        "fd_fmnist": ev["fd"],
        "fd_floor": ev["fd_reference"],
        "fd_above_floor": ev["fd"] - ev["fd_reference"],
        "kid_mean": ev["kid_mean"],
        "kid_std": ev["kid_std"],
        "precision": ev["precision"],
        "recall": ev["recall"],
        "mean_confidence": ev["mean_confidence"],
        "class_entropy_bits": ev["class_entropy_bits"],
        "class_histogram": ev["class_histogram"],
        "nfe": ev["nfe"],
        "autoguidance": ev.get("autoguidance", 0.0),
        "sample_seconds": ev["sample_seconds"],
        "grid": ev["grid"],
    }


def markdown(rows: dict[str, dict]) -> str:
    head = ("| contender | budget | steps reached | images seen | FD-FMNIST | floor | KID x1e3 | precision | "
            "recall | confidence | entropy (bits) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        seen = f"{r['images_seen']:,}" if r["images_seen"] else "?"
        lines.append(f"| {name} | {r['budget_minutes']:g} min | {r['steps']:,} | {seen} | {r['fd_fmnist']:.2f} | "
                     f"{r['fd_floor']:.2f} | {r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['mean_confidence']:.3f} | "
                     f"{r['class_entropy_bits']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per contender (default 20)")
    ap.add_argument("--n", type=int, default=1000, help="samples per contender (default 1000)")
    ap.add_argument("--sampler", default="dpm++2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training and sampling, ours and the seed's (default 1: see above)")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders to run")
    ap.add_argument("--fresh", action="store_true", help="delete the selected contenders' run folders first")
    ap.add_argument("--train-only", action="store_true",
                    help="stop after training (to train contenders side by side in separate invocations, "
                         "then evaluate them all with --only '')")
    ap.add_argument("--out", type=Path, default=OUT, help="run folders and grids (default bench/out)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of quality.json (default bench/out/results/quality)")
    ap.add_argument("--name", default="quality", help="the JSON's name in --results (default quality)")
    ap.add_argument("--autoguidance", type=float, default=0.0,
                    help="sample with autoguidance W, each run guided by its own RUN/guide (runs without one: "
                         "plain); default 0")
    ap.add_argument("--variant", default=None,
                    help="train fast / fast-cond with one of bench/ablate.py's VARIANTS (e.g. wide-48); "
                         "give it its own --out")
    a = ap.parse_args()
    if a.variant:
        choose(a.variant, VARIANTS, "variant")
    names = choose(a.only, CONTENDERS, "contender")
    torch.set_num_threads(a.threads)
    runs = a.out / "quality-runs"
    runs.mkdir(parents=True, exist_ok=True)
    sc = SampleConfig(sampler=a.sampler, steps=a.steps, n=a.n, batch_size=a.batch_size, seed=a.seed, clip="clip",
                      autoguidance=a.autoguidance)
    t_start, load_start = time.perf_counter(), os.getloadavg()

    for name in names:  # all training first: its wall clock is the budget; sampling time is not
        if a.fresh and (runs / name).exists():
            shutil.rmtree(runs / name)
        train_contender(name, runs / name, a.minutes, a.threads, a.variant)
    if a.train_only:
        return
    rows = {}
    for name in CONTENDERS:  # every contender with results, also from an earlier invocation
        run = runs / name
        if name not in names and not _has_weights(name, run):
            continue
        mark = read_json(run / TRAIN_MARK) or {"budget_minutes": a.minutes, "complete": False}
        if mark["budget_minutes"] != a.minutes:
            print(f"[{name}] left out: trained with a {mark['budget_minutes']}-minute budget", flush=True)
            continue
        rows[name] = contender_row(name, mark, evaluate_contender(name, run, sc, a.out))

    ratios = {}
    if "fast" in rows and "seed-recipe" in rows:
        f, s = rows["fast"], rows["seed-recipe"]
        ratios["fd_fast_over_seed_recipe"] = f["fd_fmnist"] / s["fd_fmnist"]
        ratios["fd_above_floor_fast_over_seed_recipe"] = f["fd_above_floor"] / s["fd_above_floor"]
    if "seed-recipe" in rows and "seed-reference" in rows:
        s, r = rows["seed-recipe"], rows["seed-reference"]
        ratios["fd_seed_recipe_over_seed_reference"] = s["fd_fmnist"] / r["fd_fmnist"]
        ratios["steps_seed_recipe_over_seed_reference"] = s["steps"] / r["steps"] if r["steps"] else None
    if "fast" in rows and "seed-reference" in rows:
        ratios["fd_fast_over_seed_reference"] = rows["fast"]["fd_fmnist"] / rows["seed-reference"]["fd_fmnist"]
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"torch": torch.__version__, "threads": a.threads, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "wall_s_this_invocation": round(time.perf_counter() - t_start, 1), **cpu_info()},
        "budget_minutes": a.minutes,
        "sampling": {"sampler": a.sampler, "steps": a.steps, "nfe": {k: r["nfe"] for k, r in rows.items()},
                     "clip": "clip", "n": a.n, "seed": a.seed, "autoguidance": a.autoguidance,
                     "note": "the same sampler, steps and seed for every contender; autoguidance only for runs "
                             "that kept a guiding model (RUN/guide)"},
        "contenders": rows,
        "ratios": ratios,
    }
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{a.name}.json"
    write_record(path, result)
    print(markdown(rows))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
