"""The speed levers tried on the seed preset, each as a ratio of two contenders in turns.

    PYTHONPATH=src python bench/levers.py                    # in-process levers, ~4 min
    PYTHONPATH=src python bench/levers.py --compile          # + torch.compile (minutes to compile)
    PYTHONPATH=src python bench/levers.py --env              # + process-level settings, children in turns

In-process (one process, contenders called in turns, medians of per-round ratios):
  attention      our training fwd+bwd with the attention of nn/layers.py against the one it
                 replaced (kept below as ``PreviousAttention``/``PreviousLinearAttention``)
  channels_last  training fwd+bwd, channels-last weights and input against contiguous
  adam           Adam.step: foreach (what Trainer uses), fused, and the for-loop
  sampling       one forward of 64 images: channels-last against contiguous weights (what
                 ``load_model`` gave before this lever; it now returns channels-last), inference_mode against no_grad
  group_norm     GroupNorm(1, 56) fwd+bwd at (128, 56, 28, 28), channels-last against contiguous
  compile        (--compile) Trainer.train_step with train.compile on against off
Process-level (--env; children alternated A, B, A, B, each timing a few training steps):
  threads 1 and 2, OMP_WAIT_POLICY=PASSIVE, THP_MEM_ALLOC_ENABLE=1, each against the default.
Writes RESULTS/levers.json (or --out NAME).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import ROOT, cpu_info, interleave, median, ratio, save

from ddpm import preset
from ddpm.data import load_fashion_mnist
from ddpm.nn import build_network, layers
from ddpm.runtime.env import process_settings
from ddpm.training.train import Trainer

BATCH = 128


class PreviousAttention(layers.Attention):
    """The full attention before this benchmark's change: one qkv conv, then indexing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, self.dim_head, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class PreviousLinearAttention(layers.LinearAttention):
    """The linear attention before this benchmark's change: a 4-d matmul over (B, heads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, self.dim_head, h * w)
        q = qkv[:, 0].softmax(dim=-2) * self.scale
        k = qkv[:, 1].softmax(dim=-1)
        context = k @ qkv[:, 2].transpose(-1, -2)
        out = context.transpose(-1, -2) @ q
        return self.to_out(out.reshape(b, -1, h, w))


def with_previous_attention(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if type(m) is layers.Attention:
            m.__class__ = PreviousAttention
        elif type(m) is layers.LinearAttention:
            m.__class__ = PreviousLinearAttention
    return model


def seed_net(channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(preset("seed").model)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def fwd_bwd(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor):
    def run() -> None:
        net.zero_grad(set_to_none=True)
        net(x, t).square().mean().backward()
    return run


def summarize(times: dict[str, list[float]], base: str) -> dict:
    return {"seconds_median": {k: median(v) for k, v in times.items()},
            "speedup_vs_" + base: {k: ratio(times, k, base) for k in times if k != base}}


def lever_attention(rounds: int) -> dict:
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 200, (BATCH,))
    now = seed_net(True)
    before = with_previous_attention(copy.deepcopy(now))
    return summarize(interleave({"previous": fwd_bwd(before, x, t), "current": fwd_bwd(now, x, t)}, rounds), "previous")


def lever_channels_last(rounds: int) -> dict:
    x = torch.randn(BATCH, 3, 28, 28)  # 3 channels, so that the input's layout matters too
    t = torch.randint(0, 200, (BATCH,))
    cfg = dataclasses.replace(preset("seed").model, channels=3)
    torch.manual_seed(0)
    cf = build_network(cfg)
    cl = copy.deepcopy(cf).to(memory_format=torch.channels_last)
    times = interleave({"contiguous": fwd_bwd(cf, x, t),
                        "channels_last": fwd_bwd(cl, x.contiguous(memory_format=torch.channels_last), t)}, rounds)
    return summarize(times, "contiguous")


def lever_adam(rounds: int) -> dict:
    net = seed_net(True)
    x = torch.randn(8, 1, 28, 28)
    net(x, torch.randint(0, 200, (8,))).square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    opts = {}
    for name, kw in [("foreach", {"foreach": True}), ("fused", {"fused": True}), ("for_loop", {"foreach": False})]:
        params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opts[name] = torch.optim.Adam(params, lr=1e-3, **kw)
    return summarize(interleave({k: o.step for k, o in opts.items()}, rounds * 4, warmup=2), "foreach")


def lever_sampling(rounds: int) -> dict:
    cf = seed_net(False).eval()
    cl = copy.deepcopy(cf).to(memory_format=torch.channels_last)
    x = torch.randn(64, 1, 28, 28)
    t = torch.full((64,), 150)

    def fwd(net, mode):
        def run() -> None:
            with mode():
                net(x, t)
        return run
    times = interleave({"contiguous_inference_mode": fwd(cf, torch.inference_mode),
                        "channels_last_inference_mode": fwd(cl, torch.inference_mode),
                        "channels_last_no_grad": fwd(cl, torch.no_grad)}, rounds * 2)
    return summarize(times, "contiguous_inference_mode")


def lever_group_norm(rounds: int) -> dict:
    gn = torch.nn.GroupNorm(1, 56)
    x = torch.randn(BATCH, 56, 28, 28)
    g = torch.randn_like(x)

    def run(x, g):
        def f() -> None:
            gn(x.detach().requires_grad_(True)).backward(g)
        return f
    cl = torch.channels_last
    times = interleave({"contiguous": run(x, g),
                        "channels_last": run(x.contiguous(memory_format=cl), g.contiguous(memory_format=cl))},
                       rounds * 4)
    return summarize(times, "contiguous")


def lever_compile(rounds: int) -> dict:
    data = load_fashion_mnist()
    cfg = preset("seed")
    with tempfile.TemporaryDirectory() as tmp:
        eager = Trainer(cfg, Path(tmp), data, torch.device("cpu"))
        comp = Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True)),
                       Path(tmp), data, torch.device("cpu"))
        t0 = time.perf_counter()
        comp.train_step()
        compile_s = time.perf_counter() - t0
        times = interleave({"eager": eager.train_step, "compiled": comp.train_step}, rounds)
    return {"first_step_seconds_incl_compile": compile_s, **summarize(times, "eager")}


# ---------------------------------------------------------------- process-level settings

# The children import ddpm as a library, which leaves OMP_WAIT_POLICY alone (only the `ddpm`
# command sets PASSIVE for itself, ddpm.runtime.env): without the variable, libgomp's own default
# (spin a while, then sleep). Each child records what it ran with.
OMP_DEFAULT: dict[str, str] = {}
ENV_VARIANTS = {
    "default_2_threads": (OMP_DEFAULT, 2),
    "1_thread": (OMP_DEFAULT, 1),
    "omp_passive_2_threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "thp_2_threads": ({**OMP_DEFAULT, "THP_MEM_ALLOC_ENABLE": "1"}, 2),
}


def env_child(steps: int) -> None:
    """Time ``steps`` training steps (after one untimed) and print the median."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(preset("seed"), Path(tmp), load_fashion_mnist(), torch.device("cpu"))
        tr.train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t0)
    print(json.dumps({"sec_per_step": statistics.median(times), **process_settings()}))


