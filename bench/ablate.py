"""Ablations of the CPU preset: one change at a time, the same wall-clock budget, one sampler.

    python bench/ablate.py --minutes 4 --n 1000                  # every variant, one after another
    python bench/ablate.py --only base,eps --minutes 4           # a subset
    python bench/ablate.py --base seed --only base               # start from another preset

Each variant is the base preset (``--base``, default ``fast``) with the changes listed in
VARIANTS, trained for ``--minutes`` of wall clock on ``--threads`` torch threads, sampled from
its EMA weights with DPM-Solver++(2M) (20 steps, x0 clipped, fixed seed) and scored with
FD-FMNIST against the test set. Steps reached are recorded next to the budget, with the load
average, since the wall clock is shared with whatever else runs on the machine.

Resumable: a variant whose folder under bench/out/ablate-runs/ holds a finished run with the
same budget and changes is not retrained. Writes RESULTS/ablate.json (the grids stay in bench/out/),
its rows named BASE-HASH/MINUTESmin/VARIANT, HASH being the first 8 hex digits of the SHA-1 of
the base preset's JSON, so that results against an earlier version of a preset are kept apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from harness import OUT, RESULTS, choose, cpu_info, read_json, write_record

from ddpm.config import RunConfig, override, preset
from ddpm.evaluation.control import guidance_sweep
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.sampling import SampleConfig, generate, load_model
from ddpm.training.train import train
from ddpm.pictures.viz import save_grid

# name -> {section: {field: value}}; each changes one thing of the base preset
VARIANTS: dict[str, dict[str, dict]] = {
    "base": {},
    "uniform-weight": {"diffusion": {"loss_weighting": "uniform"}},
    "eps": {"diffusion": {"objective": "eps"}},
    "narrow-24": {"model": {"dim": 24, "init_dim": 24}},
    "wide-48": {"model": {"dim": 48, "init_dim": 48}},
    "batch-128": {"train": {"batch_size": 128}},
    "batch-32": {"train": {"batch_size": 32}},
    "lr-1e-3": {"train": {"lr": 1e-3}},
    "lr-4e-3": {"train": {"lr": 4e-3}},
    "ema-0.999": {"train": {"ema_decay": 0.999}},
    "constant-lr": {"train": {"lr_schedule": "constant"}},
    "linear-T1000": {"diffusion": {"schedule": "linear", "timesteps": 1000}},
    "mults-124": {"model": {"dim_mults": (1, 2, 4)}},
    "convnext": {"model": {"use_convnext": True}},
    "thin-top": {"model": {"dim": 16, "init_dim": 16, "dim_mults": (1, 4, 4)}},  # half the channels at 28x28
    "bf16": {"train": {"precision": "bf16"}},
    "fp32": {"train": {"precision": "fp32"}},
    # the recipe's levers
    "lognormal": {"diffusion": {"t_sampling": "lognormal"}},  # EDM's noise levels, min-SNR weight kept
    # EDM's noise levels and loss weight: v-prediction is EDM's preconditioning with sigma_data = 1,
    # and with it EDM's weight on the x0 error is a uniform weight on the v error
    "edm": {"diffusion": {"t_sampling": "lognormal", "loss_weighting": "uniform"}},
    "blocks-1": {"model": {"blocks_per_level": 1}},
    "T-100": {"diffusion": {"timesteps": 100}},
    "batch-16": {"train": {"batch_size": 16}},
    # conditional: scored unguided and at w = 1, with class agreement
    "cond": {"model": {"num_classes": 10}},
    "cond-emb-1": {"model": {"num_classes": 10, "class_emb_std": 1.0}},
    # combinations
    "blocks-1-lr-4e-3": {"model": {"blocks_per_level": 1}, "train": {"lr": 4e-3}},
    "blocks-1-b16": {"model": {"blocks_per_level": 1}, "train": {"batch_size": 16}},
    # on the new fast (one block per level, Adam 4e-3)
    "beta2-0.99": {"train": {"adam_beta2": 0.99}},
    "lr-8e-3": {"train": {"lr": 8e-3}},
    "mults-124-b1": {"model": {"dim_mults": (1, 2, 4)}},
    "no-ema": {"train": {"ema_decay": 0.0}},
    "ema-0.995": {"train": {"ema_decay": 0.995}},
    # at the 20-minute budget (bench/quality.py --variant): more capacity once steps are plenty
    "blocks-2": {"model": {"blocks_per_level": 2}},
    "ema-0.9995": {"train": {"ema_decay": 0.9995}},
}


def with_changes(cfg: RunConfig, changes: dict[str, dict]) -> RunConfig:
    """``cfg`` with one of VARIANTS' changes ({section: {field: value}}) applied, types checked."""
    return dataclasses.replace(cfg, **{k: override(getattr(cfg, k), **v) for k, v in changes.items()})


