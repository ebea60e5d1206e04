"""Control bars: a conditional model (fast-cond) against the unconditional one (fast)
trained for the same wall-clock budget, side by side.

For the conditional run, a classifier-free guidance sweep over every class (the same seeds at
each w): FD-FMNIST, KID, precision/recall against the test set and class agreement (the shipped
classifier's top-1 on the class asked for). For the unconditional run, the same sampler and
number of images: its FD. Then the cost of guidance: images/s of guided (w > 0, one batched
pass of 2B) against unguided conditional sampling, timed interleaved in this process.

    python bench/control.py --cond-run runs/bench-fast-cond-45m --uncond-run runs/bench-fast-45m

Writes RESULTS/control.json and control.png. Library: ddpm.evaluation.control.guidance_sweep,
the same call as `ddpm eval RUN --class all --guidance 0,1,2,4`.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from harness import RESULTS, cpu_info, interleave, median, ratio, save
from ddpm.config import SampleConfig
from ddpm.evaluation.control import guidance_sweep, plot_sweep
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.evaluation.features import default_feature_net
from ddpm.sampling.generate import generate, load_model
from ddpm.sampling.guidance import parse_guidances


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cond-run", default="runs/bench-fast-cond-45m")
    p.add_argument("--uncond-run", default="runs/bench-fast-45m")
    p.add_argument("--guidance", default="0,0.5,1,2,4")
    p.add_argument("--n", type=int, default=1000, help="images per guidance (split evenly over the classes)")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cost-n", type=int, default=100, help="images per timed call of the cost comparison")
    p.add_argument("--cost-rounds", type=int, default=5, help="0: skip the cost of guidance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="control")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ws = parse_guidances(a.guidance)
    cond, uncond = load_model(a.cond_run), load_model(a.uncond_run)
    net = default_feature_net()
    cfg = SampleConfig(sampler=a.sampler, steps=a.steps, n=a.n, batch_size=250, classes="all")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    sweep = guidance_sweep(cond, cfg, ws, feature_net=net)
    for r in sweep.results:
        print(f"w={r.guidance:g}: {r.report.summary()} agreement={100 * r.agreement:.1f}%", flush=True)
    u = generate(uncond, replace(cfg, classes=None))
    urep = evaluate_images(u.images, feature_net=net)
    print(f"unconditional: {urep.summary()}", flush=True)
    cost = guidance_cost(cond, replace(cfg, n=a.cost_n), max(ws), a.cost_rounds) if a.cost_rounds else None
    best = sweep.best()
    result = {
        "cond_run": a.cond_run, "cond_step": cond.step, "uncond_run": a.uncond_run, "uncond_step": uncond.step,
        "sampler": a.sampler, "steps": a.steps, "n": len(u.images), "threads": a.threads, "cpu": cpu_info(),
        "load_average_at_start": load, "seconds": round(time.perf_counter() - t0, 1),
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sweep": [{"guidance": r.guidance, "fd": r.report.fd, "fd_reference": r.report.fd_reference,
                   "kid_mean": r.report.kid_mean, "precision": r.report.precision, "recall": r.report.recall,
                   "agreement": r.agreement, "agreement_per_class": r.agreement_per_class,
                   "images_per_sec": r.images_per_sec} for r in sweep.results],
        "unconditional": {"fd": urep.fd, "kid_mean": urep.kid_mean, "precision": urep.precision,
                          "recall": urep.recall, "class_entropy_bits": urep.class_entropy_bits},
        "best_fd_guidance": best.guidance, "best_fd": best.report.fd,
        "agreement_at_best_fd": best.agreement, "max_agreement": max(r.agreement for r in sweep.results),
        "best_fd_over_unconditional": best.report.fd / urep.fd,
        "guidance_cost": cost,
    }
    result["bars"] = {"agreement_at_best_fd >= 0.90": best.agreement >= 0.90,
                      "max_agreement >= 0.97 (aim)": result["max_agreement"] >= 0.97,
                      "best_fd <= 0.8 x unconditional": result["best_fd_over_unconditional"] <= 0.8,
                      "guided cost <= 2x": None if cost is None else cost["slowdown"] <= 2.0}
    print(result["bars"], cost, flush=True)
    save(a.name, result)
    plot_sweep(sweep, RESULTS / f"{a.name}.png",
               title=f"fast-cond after {cond.step} steps: FD-FMNIST and class agreement against guidance "
                     f"(unconditional fast, same budget: FD {urep.fd:.1f})")


def guidance_cost(model, cfg: SampleConfig, w: float, rounds: int) -> dict:
    """Seconds per call of unguided (w = 0) and guided (w) conditional sampling, interleaved."""
    times = interleave({"unguided": lambda: generate(model, replace(cfg, guidance=0.0)),
                        "guided": lambda: generate(model, replace(cfg, guidance=w))}, rounds)
    n = len(generate(model, replace(cfg, steps=1)).images)
    return {"guidance": w, "images": n, "rounds": rounds,
            "unguided_images_per_sec": n / median(times["unguided"]),
            "guided_images_per_sec": n / median(times["guided"]),
            "slowdown": ratio(times, "unguided", "guided")}


if __name__ == "__main__":
    main()
