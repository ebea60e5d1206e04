"""Where sampling the seed's network falls short of the fp32 GEMM rate on this CPU.

    python bench/sample_gap.py --threads 1 --name sample_gap_1thread

The seed's network (``preset("seed").model``, random weights: speed does not depend on them),
64 images, channels-last fp32, inference mode, glibc keeping freed blocks as the ``ddpm`` command
does. Called in turns in one process:
  forward    ITERS calls of the network alone (x_t, t) -> out, as one sampler step makes
  sampler    ITERS iterations of our ancestral sampler (network + the step's own arithmetic)
  conv_gemm  a 2048^3 fp32 GEMM as a 1x1 convolution (oneDNN): the machine's GEMM rate
Each gets its fraction of the GEMM rate (forward FLOPs over time, over the same round's GEMM
rate). Then one forward is split by layer kind with hooks (each leaf layer timed alone, one
thread, in sequence): dense convolutions, depthwise convolutions (ConvNeXt's 7x7), GroupNorm,
linear layers, and the rest (attention's products and softmax, activations, additions, the
time embedding): each kind's share of the time, its FLOPs and its own fraction of the GEMM rate.
Writes RESULTS/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from harness import RESULTS, interleave, write_record
from throughput import machine, matmul, our_sampler
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddpm import preset
from ddpm.nn import build_network
from ddpm.nn.layers import Attention, LinearAttention
from ddpm.runtime.env import keep_freed_memory

N = 64


def kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        return "depthwise convolution" if m.groups > 1 and m.groups == m.in_channels else "dense convolution"
    if isinstance(m, nn.GroupNorm):
        return "group norm"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def layer_flops(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        return 2 * out.numel() * k
    if isinstance(m, nn.Linear):
        return 2 * out.numel() * m.in_features
    return 0


ATTN = "attention's own work (products, softmax, reshapes; its 1x1 convolutions and norm excluded)"


def split_by_kind(net: nn.Module, x: torch.Tensor, t: torch.Tensor, reps: int) -> tuple[dict, float]:
    """Seconds and FLOPs per layer kind over ``reps`` forwards (an exclusive split: the attention
    blocks' time less the leaf layers inside them), and the forwards' total seconds."""
    secs: dict[str, float] = defaultdict(float)
    flops: dict[str, int] = defaultdict(int)
    start: dict[int, float] = {}
    depth = [0]  # attention blocks open
    hooks = []
    for m in net.modules():
        if isinstance(m, (Attention, LinearAttention)):
            def apre(mod, args):
                depth[0] += 1
                start[id(mod)] = time.perf_counter()

            def apost(mod, args, out):
                depth[0] -= 1
                secs[ATTN] += time.perf_counter() - start.pop(id(mod))
            hooks += [m.register_forward_pre_hook(apre), m.register_forward_hook(apost)]
            continue
        k = kind(m)
        if k is None:
            continue

        def pre(mod, args, _k=k):
            start[id(mod)] = time.perf_counter()

        def post(mod, args, out, _k=k):
            dt = time.perf_counter() - start.pop(id(mod))
            secs[_k] += dt
            flops[_k] += layer_flops(mod, out)
            if depth[0]:
                secs[ATTN] -= dt
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(reps):
                net(x, t)
            total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return {k: {"seconds": secs[k], "flops": flops[k]} for k in secs}, total


def attention_profile(net: nn.Module, calls: int = 10) -> dict:
    """The first linear attention block (28x28) alone on its own input: its aten operators'
    shares of self time, and one exp over a tensor of its k's size for scale."""
    from torch.profiler import ProfilerActivity, profile
    block = next(m for m in net.modules() if isinstance(m, LinearAttention))
    dim = block.to_qkv.in_channels
    x = torch.randn(N, dim, 28, 28).contiguous(memory_format=torch.channels_last)
    k = torch.randn(N, 28 * 28, block.heads * block.dim_head)
    with torch.inference_mode():
        for _ in range(2):
            block(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                block(x)
        t0 = time.perf_counter()
        for _ in range(calls):
            k.exp()
        exp_ms = (time.perf_counter() - t0) / calls * 1e3
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    return {"channels": dim, "calls": calls, "ms_per_call": total / calls / 1e3,
            "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count,
                         "ms_per_op_call": round(e.self_cpu_time_total / e.count / 1e3, 3)} for e in top],
            "exp_ms_over_k_sized_tensor": round(exp_ms, 3), "k_elements": k.numel()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="network calls (sampler iterations) per contender call")
    ap.add_argument("--name", default="sample_gap")
    a = ap.parse_args()
    if not keep_freed_memory():
        sys.exit("glibc's mallopt is not available here")
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    net = build_network(preset("seed").model).eval().to(memory_format=torch.channels_last)
    x = torch.randn(N, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 200, (N,))
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        net(x, t)
    fwd_flops = fc.get_total_flops()

    def forward() -> None:
        with torch.inference_mode():
            for i in range(a.iters):
                net(x, torch.full((N,), 199 - i, dtype=torch.long))
    _, conv, gemm_flops, _ = matmul(cpu)
    runs = {"forward": forward, "sampler": our_sampler(net, a.iters, True, cpu), "conv_gemm": conv}
    times = interleave(runs, rounds=a.rounds)
    gemm = [gemm_flops / g for g in times["conv_gemm"]]
    res: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(cpu), "n": N, "iters": a.iters,
                 "rounds": a.rounds, "forward_gflop": fwd_flops / 1e9,
                 "gemm_gflop_per_s": statistics.median(gemm) / 1e9}
    for k in ("forward", "sampler"):
        res[f"{k}_fraction_of_gemm"] = statistics.median(
            (fwd_flops * a.iters / s) / g for s, g in zip(times[k], gemm))
    res["sampler_over_forward_time"] = statistics.median(s / f for s, f in zip(times["sampler"], times["forward"]))
    reps = 3 * a.iters
    parts, total = split_by_kind(net, x, t, reps)
    # FlopCounterMode counts convolutions and matrix products: what the hooked layers do not
    # account for is the attention blocks' own products (q k^T, softmax(.) v, k^T v, q context)
    parts[ATTN]["flops"] = fwd_flops * reps - sum(v["flops"] for k, v in parts.items() if k != ATTN)
    parts["the rest (activations, additions, time embedding, up/down-sampling glue)"] = {
        "seconds": total - sum(v["seconds"] for v in parts.values()), "flops": 0}
    rate = res["gemm_gflop_per_s"] * 1e9
    kinds = {}
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]["seconds"]):
        kinds[k] = {"share_of_time": v["seconds"] / total, "share_of_flops": v["flops"] / (fwd_flops * reps),
                    "gflop_per_forward": v["flops"] / reps / 1e9,
                    "fraction_of_gemm": (v["flops"] / v["seconds"]) / rate if v["flops"] else 0.0}
    res["by_layer_kind"] = kinds
    res["linear_attention_28x28"] = attention_profile(net)
    res["hooked_forward_seconds"] = total / reps
    res["seconds"] = {k: [round(s, 4) for s in v] for k, v in times.items()}
    res["machine"]["loadavg_end"] = os.getloadavg()
    write_record(RESULTS / f"{a.name}.json", res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("seconds", "machine")}, indent=2))


if __name__ == "__main__":
    main()
