"""How soon `ddpm ui` shows the first denoising frame after the click, and whether it stays responsive.

    python bench/ui_latency.py                       # runs/ref-fast, ddim at 20 steps, 16 images, 2 threads
    python bench/ui_latency.py RUN --sampler dpm++2m --steps 20 --rounds 5
    python bench/ui_latency.py --screenshot docs/ui-sample.png   # also keep a picture of the sample panel

In a real headless Chromium (Debian's, through Playwright) against `ddpm ui RUN` started as a
subprocess with OMP_NUM_THREADS=2: click Sample, and read the page's own clock at the click and
when the first streamed frame arrives (window.ddpmTimings). The first click loads the model
("cold"); the next ``--rounds`` find it cached ("warm"). While each sample runs the page keeps
fetching /api/meta; the slowest round trip says whether the server answers while it samples.
The reference, measured in this process with the same threads in turns with the page: the
library's own ``generate`` until its first step (so UI overhead = first frame - first step).
Writes RESULTS/ui_latency.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: as the server (the `ddpm` command) runs

import torch  # noqa: E402
from harness import ROOT, cpu_info, save  # noqa: E402

from ddpm.config import SampleConfig  # noqa: E402
from ddpm.sampling.generate import LoadedModel, SamplingCancelled, generate, load_model  # noqa: E402
sys.path.insert(0, str(ROOT / "tests" / "ui"))  # the browser helper lives with the tests
from browser import chromium, ui_server  # noqa: E402

PING = """async () => { const t = performance.now(); await fetch('/api/meta'); return performance.now() - t; }"""


def library_first_step(model: LoadedModel, sampler: str, steps: int, n: int) -> float:
    """Seconds from calling generate to its first step's callback, the model already loaded."""
    cfg = SampleConfig(sampler=sampler, steps=steps, n=n, batch_size=n)
    t0 = time.perf_counter()
    try:
        generate(model, cfg, on_step=lambda ev: False)  # stop right after the first step
    except SamplingCancelled:
        pass
    return time.perf_counter() - t0


def one_click(pg, sampler: str, steps: int, n: int) -> dict[str, float]:
    """Click Sample; ping the server until done; the page's timings in seconds."""
    pg.select_option("#sample-form [name=sampler]", sampler)
    pg.fill("#sample-form [name=steps]", str(steps))
    pg.fill("#sample-form [name=n]", str(n))
    pg.click("#sample-go")
    pings = []
    while pg.evaluate("window.ddpmTimings.done === undefined"):
        pings.append(pg.evaluate(PING) / 1000)
        pg.wait_for_timeout(50)
        if pg.is_visible("#error"):
            sys.exit("the page showed an error: " + pg.inner_text("#error"))
    t = pg.evaluate("window.ddpmTimings")
    return {"first_frame_s": (t["firstFrame"] - t["click"]) / 1000, "done_s": (t["done"] - t["click"]) / 1000,
            "server_first_frame_s": pg.evaluate("state.frames[0].elapsed"),  # sampling thread start -> frame sent
            "max_ping_s": max(pings, default=0.0), "pings": len(pings)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default=str(ROOT / "runs" / "ref-fast"))
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--screenshot", help="PNG of the sample panel after the last round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run).resolve()
    rounds, lib = [], []
    model = load_model(run, device="cpu")
    library_first_step(model, args.sampler, args.steps, args.n)  # warm-up, as the page's cold click
    with tempfile.TemporaryDirectory() as tmp, chromium(Path(tmp) / "profile") as ctx, \
            ui_server([str(run)], Path(tmp) / "none", threads=args.threads) as url:
        pg = ctx.new_page()
        pg.goto(url)
        pg.wait_for_function("document.querySelector('#run').options.length > 0")
        cold = one_click(pg, args.sampler, args.steps, args.n)
        for _ in range(args.rounds):  # the page and the library alone, in turns
            rounds.append(one_click(pg, args.sampler, args.steps, args.n))
            lib.append(library_first_step(model, args.sampler, args.steps, args.n))
        if args.screenshot:  # part-way through the denoising: x_t still noisy, x0 already taking shape
            pg.fill("#scrub", str(args.steps * 2 // 5))
            pg.wait_for_timeout(300)
            pg.locator("#panel-sample").screenshot(path=args.screenshot)
    first = [r["first_frame_s"] for r in rounds]
    result = {
        "run": run.name, "sampler": args.sampler, "steps": args.steps, "n": args.n, "threads": args.threads,
        "cold_first_frame_s": round(cold["first_frame_s"], 3),
        "warm_first_frame_s_median": round(statistics.median(first), 3), "warm_first_frame_s_max": round(max(first), 3),
        "warm_first_frame_s_min": round(min(first), 3),
        "server_first_frame_s_median": round(statistics.median(r["server_first_frame_s"] for r in rounds), 3),
        "library_first_step_s_median": round(statistics.median(lib), 3),
        "ui_overhead_s_median": round(statistics.median(f - s for f, s in zip(first, lib)), 3),
        "done_s_median": round(statistics.median(r["done_s"] for r in rounds), 3),
        "max_ping_while_sampling_s": round(max(r["max_ping_s"] for r in rounds + [cold]), 3),
        "rounds": rounds, "cold": cold, "cpu": cpu_info(), "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "command": "python bench/ui_latency.py " + " ".join(sys.argv[1:]),
    }
    save("ui_latency", result)


if __name__ == "__main__":
    main()
