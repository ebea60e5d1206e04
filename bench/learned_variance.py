"""Learned variances (Improved DDPM hybrid loss) against fixed variances, on Fashion-MNIST.

Trains two copies of the "fast" preset that differ only in ``learn_sigma`` (same seed, same
wall-clock budget, trained side by side in two processes so that both see the same machine
load), then for each: the variational bound in bits/dim on Fashion-MNIST test images
(ddpm.likelihood, stratified over ``--nll-steps`` KL terms), and ancestral sampling (DDPM
Algorithm 2, respaced) at several step counts, scored by FD-FMNIST (ddpm.evaluation.evaluate) when the
feature net is shipped, and by pixel statistics and grids always.

    PYTHONPATH=src python bench/learned_variance.py                      # the defaults below
    PYTHONPATH=src python bench/learned_variance.py --max-steps 200 --minutes 20 --nll-n 250 \
        --nll-steps 25 --nll-alt-n 100 --sample-n 32 --steps 25,50,100,500 --threads 1

Writes RESULTS/learned_variance.json, the runs in bench/out/lv-runs/{fixed,learned}/ (reused
when present: delete them to retrain), and grids bench/out/lv-grids/MODEL-VARIANCE-STEPS.png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddpm.config import preset
from ddpm.data import load_fashion_mnist
from ddpm.errors import DdpmError
from ddpm.evaluation.likelihood import format_nll, nll_bits_per_dim
from ddpm.sampling import SampleConfig, generate, load_model
from ddpm.training.train import train
from ddpm.pictures.viz import save_grid
from harness import OUT, RESULTS, write_record

MODELS = {"fixed": False, "learned": True}  # name -> learn_sigma


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per model (wall clock)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="step budget per model (the first of this and --minutes to run out); the same steps "
                        "for both models keeps the comparison fair when the machine's load varies")
    p.add_argument("--nll-n", type=int, default=500, help="test images for the NLL")
    p.add_argument("--nll-steps", type=int, default=50, help="KL terms per image (0: all T)")
    p.add_argument("--nll-alt-n", type=int, default=200,
                   help="test images for the other variance of each model (fixed: beta; learned: beta_tilde)")
    p.add_argument("--sample-n", type=int, default=64)
    p.add_argument("--steps", default="25,50,100,500", help="ancestral sampling step counts")
    p.add_argument("--extra-fixed-variance", default="beta",
                   help="also sample the fixed model with this variance at steps < T ('' for none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (two processes run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=str(OUT / "lv-runs"))
    p.add_argument("--score-only", action="store_true",
                   help="re-score the saved samples of the last run (e.g. once the feature net is shipped)")
    return p.parse_args()


def run_config(learn_sigma: bool, args: argparse.Namespace):
    cfg = preset("fast")
    return replace(cfg, model=replace(cfg.model, learn_sigma=learn_sigma),
                   train=replace(cfg.train, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
                                 checkpoint_every=0))


def train_one(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    run = Path(args.runs) / name
    if (run / "latest").exists():
        return {"reused": True, **_train_facts(run)}
    cfg = run_config(MODELS[name], args)
    t0 = time.monotonic()
    res = train(cfg, run, device="cpu", progress=False, log=lambda _: None)
    return {"reused": False, "seconds": round(time.monotonic() - t0, 1), "images_per_sec": round(res.images_per_sec, 1),
            **_train_facts(run)}


def _train_facts(run: Path) -> dict:
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    tail = logs[-5:]
    return {"step": logs[-1]["step"], "final_loss_mean_last5_logs": sum(r["loss"] for r in tail) / len(tail)}


def evaluate_one(name: str, args: argparse.Namespace) -> dict:
    """NLL at the model's own variance (and the other fixed choice), then ancestral samples."""
    torch.set_num_threads(args.threads)
    model = load_model(Path(args.runs) / name)
    T = model.schedule.T
    test = load_fashion_mnist("test")
    k = args.nll_steps or None
    own = "learned" if MODELS[name] else "beta_tilde"
    alt = "beta_tilde" if MODELS[name] else "beta"
    nll = {}
    for variance, n in ((own, args.nll_n), (alt, args.nll_alt_n)):
        if n <= 0:
            continue
        t0 = time.monotonic()
        r = nll_bits_per_dim(model, test[:n], timesteps=k, variance=variance, seed=args.seed, batch_size=250)
        nll[variance] = {**r.to_dict(), "seconds": round(time.monotonic() - t0, 1)}
        print(f"[{name}] {format_nll(r)}", flush=True)
    samples = {}
    variants = [(own, s) for s in _steps(args, T)]
    if not MODELS[name] and args.extra_fixed_variance:
        variants += [(args.extra_fixed_variance, s) for s in _steps(args, T) if s < T]
    for variance, steps in variants:
        t0 = time.monotonic()
        cfg = SampleConfig(sampler="ddpm", steps=steps, variance=variance, n=args.sample_n, batch_size=250,
                           seed=args.seed)
        imgs = generate(model, cfg).images
        key = f"{variance}-{steps}"
        torch.save(imgs, OUT / "lv-grids" / f"{name}-{key}.pt")
        save_grid(imgs[:64], OUT / "lv-grids" / f"{name}-{key}.png")
        samples[key] = {"variance": variance, "steps": steps, "seconds": round(time.monotonic() - t0, 1)}
        print(f"[{name}] sampled {key} in {samples[key]['seconds']}s", flush=True)
    return {"T": T, "nll": nll, "samples": samples}


