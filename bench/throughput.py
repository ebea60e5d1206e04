"""Throughput of the `--preset seed` recipe against the seed's own code, side by side.

    PYTHONPATH=src python bench/throughput.py                 # ~3 min on this 2-core machine
    PYTHONPATH=src python bench/throughput.py --threads 1     # pin intra-op threads (both sides)
    PYTHONPATH=src python bench/throughput.py --profile       # also the top ops of our step
    python bench/throughput.py --device cuda --sample-iters 200   # on a GPU (bench/gpu.sh)

Measures, in one process with the contenders called in turns (A, B, A, B, ...):
  train   images/s of one optimisation step at batch 128 on Fashion-MNIST: ours is
          ``ddpm.training.train.Trainer.train_step`` (batch draw, training_losses, backward, grad norm,
          Adam, EMA), the seed's is its train loop body (batch draw, p_losses, backward, Adam);
          ``ours_bf16`` (with ``--bf16``, by default only where bf16 is native) is the same step with ``--precision bf16`` (autocast: fp32 weights,
          bf16 convolutions and matrix products; not the network's exact function);
          two large fp32 GEMMs ride along in the same rounds as the machine's measured peak
          (torch.mm, and the same GEMM as a 1x1 convolution: on this AMD CPU MKL's sgemm
          stays well below oneDNN's, which runs the convolutions)
  sample  images/s of 200-step ancestral sampling of 64 images, from ``--sample-iters`` of the
          200 loop iterations (t = 199 down) timed on both sides and scaled to 200; ours
          contiguous, channels-last, and channels-last under bf16 autocast
  flops   FLOPs of one training step (torch.utils.flop_counter) over its time, against the
          faster GEMM of the same round (median over rounds)
  memory  peak resident memory of a child process that trains a few steps, ours and the
          seed's each in its own child (os.wait4's rusage); on CUDA also the peak allocated
Writes RESULTS/throughput.json (and RESULTS/throughput_profile.txt with --profile).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dataclasses import replace

import torch
import torch.nn.functional as F
from harness import (
    RESULTS,
    cpu_info,
    interleave,
    load_reference,
    median,
    peak_rss_mib,
    ratio,
    save,
    vm_mib,
)
from torch.utils.flop_counter import FlopCounterMode

from ddpm import preset
from ddpm.data import load_fashion_mnist
from ddpm.nn import build_network
from ddpm.runtime.precision import native_bf16
from ddpm.runtime.env import process_settings
from ddpm.samplers import SamplerOptions, get_sampler
from ddpm.sampling import LoadedModel, make_schedule
from ddpm.core.schedules import space_timesteps
from ddpm.training.train import Trainer

BATCH = 128
SAMPLE_N = 64
MM_N = 2048  # CPU; 8192 on CUDA
TARGETS = {"train": 1.5, "train_aim": 1.8, "sample": 1.5}


# ---------------------------------------------------------------- the contenders


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a wait for the device, so that wall time is the work's time."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)
    return run


def our_trainer(data: torch.Tensor, run_dir: Path, device: torch.device, precision: str = "fp32") -> Trainer:
    """The seed preset exactly as `ddpm train --preset seed [--precision P]` builds it."""
    cfg = preset("seed")
    return Trainer(replace(cfg, train=replace(cfg.train, precision=precision)), run_dir, data, device)


def reference_step(ref, data: torch.Tensor, device: torch.device):
    """The body of the seed's training loop (its train_bench/train): batch, flip, p_losses, Adam
    (its data and model on ``device``; the seed itself trains on the CPU)."""
    torch.manual_seed(0)
    model = ref.make_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = data.to(device)

    def step() -> None:
        idx = torch.randint(0, len(data), (BATCH,), device=device)
        x = data[idx]
        x = torch.where(torch.rand(BATCH, 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        opt.zero_grad()
        t = torch.randint(0, ref.timesteps, (BATCH,), device=device).long()
        loss = ref.p_losses(model, x, t, loss_type="huber")
        loss.backward()
        opt.step()
    return step


def matmul(device: torch.device):
    """The machine's fp32 GEMM peak, two ways: torch.mm (MKL or cuBLAS) and the same-sized
    GEMM as a channels-last 1x1 convolution (oneDNN on CPU, which runs our convolutions)."""
    n, reps = (8192, 10) if device.type == "cuda" else (MM_N, 4)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    wd = math.isqrt(n // 2)  # 4 images of (wd / 2) x wd pixels: n rows, so the GEMM is n x n x n
    x = torch.randn(4, n, wd // 2, wd, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, device=device).contiguous(memory_format=torch.channels_last)

    def mm() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    def conv() -> None:
        for _ in range(reps):
            F.conv2d(x, w)
    return mm, conv, 2 * n**3 * reps, n


class _Stop(Exception):
    pass


def our_sampler(net: torch.nn.Module, iters: int, channels_last: bool, device: torch.device,
                precision: str = "fp32"):
    """``iters`` iterations (t = 199 down) of our ancestral sampler, as `ddpm sample --sampler
    ddpm --clip none` runs it (DDPM Algorithm 2, inference mode); the loop is cut short by
    the step callback."""
    cfg = preset("seed")
    lm = LoadedModel(net.eval(), make_schedule(cfg).to(device), cfg, 0, Path("."))
    denoiser = lm.denoiser("none", precision)
    timesteps = space_timesteps(cfg.diffusion.timesteps, cfg.diffusion.timesteps)
    fn = get_sampler("ddpm").fn
    gen = torch.Generator(device=device).manual_seed(0)

    def stop(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i + 1 == iters:
            raise _Stop

    def run() -> None:
        x_T = torch.randn((SAMPLE_N, 1, 28, 28), generator=gen, device=device)
        if channels_last:
            x_T = x_T.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            try:
                fn(denoiser, x_T, timesteps, options=SamplerOptions(), generator=gen, on_step=stop)
            except _Stop:
                pass
    return run


def reference_sampler(ref, model: torch.nn.Module, iters: int, device: torch.device):
    """The same iterations of the seed's p_sample_loop body (p_sample, then .cpu().numpy())."""
    def run() -> None:
        with torch.no_grad():
            img = torch.randn(SAMPLE_N, 1, 28, 28, device=device)
            imgs = []
            for i in reversed(range(ref.timesteps - iters, ref.timesteps)):
                img = ref.p_sample(model, img, torch.full((SAMPLE_N,), i, dtype=torch.long, device=device), i)
                imgs.append(img.cpu().numpy())
    return run


