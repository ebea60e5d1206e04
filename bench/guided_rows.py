"""Per-row time of one network forward at several batch sizes (the rows of a guided pass are
twice an unguided one's): does a bigger pass cost more per row?

    python bench/guided_rows.py --run fashion-mnist --threads 2

Median of 5 timed forwards after one warm-up, inference mode, channels-last fp32, random x_t,
t and class labels. Writes RESULTS/guided_rows.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from harness import cpu_info, save
from ddpm.sampling.generate import load_model


def ms_per_row(m, rows, repeats: int = 5) -> dict[int, float]:
    """Median ms per row of one forward of ``m.net`` at each batch size in ``rows`` (one
    warm-up each; inference mode, channels-last fp32, random x_t, t and class labels)."""
    c, size, T = m.config.model.channels, m.config.data.image_size, m.schedule.T
    k = m.config.model.num_classes
    out = {}
    with torch.inference_mode():
        for b in rows:
            x = torch.randn(b, c, size, size).contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, T, (b,))
            y = torch.randint(0, k + 1, (b,)) if k else None
            m.net(x, t, y)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.net(x, t, y)
                times.append(time.perf_counter() - t0)
            out[b] = 1e3 * statistics.median(times) / b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="fashion-mnist")
    ap.add_argument("--rows", default="50,100,200,250,400,500")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = load_model(a.run)
    out = ms_per_row(m, (int(v) for v in a.rows.split(",")))
    for b, ms in out.items():
        print(f"{b} rows: {ms:.3f} ms per row", flush=True)
    save("guided_rows", {"run": a.run, "step": m.step, "threads": a.threads, "cpu": cpu_info(),
                         "load_average": os.getloadavg()[0], "ms_per_row": out})


if __name__ == "__main__":
    main()