def lever_env(rounds: int, steps: int) -> dict:
    names = list(ENV_VARIANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    ran_with: dict[str, dict] = {}  # what each child's process really ran with
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            env, threads = ENV_VARIANTS[n]
            env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}, **env}
            p = subprocess.run([sys.executable, __file__, "--env-child", str(steps), "--threads", str(threads)],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE, check=True)
            rec = json.loads(p.stdout.decode().strip().splitlines()[-1])
            times[n].append(rec["sec_per_step"])
            ran_with[n] = {k: rec.get(k) for k in ("omp_wait_policy", "omp_wait_policy_set_by", "threads")}
    out = summarize(times, "default_2_threads")
    out["ran_with"] = ran_with
    out["seconds"] = times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile on CPU)")
    ap.add_argument("--env", action="store_true", help="also the process-level settings (children)")
    ap.add_argument("--env-rounds", type=int, default=3)
    ap.add_argument("--env-steps", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["attention", "channels_last", "adam", "sampling", "group_norm"])
    ap.add_argument("--out", default="levers", help="name of the JSON in RESULTS/")
    ap.add_argument("--env-child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.env_child is not None:
        return env_child(a.env_child)
    t0 = time.perf_counter()
    result: dict = {"command": " ".join(["python", "bench/levers.py", *sys.argv[1:]]), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(), "batch": BATCH,
                    "machine": cpu_info()}
    levers = {"attention": lever_attention, "channels_last": lever_channels_last, "adam": lever_adam,
              "sampling": lever_sampling, "group_norm": lever_group_norm}
    for name, fn in levers.items():
        if a.only is None or name in a.only:
            result[name] = fn(a.rounds)
            print(name, json.dumps(result[name]), flush=True)
    if a.compile:
        result["compile"] = lever_compile(a.rounds)
    if a.env:
        result["env"] = lever_env(a.env_rounds, a.env_steps)
    result["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t0
    save(a.out, result)


if __name__ == "__main__":
    main()