# ---------------------------------------------------------------- sections


def bench_train(ref, rounds: int, device: torch.device, bf16: bool) -> dict:
    data = load_fashion_mnist()
    ref_data = data.float().div(255).mul(2).sub(1)  # what the seed's load_fmnist returns
    with tempfile.TemporaryDirectory() as tmp:
        tr = our_trainer(data, Path(tmp), device)
        mm, conv, gemm_flops, gemm_n = matmul(device)
        steps = {"ours": synced(tr.train_step, device), "reference": synced(reference_step(ref, ref_data, device), device),
                 "matmul": synced(mm, device), "conv_gemm": synced(conv, device)}
        if bf16:
            steps["ours_bf16"] = synced(our_trainer(data, Path(tmp), device, "bf16").train_step, device)
        times = interleave(steps, rounds=rounds, warmup=2 if device.type == "cuda" else 1)
        flops = {"ours": count_flops(steps["ours"]), "reference": count_flops(steps["reference"])}
    t_ours, t_ref = median(times["ours"]), median(times["reference"])
    r = ratio(times, "ours", "reference")
    train = {
        "batch": BATCH, "rounds": rounds,
        "ours_img_per_s": BATCH / t_ours, "reference_img_per_s": BATCH / t_ref,
        "ours_sec_per_step": t_ours, "reference_sec_per_step": t_ref,
        "ratio": r, "target": TARGETS["train"], "aim": TARGETS["train_aim"], "met": r >= TARGETS["train"],
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    if bf16:
        train.update({"ours_bf16_img_per_s": BATCH / median(times["ours_bf16"]),
                      "ratio_bf16": ratio(times, "ours_bf16", "reference"),
                      "ratio_bf16_over_ours_fp32": ratio(times, "ours_bf16", "ours")})
    # per round: the step's GFLOP/s over the better of the two GEMMs timed in the same round
    peak = [gemm_flops / min(a, b) / 1e9 for a, b in zip(times["matmul"], times["conv_gemm"])]
    frac = {k: statistics.median(flops[k] / t / 1e9 / p for t, p in zip(times[k], peak)) for k in flops}
    flop = {
        "ours_gflop_per_step": flops["ours"] / 1e9, "reference_gflop_per_step": flops["reference"] / 1e9,
        "ours_gflop_per_s": flops["ours"] / t_ours / 1e9, "reference_gflop_per_s": flops["reference"] / t_ref / 1e9,
        "matmul_gflop_per_s": gemm_flops / median(times["matmul"]) / 1e9,
        "conv_gemm_gflop_per_s": gemm_flops / median(times["conv_gemm"]) / 1e9,
        "peak_gflop_per_s": statistics.median(peak), "gemm_n": gemm_n,
        "ours_fraction_of_peak": frac["ours"], "reference_fraction_of_peak": frac["reference"],
    }
    return {"train": train, "flops": flop}


def count_flops(step) -> int:
    """Matmul/conv/attention FLOPs of one call (forward and backward), as FlopCounterMode counts."""
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def bench_sample(ref, rounds: int, iters: int, device: torch.device, bf16: bool) -> dict:
    torch.manual_seed(0)
    ref_model = ref.make_model().eval().to(device)
    net = build_network(preset("seed").model).to(device)
    net_cl = build_network(preset("seed").model).to(device, memory_format=torch.channels_last)
    runs = {
        "ours": synced(our_sampler(net, iters, False, device), device),  # contiguous weights
        "ours_channels_last": synced(our_sampler(net_cl, iters, True, device), device),
        "reference": synced(reference_sampler(ref, ref_model, iters, device), device),
    }
    if bf16:
        runs["ours_channels_last_bf16"] = synced(our_sampler(net_cl, iters, True, device, "bf16"), device)
    times = interleave(runs, rounds=rounds, warmup=1)
    T = ref.timesteps
    out = {"n": SAMPLE_N, "steps": T, "timed_iterations": iters, "rounds": rounds}
    for k in runs:
        out[f"{k}_img_per_s"] = SAMPLE_N / (median(times[k]) / iters * T)
    out["ratio"] = ratio(times, "ours", "reference")
    out["ratio_channels_last"] = ratio(times, "ours_channels_last", "reference")
    out["target"] = TARGETS["sample"]
    out["met"] = out["ratio"] >= TARGETS["sample"]
    out["met_channels_last"] = out["ratio_channels_last"] >= TARGETS["sample"]
    if bf16:
        out["ratio_channels_last_bf16"] = ratio(times, "ours_channels_last_bf16", "reference")
        out["met_channels_last_bf16"] = out["ratio_channels_last_bf16"] >= TARGETS["sample"]
    out["seconds"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    return out


def bench_memory(steps: int, threads: int | None, device: torch.device) -> dict:
    out: dict = {"train_steps": steps}
    for who in ("ours", "reference"):
        argv = [sys.executable, __file__, "--child", who, "--child-steps", str(steps), "--device", str(device)]
        if threads:
            argv += ["--threads", str(threads)]
        peak, stdout = peak_rss_mib(argv)
        child = json.loads(stdout.strip().splitlines()[-1])
        out[who] = {"peak_rss_mib": peak, **child}
    out["ratio"] = out["ours"]["peak_rss_mib"] / out["reference"]["peak_rss_mib"]
    out["training_ratio"] = out["ours"]["training_mib"] / out["reference"]["training_mib"]
    out["met"] = out["ratio"] <= 1.0
    if device.type == "cuda":
        out["cuda_ratio"] = out["ours"]["cuda_peak_mib"] / out["reference"]["cuda_peak_mib"]
        out["met"] = out["cuda_ratio"] <= 1.0
    return out


def child(who: str, steps: int, device: torch.device) -> None:
    """Train ``steps`` steps in this process; print RSS after setup and the growth after it."""
    if who == "ours":
        with tempfile.TemporaryDirectory() as tmp:
            tr = our_trainer(load_fashion_mnist(), Path(tmp), device)
            setup = vm_mib("VmRSS")
            for _ in range(steps):
                tr.train_step()
    else:
        ref = load_reference()
        step = reference_step(ref, ref.load_fmnist(), device)
        setup = vm_mib("VmRSS")
        for _ in range(steps):
            step()
    peak = vm_mib("VmHWM")  # not ru_maxrss: that includes the parent's memory at fork
    after = vm_mib("VmRSS")
    report = {"setup_rss_mib": setup, "after_rss_mib": after, "vm_hwm_mib": peak,
              "training_mib": peak - setup, "growth_after_steps_mib": after - setup}
    if device.type == "cuda":
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(report))


def profile_ours(path: Path, device: torch.device, steps: int = 2) -> None:
    """Where our training step's time goes: torch.profiler's top ops, by self time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with tempfile.TemporaryDirectory() as tmp:
        tr = our_trainer(load_fashion_mnist(), Path(tmp), device)
        step = synced(tr.train_step, device)
        step()
        with profile(activities=acts, record_shapes=True) as p:
            for _ in range(steps):
                step()
    text = (f"our training step, batch {BATCH}, {steps} steps, {torch.get_num_threads()} threads, {device}\n"
            + p.key_averages().table(sort_by=key, row_limit=25) + "\n"
            + p.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=25))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg(), **process_settings(),  # the OpenMP wait policy libgomp read
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **cpu_info()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--train-rounds", type=int, default=6)
    ap.add_argument("--sample-rounds", type=int, default=7)
    ap.add_argument("--sample-iters", type=int, default=4, help="timed iterations of the 200")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "memory"])
    ap.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                    help="time the bf16 contenders: auto = only where bf16 is native (emulated bf16 is "
                         "several times slower than fp32: bench/bf16_cost.py)")
    ap.add_argument("--profile", action="store_true", help="write the top ops of our step")
    ap.add_argument("--out", default="throughput", help="name of the JSON in RESULTS/")
    ap.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, default=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.child:
        return child(a.child, a.child_steps, device)
    ref = load_reference()
    result = {"machine": machine(device), "command": " ".join(["python", "bench/throughput.py", *sys.argv[1:]])}
    t0 = time.perf_counter()
    bf16 = a.bf16 == "yes" or (a.bf16 == "auto" and native_bf16(device))
    result["bf16_timed"] = bf16
    if "train" not in a.skip:
        result.update(bench_train(ref, a.train_rounds, device, bf16))
    if "sample" not in a.skip:
        result["sample"] = bench_sample(ref, a.sample_rounds, a.sample_iters, device, bf16)
    if "memory" not in a.skip:
        result["memory"] = bench_memory(a.memory_steps, a.threads, device)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    save(a.out, result)
    if a.profile:
        profile_ours(RESULTS / f"{a.out}_profile.txt", device)


if __name__ == "__main__":
    main()