def variant_config(base: str, changes: dict[str, dict], minutes: float) -> RunConfig:
    cfg = with_changes(preset(base), changes)
    return dataclasses.replace(cfg, train=override(cfg.train, minutes=minutes, epochs=None, max_steps=None,
                                                   sample_every=0, checkpoint_every=10**9))


def run_variant(name: str, cfg: RunConfig, run: Path, sc: SampleConfig, out: Path) -> dict:
    key = {"config": cfg.to_dict(), "sampling": dataclasses.asdict(sc)}
    done = read_json(run / "ablate-result.json")
    if done is not None and done.get("key") == json.loads(json.dumps(key)):
        print(f"[{name}] read back: FD {done['fd_fmnist']:.2f}", flush=True)
        return done
    if run.exists():
        shutil.rmtree(run)
    load_before = os.getloadavg()
    print(f"[{name}] training {cfg.train.minutes} min", flush=True)
    res = train(cfg, run, device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    model = load_model(run, device="cpu")
    t0 = time.perf_counter()
    extra: dict = {}
    if cfg.model.num_classes:  # a conditional variant: every class, unguided (w = 0) and w = 1
        sweep = guidance_sweep(model, dataclasses.replace(sc, classes="all"), [0.0, 1.0])
        rep = sweep.results[0].report
        extra = {"agreement_w0": sweep.results[0].agreement, "agreement_w1": sweep.results[1].agreement,
                 "fd_fmnist_w1": sweep.results[1].report.fd}
        s = generate(model, dataclasses.replace(sc, classes="all", n=min(sc.n, 100)))
    else:
        s = generate(model, sc)
        rep = evaluate_images(s.images)
    sample_s = time.perf_counter() - t0
    cond = bool(cfg.model.num_classes)  # one row per class
    save_grid(s.images[:100 if cond else 64], out / f"ablate-{name}.png", nrow=10 if cond else None)
    row = {"key": key, "steps": res.step, "images_seen": res.step * cfg.train.batch_size,
           "fd_fmnist": rep.fd, "fd_floor": rep.fd_reference, "kid_mean": rep.kid_mean, **extra,
           "precision": rep.precision, "recall": rep.recall, "sample_seconds": round(sample_s, 1),
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    (run / "ablate-result.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"[{name}] {res.step} steps, FD {rep.fd:.2f} (floor {rep.fd_reference:.2f})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="fast", help="preset the variants change (default fast)")
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per variant (default 4)")
    ap.add_argument("--n", type=int, default=1000, help="samples per variant (default 1000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--out", type=Path, default=OUT, help="run folders and grids (default bench/out)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of NAME.json (default bench/out/results/quality)")
    ap.add_argument("--name", default="ablate", help="NAME.json and OUT/NAME-runs/ (default ablate); run "
                                                      "variants side by side as separate invocations with one name")
    a = ap.parse_args()
    names = choose(a.only, VARIANTS, "variant")
    torch.set_num_threads(a.threads)
    sc = SampleConfig(sampler="dpm++2m", steps=20, n=a.n, batch_size=250, seed=0, clip="clip")
    runs = a.out / f"{a.name}-runs"
    runs.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{a.name}.json"
    rows: dict = {}
    # the base preset's own config names its rows, so a changed preset never overwrites old results
    base_id = f"{a.base}-{hashlib.sha1(preset(a.base).to_json().encode()).hexdigest()[:8]}"
    for name in names:
        cfg = variant_config(a.base, VARIANTS[name], a.minutes)
        row = run_variant(name, cfg, runs / f"{base_id}-{a.minutes:g}min-{name}", sc, a.out / a.name)
        rows = (read_json(path) or {}).get("variants", {})  # re-read: another invocation may run beside this one
        rows[f"{base_id}/{a.minutes:g}min/{name}"] = {"changes": VARIANTS[name],
                                                     **{k: v for k, v in row.items() if k != "key"}}
        result = {"command": "python " + " ".join(sys.argv), "threads": a.threads, "machine": cpu_info(),
                  "sampling": "dpm++2m, 20 steps, clip, seed 0", "variants": rows}
        write_record(path, result)
    print("| variant | steps | FD-FMNIST |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['steps']:,} | {r['fd_fmnist']:.2f} |")


if __name__ == "__main__":
    main()
