"""What `--precision auto` decides on this machine, and the ratios its trial saw.

    python bench/precision_trial.py                     # the demo's network (fast-cond), natively
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/precision_trial.py   # as an AVX2 CPU

For the demo's network (`--preset fast-cond`) at its training batch and at a sampling batch, runs
auto's own trial (ddpm.runtime.precision.time_trial: bf16 and fp32 in turns on the network, the
median ratio) ``--repeats`` times, so the spread of the trial itself shows, and reports what
auto would choose. Where bf16 is not a candidate (not native, or the kernels capped below it)
auto takes fp32 without a trial; the script times it anyway so the ratio is on record.
Writes precision_trial.json (harness.RESULTS), or ``--out PATH``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, cpu_info, write_record  # noqa: E402

from ddpm.config import preset  # noqa: E402
from ddpm.nn import build_network  # noqa: E402
from ddpm.runtime import precision as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast-cond")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="trials per shape")
    ap.add_argument("--name", default="precision_trial")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: harness.RESULTS/NAME.json)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = preset(a.preset)
    torch.manual_seed(0)
    net = build_network(cfg.model)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    size, c, k = cfg.data.image_size, cfg.model.channels, cfg.model.num_classes
    cpu = torch.device("cpu")
    candidate = P.native_bf16(cpu)
    rows = []
    for what, batch, training in (("training step", cfg.train.batch_size, True), ("sampler step", 16, False)):
        trial = P.Trial(net.train(training), (batch, c, size, size), training, k, cfg.train.channels_last)
        t0 = time.perf_counter()
        ratios = [P.time_trial(trial, cpu) for _ in range(a.repeats)]
        seconds = (time.perf_counter() - t0) / a.repeats
        median = statistics.median(ratios)
        rows.append({"what": what, "batch_timed": min(batch, P.TRIAL_BATCH), "bf16_speed_over_fp32": ratios,
                     "median": round(median, 3), "trial_seconds": round(seconds, 2),
                     "auto_chooses": ("bf16" if median >= P.TRIAL_MARGIN else "fp32") if candidate else
                     "fp32 (bf16 not a candidate here: no trial)"})
        print(f"{what}: bf16 {median:.2f}x fp32 (trials {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"{seconds:.1f} s each) -> auto: {rows[-1]['auto_chooses']}", flush=True)
    write_record(a.out or RESULTS / f"{a.name}.json", {"preset": a.preset, "threads": a.threads, "margin": P.TRIAL_MARGIN,
                                              "bf16_candidate": candidate, "cpu": cpu_info(), "rows": rows})


if __name__ == "__main__":
    main()
