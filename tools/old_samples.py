"""Write tests/fixtures/old_samples.npz: images drawn by the code as it stood before the
processes table (commit d004f07), so a test can check that today's code draws the same ones.

Run once, from that commit; the test (tests/core/test_old_runs.py) only reads the file. Two
sources: the shipped ``fashion-mnist`` model (every sampler at a few steps, guided and not),
and tiny U-Nets built from a fixed seed under each objective and schedule.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch

from ddpm.config import DiffusionConfig, ModelConfig, RunConfig, SampleConfig
from ddpm.core.schedules import make_schedule
from ddpm.nn import UNet
from ddpm.sampling.generate import LoadedModel, generate, load_model

CASES = [("ddpm", 20), ("ddim", 10), ("dpm++2m", 6), ("heun", 5), ("consistency", 3)]


def tiny(objective: str, schedule: str, num_classes: int = 0) -> LoadedModel:
    cfg = RunConfig(model=ModelConfig(dim=8, init_dim=8, dim_mults=(1, 2), use_convnext=False, linear_attn=False,
                                      attn_heads=1, attn_dim_head=8, blocks_per_level=1, num_classes=num_classes),
                    diffusion=DiffusionConfig(timesteps=50, schedule=schedule, objective=objective))
    cfg = replace(cfg, data=replace(cfg.data, image_size=8))
    torch.manual_seed(1234)
    net = UNet(cfg.model).eval()
    return LoadedModel(net, make_schedule(cfg), cfg, 0, None)  # type: ignore[arg-type]


def main(out: str) -> None:
    arrays = {}
    shipped = load_model("fashion-mnist")
    for sampler, steps in CASES:
        cfg = SampleConfig(sampler=sampler, steps=steps, n=4, seed=7, classes="0,3", guidance=1.0)
        arrays[f"shipped/{sampler}"] = generate(shipped, cfg).images.numpy()
    arrays["shipped/ddim-eta"] = generate(shipped, SampleConfig(sampler="ddim", steps=10, eta=0.5, n=4,
                                                                seed=3, classes="none")).images.numpy()
    for objective in ("eps", "x0", "v"):
        for schedule in ("linear", "cosine"):
            m = tiny(objective, schedule)
            for sampler, steps in CASES:
                cfg = SampleConfig(sampler=sampler, steps=steps, n=3, seed=11, clip="none")
                arrays[f"tiny/{objective}/{schedule}/{sampler}"] = generate(m, cfg).images.numpy()
    np.savez_compressed(out, **arrays)
    print(f"wrote {len(arrays)} arrays to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/old_samples.npz")
