"""RePaint's resampling against quality: a trained model completes the first --n Fashion-MNIST
test images with the right half (and/or a centre square) unknown, at each --resample r; for each,
FD-FMNIST of the completions against the test set, beside the originals' FD (the floor) and the
hole left black, and the seconds the inpainting cost (the same images and seeds for every r).

    python bench/inpaint.py --run runs/ref-fast --n 300 --sampler ddim --steps 10 --jump-length 2

Writes RESULTS/inpaint.json. Library: ddpm.evaluation.inpainting.inpainting_report, the
same call as `ddpm eval RUN --inpaint right --resample R`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from harness import cpu_info, save
from ddpm.config import SampleConfig
from ddpm.evaluation.features import default_feature_net
from ddpm.evaluation.inpainting import fmnist_test_images, inpainting_report
from ddpm.sampling.editing import MASK_SHAPES, RePaintConfig
from ddpm.sampling.generate import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/ref-fast")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--spacing", help="the sampler's timestep grid (default: its own)")
    p.add_argument("--jump-length", type=int, default=2)
    p.add_argument("--resample", default="1,5,10")
    p.add_argument("--mask", default="right", help=f"comma list of {', '.join(MASK_SHAPES)}")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="image i of the completions: seed + i")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="inpaint")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.run)
    cfg = SampleConfig(sampler=a.sampler, steps=a.steps, n=a.n, batch_size=a.batch_size, clip="clip", seed=a.seed,
                       spacing=a.spacing)
    net = default_feature_net()
    images = fmnist_test_images(model, a.n)
    rows = []
    for mask in a.mask.split(","):
        for r in (int(v) for v in a.resample.split(",")):
            load = os.getloadavg()[0]
            rep = inpainting_report(model, cfg, RePaintConfig(a.jump_length, r), mask, images=images, feature_net=net)
            print(rep.summary(), flush=True)
            rows.append({"mask": mask, "resample": r, "jump_length": a.jump_length, "fd": rep.report.fd,
                         "kid_mean": rep.report.kid_mean, "fd_originals": rep.fd_originals,
                         "fd_hole_black": rep.fd_hole_black, "nfe_per_image": rep.nfe, "seconds": rep.seconds,
                         "seconds_per_image": rep.seconds / a.n, "load_average_at_start": load})
            save(a.name, {"run": a.run, "step": model.step, "n": a.n, "sampler": a.sampler, "steps": a.steps,
                          "spacing": a.spacing or "the sampler's default", "command": "python " + " ".join(sys.argv),
                          "clip": cfg.clip, "seed": a.seed, "threads": a.threads, "cpu": cpu_info(),
                          "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows})


if __name__ == "__main__":
    main()
