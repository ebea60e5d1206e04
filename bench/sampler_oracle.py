"""The samplers' error on the Gaussian oracle, against steps, spacing and final-step order.

For data N(MU, SD^2) per dimension the optimal denoiser is known in closed form (DESIGN.md,
"Tests"), so a sampler driven by it should return MU and SD; what it returns instead is its own
discretisation error. Every sampler, every spacing, the final-step order of the second-order
samplers (``lower_order_final``), the four schedules at T = 200 (seed preset), 500 (fast preset)
and 1000, and steps 1 ... 100 plus each sampler's default.

The deterministic samplers (ddim with eta 0, dpm++2m, heun) are affine maps of x_T under the
oracle, so three points x_T = m_T + s_T z, z in {-1, 0, 1}, give their output mean and std
exactly (no Monte Carlo error); ddpm is stochastic and is measured on ``--n`` draws. x_T comes
from the exact marginal q(x_T) = N(m_T, s_T^2), so the prior mismatch of a schedule whose
alpha_bar_T is not ~0 (linear T = 200: 0.13) does not enter: the figures are the sampler's alone.

    python bench/sampler_oracle.py                      # every T: the committed record
    python bench/sampler_oracle.py --T 200 --n 2000     # the quick suite's share
Writes sampler_oracle.json (harness.RESULTS) and bench/out/sampler_oracle.png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import OUT, RESULTS, write_record  # noqa: E402

from ddpm.core.diffusion import Denoiser  # noqa: E402
from ddpm.core.schedules import SPACINGS, NoiseSchedule, space_timesteps  # noqa: E402
from ddpm.samplers import SAMPLERS, SamplerOptions, ddim, ddpm, dpmpp_2m, heun  # noqa: E402

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
TS = (200, 500, 1000)  # the seed preset's T, the fast preset's T, and the usual 1000
STEPS = (1, 2, 4, 5, 10, 20, 50, 100)
# (name, the sampler function with its final-step order, stochastic)
VARIANTS: dict[str, tuple[Callable, bool]] = {
    "ddpm": (ddpm.sample, True),
    "ddim": (ddim.sample, False),
    "dpm++2m": (partial(dpmpp_2m.sample, lower_order_final=False), False),
    "dpm++2m/lof": (partial(dpmpp_2m.sample, lower_order_final=True), False),
    "heun": (partial(heun.sample, lower_order_final=False), False),
    "heun/lof": (partial(heun.sample, lower_order_final=True), False),
}


def oracle(s: NoiseSchedule, mu: float, sd: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """E[eps | x_t] for data N(mu, sd^2): sqrt(1 - a)(x - sqrt(a) mu) / (a sd^2 + 1 - a), in float64."""
    ab = s.alpha_bar.double()

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].reshape(-1, *([1] * (x.ndim - 1)))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sd**2 + 1 - a)).float()

    return net


def moments(fn: Callable, stochastic: bool, s: NoiseSchedule, ts: list[int], mu: float, sd: float,
            n: int, seed: int) -> tuple[float, float]:
    """(mean, std) of the sampler's output under the oracle, x_T from the exact q(x_T)."""
    aT = float(s.alpha_bar.double()[ts[-1]])
    m_T, s_T = math.sqrt(aT) * mu, math.sqrt(aT * sd**2 + 1 - aT)
    d = Denoiser(oracle(s, mu, sd), s)
    if stochastic:
        z = torch.randn((n, 1, 1, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:  # an affine map out = b + A z: a least-squares line through 65 points gives b and A
        z = torch.linspace(-2, 2, 65, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x = fn(d, (m_T + s_T * z).float(), ts, options=SamplerOptions(),
           generator=torch.Generator().manual_seed(seed + 1)).double().flatten()
    if stochastic:
        return x.mean().item(), x.std().item()
    # float32 arithmetic rounds eps -> x0 at alpha_bar ~ 1e-9 (cosine, t = T-1) to ~1e-3; the
    # fit averages it out, and the residual checks the map is affine up to that rounding
    zf = z.flatten()
    slope = ((zf * (x - x.mean())).sum() / (zf * zf).sum()).item()
    resid = (x - x.mean() - slope * zf).abs().max().item()
    assert resid < 1e-2 * (1 + abs(slope)), f"not affine: residual {resid}"
    return x.mean().item(), abs(slope)


def default_steps(name: str, T: int) -> int:
    return min(SAMPLERS[name.split("/")[0]].default_steps or T, T)


def sweep(mu: float, sd: float, n: int, ts: tuple[int, ...] = TS) -> list[dict]:
    rows = []
    for T in ts:
        for sched in SCHEDULES:
            s = NoiseSchedule.create(sched, T)
            for name, (fn, stochastic) in VARIANTS.items():
                steps_list = sorted({k for k in STEPS if k <= T} | {default_steps(name, T)})
                seen: dict[tuple[int, ...], tuple[float, float]] = {}  # at steps = T every spacing is all T
                for spacing in SPACINGS:
                    for steps in steps_list:
                        ts = space_timesteps(T, steps, spacing)
                        if tuple(ts) not in seen:
                            seen[tuple(ts)] = moments(fn, stochastic, s, ts, mu, sd, n, seed=steps)
                        m, sdev = seen[tuple(ts)]
                        rows.append({"schedule": sched, "T": T, "sampler": name, "spacing": spacing,
                                     "steps": steps, "mean": m, "std": sdev,
                                     "mean_err": (m - mu) / sd, "std_err": sdev / sd - 1})
            print(f"T={T} {sched}: done", flush=True)
    return rows


def table(rows: list[dict]) -> dict:
    """rows -> {sampler: {spacing: {"schedule T": {steps: [mean_err, std_err]}}}} (compact JSON)."""
    out: dict = {}
    for r in rows:
        cell = out.setdefault(r["sampler"], {}).setdefault(r["spacing"], {}).setdefault(f"{r['schedule']} {r['T']}", {})
        cell[str(r["steps"])] = [round(r["mean_err"], 5), round(r["std_err"], 5)]
    return out


def worst(tab: dict) -> dict:
    """Per sampler variant and spacing, at each step count and at the sampler's default steps:
    the largest |std error| and |mean error| over the 12 schedules (four schedules x three T)."""
    out: dict = {}
    for name, by_spacing in tab.items():
        for spacing, by_sched in by_spacing.items():
            acc: dict[str, list[float]] = {}
            for sched, by_steps in by_sched.items():
                T = int(sched.split()[1])
                for steps, (me, se) in by_steps.items():
                    keys = [steps] + (["default"] if int(steps) == default_steps(name, T) else [])
                    for k in keys:
                        a = acc.setdefault(k, [0.0, 0.0])
                        a[0], a[1] = max(a[0], abs(se)), max(a[1], abs(me))
            out[f"{name} {spacing}"] = {k: {"std": round(v[0], 4), "mean": round(v[1], 4)} for k, v in acc.items()}
    return out


def plot(tab: dict, path: Path) -> None:
    """std error against steps, one panel per sampler variant, the three spacings in colour,
    the four schedules at the largest T measured as four lines each (x: log10 of the steps)."""
    import numpy as np

    from ddpm.pictures.plots import Panel, Series, render

    colours = {"uniform": "#1f77b4", "quadratic": "#ff7f0e", "trailing": "#2ca02c"}
    big = max(int(k.split()[1]) for by_spacing in tab.values() for by_sched in by_spacing.values() for k in by_sched)
    panels = []
    for name, by_spacing in tab.items():
        series = []
        for spacing, by_sched in by_spacing.items():
            for k, sched in enumerate(SCHEDULES):
                pts = sorted((int(st), v[1]) for st, v in by_sched[f"{sched} {big}"].items() if int(st) > 1)
                x = np.log10([p[0] for p in pts])
                y = np.clip(100 * np.array([p[1] for p in pts]), -40, 40)
                series.append(Series(x, y, spacing if k == 0 else None, colours[spacing], 1.5))
        panels.append(Panel(name, "log10(steps)", "std error, % (clipped to +-40)", series, hline=0.0))
    img = render(panels, columns=3, size=(1500, 900),
                 title=f"Samplers on the Gaussian oracle: std error against steps (T = {big}, four schedules)")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mu", type=float, default=0.3)
    p.add_argument("--sd", type=float, default=0.5)
    p.add_argument("--n", type=int, default=20_000, help="ddpm's draws per setting (Monte Carlo)")
    p.add_argument("--T", default=",".join(map(str, TS)), help="chain lengths, comma-separated")
    p.add_argument("--out", default=str(RESULTS / "sampler_oracle.json"))
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out's JSON")
    a = p.parse_args()
    png = OUT / "sampler_oracle.png"
    if a.plot_only:
        plot(json.loads(Path(a.out).read_text())["table"], png)
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tab = table(sweep(a.mu, a.sd, a.n, tuple(int(t) for t in a.T.split(","))))
    doc = {"what": "sampler error on the Gaussian oracle N(mu, sd^2): table[sampler][spacing]['schedule T']"
                   "[steps] = [mean_err, std_err], mean_err = (mean - mu)/sd, std_err = std/sd - 1; "
                   "deterministic samplers exact (affine fit), ddpm Monte Carlo; '/lof': lower_order_final",
           "command": "python " + " ".join(sys.argv), "mu": a.mu, "sd": a.sd, "ddpm_n": a.n,
           "ddpm_std_se": 1 / math.sqrt(2 * a.n), "T": a.T, "objective": "eps", "clip": "none", "x_T": "exact q(x_T)",
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "seconds": round(time.perf_counter() - t0, 1), "worst_over_schedules": worst(tab), "table": tab}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_record(Path(a.out), doc, indent=1)
    plot(tab, png)
    print(f"wrote {a.out} and {png} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
