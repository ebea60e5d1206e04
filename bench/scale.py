"""Training and sampling images/s from 28 to 128 pixels, and gradient checkpointing at 64.

    PYTHONPATH=src python bench/scale.py              # ~6.5 min on this 2-core machine
    PYTHONPATH=src python bench/scale.py --threads 1 --sizes 28 64

For each size, a seed-style U-Net (ConvNeXt blocks, linear attention) sized for it, trained on
random uint8 images (the time of a step does not depend on the pixels) with
``ddpm.training.train.Trainer``, next to the seed's own ``Unet`` of the same shape with its p_losses and
Adam, in turns in one process; sampling is our ancestral sampler against the seed's p_sample,
a few of the 200 iterations each, scaled to 200. At 64 px, ``grad_checkpoint`` on and off:
speed in turns in this process, peak resident memory each in its own child process.
Writes RESULTS/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from harness import (
    cpu_info,
    interleave,
    load_reference,
    median,
    peak_rss_mib,
    ratio,
    save,
    vm_mib,
)

from ddpm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ddpm.nn import build_network, count_parameters
from ddpm.samplers import SamplerOptions, get_sampler
from ddpm.sampling import LoadedModel, make_schedule
from ddpm.core.schedules import space_timesteps
from ddpm.training.train import Trainer


class Size(NamedTuple):
    px: int
    channels: int
    dim: int
    mults: tuple[int, ...]
    batch: int  # training batch
    sample_batch: int


SIZES = {
    28: Size(28, 1, 32, (1, 2, 4), 64, 64),
    32: Size(32, 3, 32, (1, 2, 4, 8), 64, 64),
    64: Size(64, 3, 48, (1, 2, 4, 8), 16, 16),
    128: Size(128, 3, 64, (1, 1, 2, 2, 4), 4, 4),
}


def run_config(s: Size, grad_checkpoint: bool = False) -> RunConfig:
    return RunConfig(
        model=ModelConfig(dim=s.dim, dim_mults=s.mults, channels=s.channels, grad_checkpoint=grad_checkpoint),
        data=DataConfig(image_size=s.px, channels=s.channels),
        train=TrainConfig(batch_size=s.batch),
        preset="bench-scale",
    )


def fake_data(s: Size, n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, s.channels, s.px, s.px), dtype=torch.uint8, generator=g)


def reference_train_step(ref, s: Size):
    torch.manual_seed(0)
    model = ref.Unet(dim=s.dim, channels=s.channels, dim_mults=s.mults)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = fake_data(s).float().div(255).mul(2).sub(1)

    def step() -> None:
        x = data[torch.randint(0, len(data), (s.batch,))]
        x = torch.where(torch.rand(s.batch, 1, 1, 1) < 0.5, x.flip(-1), x)
        opt.zero_grad()
        t = torch.randint(0, ref.timesteps, (s.batch,))
        ref.p_losses(model, x, t, loss_type="huber").backward()
        opt.step()
    return step, model


class _Stop(Exception):
    pass


def our_sampler(cfg: RunConfig, net: torch.nn.Module, s: Size, iters: int):
    lm = LoadedModel(net.eval(), make_schedule(cfg), cfg, 0, Path("."))
    denoiser = lm.denoiser("none")
    timesteps = space_timesteps(cfg.diffusion.timesteps, cfg.diffusion.timesteps)
    gen = torch.Generator().manual_seed(0)

    def stop(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i + 1 == iters:
            raise _Stop

    def run() -> None:
        x_T = torch.randn((s.sample_batch, s.channels, s.px, s.px), generator=gen)
        with torch.inference_mode():
            try:
                get_sampler("ddpm").fn(denoiser, x_T, timesteps, options=SamplerOptions(), generator=gen, on_step=stop)
            except _Stop:
                pass
    return run


def reference_sampler(ref, model: torch.nn.Module, s: Size, iters: int):
    model = model.eval()

    def run() -> None:
        with torch.no_grad():
            img = torch.randn(s.sample_batch, s.channels, s.px, s.px)
            for i in reversed(range(ref.timesteps - iters, ref.timesteps)):
                img = ref.p_sample(model, img, torch.full((s.sample_batch,), i, dtype=torch.long), i)
                img.cpu().numpy()
    return run


def bench_size(ref, s: Size, rounds: int, iters: int) -> dict:
    cfg = run_config(s)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), fake_data(s), torch.device("cpu"))
        ref_step, ref_model = reference_train_step(ref, s)
        train = interleave({"ours": tr.train_step, "reference": ref_step}, rounds=rounds, warmup=1)
    net = build_network(cfg.model)  # contiguous weights (`load_model` now gives channels-last)
    sample = interleave({"ours": our_sampler(cfg, net, s, iters), "reference": reference_sampler(ref, ref_model, s, iters)},
                        rounds=rounds, warmup=1)
    T = ref.timesteps
    return {
        "px": s.px, "channels": s.channels, "dim": s.dim, "dim_mults": list(s.mults),
        "params": count_parameters(tr.model), "batch": s.batch, "sample_batch": s.sample_batch,
        "train_img_per_s": s.batch / median(train["ours"]),
        "reference_train_img_per_s": s.batch / median(train["reference"]),
        "train_ratio": ratio(train, "ours", "reference"),
        "sample_img_per_s": s.sample_batch / (median(sample["ours"]) / iters * T),
        "reference_sample_img_per_s": s.sample_batch / (median(sample["reference"]) / iters * T),
        "sample_ratio": ratio(sample, "ours", "reference"),
        "sample_timed_iterations": iters, "rounds": rounds,
        "seconds": {"train": train, "sample": sample},
    }


def bench_checkpointing(rounds: int, threads: int | None, steps: int) -> dict:
    s = SIZES[64]
    out: dict = {"px": s.px, "batch": s.batch}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Trainer(run_config(s), Path(tmp), fake_data(s), torch.device("cpu"))
        ckpt = Trainer(run_config(s, grad_checkpoint=True), Path(tmp), fake_data(s), torch.device("cpu"))
        times = interleave({"off": plain.train_step, "on": ckpt.train_step}, rounds=rounds, warmup=1)
    out["off_img_per_s"] = s.batch / median(times["off"])
    out["on_img_per_s"] = s.batch / median(times["on"])
    out["speed_ratio_on_vs_off"] = ratio(times, "on", "off")
    out["seconds"] = times
    for mode in ("off", "on"):
        argv = [sys.executable, __file__, "--child", mode, "--child-steps", str(steps)]
        if threads:
            argv += ["--threads", str(threads)]
        peak, stdout = peak_rss_mib(argv)
        out[f"{mode}_peak_rss_mib"] = peak
        out[f"{mode}_training_mib"] = json.loads(stdout.strip().splitlines()[-1])["training_mib"]
    out["memory_ratio_on_vs_off"] = out["on_training_mib"] / out["off_training_mib"]
    return out


def child(mode: str, steps: int) -> None:
    """Train a few 64 px steps; print how far the resident memory grew past the setup."""
    s = SIZES[64]
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(run_config(s, grad_checkpoint=mode == "on"), Path(tmp), fake_data(s), torch.device("cpu"))
        setup = vm_mib("VmRSS")
        for _ in range(steps):
            tr.train_step()
    peak = vm_mib("VmHWM")  # not ru_maxrss: that includes the parent's memory at fork
    print(json.dumps({"setup_rss_mib": setup, "vm_hwm_mib": peak, "training_mib": peak - setup}))


def table(rows: list[dict]) -> str:
    head = ("| px | ch | dim, mults | params | train img/s (ours / seed code) | ratio "
            "| sample img/s, 200 steps (ours / seed code) | ratio |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['px']} | {r['channels']} | {r['dim']}, {tuple(r['dim_mults'])} | {r['params']:,} "
            f"| {r['train_img_per_s']:.2f} / {r['reference_train_img_per_s']:.2f} (batch {r['batch']}) "
            f"| {r['train_ratio']:.2f}x | {r['sample_img_per_s']:.3f} / {r['reference_sample_img_per_s']:.3f} "
            f"| {r['sample_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample-iters", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a.child, a.child_steps)
    ref = load_reference()
    t0 = time.perf_counter()
    result: dict = {"command": " ".join(["python", "bench/scale.py", *sys.argv[1:]]),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
                    "machine": cpu_info()}
    rows = [bench_size(ref, SIZES[px], a.rounds, a.sample_iters) for px in a.sizes]
    result["sizes"] = rows
    if not a.no_checkpointing:
        result["grad_checkpoint_64px"] = bench_checkpointing(a.rounds, a.threads, a.memory_steps)
    result["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    save("scale", result)
    print(table(rows))


if __name__ == "__main__":
    main()
