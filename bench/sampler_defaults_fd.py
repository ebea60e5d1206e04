"""FD-FMNIST of a trained model at each sampler's new defaults and at its old ones.

The defaults (samplers.SAMPLERS) were chosen on the Gaussian oracle (bench/sampler_oracle.py);
this checks them on a real model. Each row is one `ddpm eval RUN --sampler X ... --n N` run in
this process, so every row shares the model, the reference statistics and the seed. The old
dpm++2m default (uniform spacing, a second-order step into t = 0) is no longer in the table, so
it runs as an extra table entry, ``dpm++2m@old``, registered here only.

    python bench/sampler_defaults_fd.py runs/ref-fast --n 1000
Writes RESULTS/sampler_defaults_fd.json (eval reports under bench/out/sampler_defaults_fd/).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import OUT, RESULTS, write_record  # noqa: E402

from ddpm.cli import main as ddpm_main  # noqa: E402
from ddpm.samplers import SAMPLERS, dpmpp_2m  # noqa: E402

SAMPLERS["dpm++2m@old"] = SAMPLERS["dpm++2m"]._replace(
    fn=partial(dpmpp_2m.sample, lower_order_final=False), default_spacing="uniform",
    summary="the old default: uniform spacing, second-order step into t = 0")

# (row name, what it is, extra ddpm eval flags)
ROWS: list[tuple[str, str, list[str]]] = [  # in order of importance: a slow machine runs the first ones
    ("dpm++2m new", "new default: 20 quadratic, last step first order", ["--sampler", "dpm++2m"]),
    ("dpm++2m old", "old default: 20 uniform, second-order last step", ["--sampler", "dpm++2m@old"]),
    ("ddim new", "new default: 50 quadratic, eta 0", ["--sampler", "ddim"]),
    ("ddim old", "old default: 50 uniform, eta 0", ["--sampler", "ddim", "--spacing", "uniform"]),
    ("heun new = old", "default (unchanged): 10 uniform", ["--sampler", "heun"]),
    ("ddpm 50 new", "ddpm --steps 50 at the new default spacing (quadratic)", ["--sampler", "ddpm", "--steps", "50"]),
    ("ddpm 50 old", "ddpm --steps 50 at the old default spacing (uniform)",
     ["--sampler", "ddpm", "--steps", "50", "--spacing", "uniform"]),
    ("dpm++2m trailing", "alternative: 20 trailing, last step first order",
     ["--sampler", "dpm++2m", "--spacing", "trailing"]),
    ("heun trailing", "alternative: 10 trailing", ["--sampler", "heun", "--spacing", "trailing"]),
]
FULL_DDPM = ("ddpm new = old", "default (all T; every spacing is the same grid)", ["--sampler", "ddpm"])


def run_row(run: str, flags: list[str], n: int, out: Path) -> dict:
    argv = ["eval", run, *flags, "--n", str(n), "--out", str(out)]
    t0 = time.perf_counter()
    if ddpm_main(argv) != 0:
        raise SystemExit(f"ddpm {' '.join(argv)} failed")
    report = json.loads(next(out.glob("eval-*.json")).read_text())
    return {"command": "ddpm " + " ".join(argv), "seconds": round(time.perf_counter() - t0, 1), "report": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a trained run folder (not modified)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--full-ddpm", action="store_true", help="also ddpm at its default, all T steps (slow)")
    p.add_argument("--only", help="comma-separated row names to run (default: all)")
    p.add_argument("--out", default=str(RESULTS / "sampler_defaults_fd.json"))
    a = p.parse_args()
    rows = ROWS + ([FULL_DDPM] if a.full_ddpm else [])
    if a.only:
        rows = [r for r in rows if r[0] in a.only.split(",")]
    path = Path(a.out)
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    doc.update({"what": "FD-FMNIST (and KID, precision/recall) of one trained model at each sampler's "
                        "new and old defaults, one seed, fp32", "run": a.run, "n": a.n,
                "command": "python " + " ".join(sys.argv), "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": torch.get_num_threads()})
    for name, what, flags in rows:
        out = OUT / "sampler_defaults_fd" / name.replace(" ", "_").replace("=", "eq")
        for old in out.glob("eval-*.json"):
            old.unlink()
        r = run_row(a.run, flags, a.n, out)
        doc["rows"][name] = {"what": what, **r}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_record(path, doc, indent=1)  # after every row: a long run keeps what it measured
        print(f"{name}: FD {r['report'].get('fd')} ({r['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