def _steps(args: argparse.Namespace, T: int) -> list[int]:
    return [min(int(s), T) for s in args.steps.split(",") if s.strip()]


def pixel_stats(imgs: torch.Tensor) -> dict:
    """Mean/std of the pixel values, the fraction of black pixels, and the mean absolute
    difference of neighbouring pixels (graininess: leftover sampling noise raises it)."""
    x = imgs.float()
    tv = 0.5 * ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())
    return {"mean": round(x.mean().item(), 2), "std": round(x.std().item(), 2),
            "frac_zero": round((imgs == 0).float().mean().item(), 4), "neighbour_absdiff": round(tv.item(), 2)}


def score_samples(results: dict, args: argparse.Namespace) -> dict:
    """FD-FMNIST (when the feature net is shipped) and pixel statistics of every sample set."""
    try:
        from ddpm.evaluation.evaluate import evaluate_images
        from ddpm.evaluation.features import default_feature_net
        net = default_feature_net()
    except (ImportError, DdpmError) as e:
        print(f"FD unavailable ({e}); pixel statistics only", flush=True)
        net = None
    for name, res in results.items():
        for key, info in res["samples"].items():
            imgs = torch.load(OUT / "lv-grids" / f"{name}-{key}.pt")
            info["pixels"] = pixel_stats(imgs)
            if net is not None:
                rep = evaluate_images(imgs, feature_net=net, seed=args.seed)
                info.update(fd=rep.fd, fd_reference=rep.fd_reference, kid=rep.kid_mean,
                            precision=rep.precision, recall=rep.recall)
    return {"test_pixels": pixel_stats(load_fashion_mnist("test")[:1000]), "fd_available": net is not None}


def table(results: dict) -> str:
    lines = ["model    variance    NLL bits/dim (± se)   prior   L_0     KL      n  terms/img"]
    for name, res in results.items():
        for variance, r in res["nll"].items():
            lines.append(f"{name:<8} {variance:<11} {r['bits_per_dim']:.4f} ± {r['bits_per_dim_stderr']:.4f}    "
                         f"{r['prior_bpd']:.4f}  {r['decoder_bpd']:.4f}  {r['kl_bpd']:.4f}  {r['n_images']:>4}  "
                         f"{r['timesteps']}")
    lines.append("")
    lines.append("model    variance    steps  FD (floor)         pixel mean/std  black  nbr-absdiff  seconds")
    for name, res in results.items():
        for key, s in res["samples"].items():
            fd = f"{s['fd']:.2f} ({s['fd_reference']:.2f})" if "fd" in s else "n/a"
            lines.append(f"{name:<8} {s['variance']:<11} {s['steps']:>5}  {fd:<18} "
                         f"{s['pixels']['mean']:.1f}/{s['pixels']['std']:.1f}      {s['pixels']['frac_zero']:.3f}  "
                         f"{s['pixels']['neighbour_absdiff']:>6.2f}       {s['seconds']}")
    return "\n".join(lines)


def rescore(args: argparse.Namespace) -> None:
    out = json.loads((RESULTS / "learned_variance.json").read_text())
    out.update(score_samples(out["models"], args))
    _finish(out)


def _finish(out: dict) -> None:
    write_record(RESULTS / "learned_variance.json", out)
    print(table(out["models"]))
    print(f"test-set pixels (first 1000): {out['test_pixels']}")


def main() -> None:
    args = parse_args()
    if args.score_only:
        return rescore(args)
    (OUT / "lv-grids").mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        trained = dict(zip(MODELS, pool.starmap(train_one, [(n, args) for n in MODELS])))
        print("trained:", json.dumps(trained), flush=True)
        evaluated = dict(zip(MODELS, pool.starmap(evaluate_one, [(n, args) for n in MODELS])))
    results = {n: {"train": trained[n], **evaluated[n]} for n in MODELS}
    extra = score_samples(results, args)
    out = {"args": vars(args), "preset": "fast", "torch_threads_per_process": args.threads,
           "total_seconds": round(time.monotonic() - t_start, 1), **extra, "models": results}
    _finish(out)


if __name__ == "__main__":
    main()
