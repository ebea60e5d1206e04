"""The benchmark runner: one scenario shape, suites of scenarios, one summary.

    python bench/run.py                  # the quick suite (`make bench`): minutes
    python bench/run.py full             # every scenario at the settings its committed record used
    python bench/run.py throughput-quick sampler-oracle-quick --out DIR
    python bench/run.py --list

Each scenario runs one script of ``bench/`` in its own process (so that one's threads, allocator
and imports do not touch the next), with its records sent to ``--out`` (default
``bench/out/bench-TIME/``, never the committed ``bench/results/``). A scenario that needs what
this machine lacks (the seed's code for the ratios against it, the Fashion-MNIST files) is
skipped with the reason. The runner writes ``summary.json`` (a record of the same schema as every
benchmark's, with each scenario's status, wall time and headline figures) and prints the
headlines as a table. To publish a record for the results page, run its script with
``DDPM_BENCH_PUBLISH=1`` and commit what it wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import OUT, REFERENCE, ROOT, suite_of, write_record  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    """One benchmark invocation: ``python bench/SCRIPT ARGS``, the record it writes (a file name
    in its suite's folder) and the figures to show from it (label -> key path in the record)."""

    name: str
    script: str
    args: tuple[str, ...]
    record: str
    headline: dict[str, tuple[str, ...]] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # "reference" (the seed's code), "fashion-mnist" (its files)


THROUGHPUT = {"training step, ours / seed code (fp32)": ("train", "ratio"),
              "200-step sampling, ours / seed code (fp32, channels-last)": ("sample", "ratio_channels_last")}
ORACLE = {f"{s} at its default steps: worst |std error| over the schedules": ("worst_over_schedules", f"{s} uniform",
                                                                               "default", "std")
          for s in ("ddim", "dpm++2m", "heun")}

SCENARIOS = [
    Scenario("throughput-quick", "throughput.py", ("--threads", "2", "--train-rounds", "3", "--sample-rounds", "3",
                                                   "--sample-iters", "2", "--skip", "memory", "--bf16", "no",
                                                   "--out", "throughput-quick"),
             "throughput-quick.json", THROUGHPUT, ("reference", "fashion-mnist")),
    Scenario("sampler-oracle-quick", "sampler_oracle.py", ("--T", "200", "--n", "2000", "--out", "{out}/samplers/"
                                                           "sampler_oracle-quick.json"),
             "sampler_oracle-quick.json", ORACLE),
    Scenario("throughput", "throughput.py", ("--threads", "2", "--out", "throughput"), "throughput.json",
             THROUGHPUT, ("reference", "fashion-mnist")),
    Scenario("sampler-oracle", "sampler_oracle.py", ("--out", "{out}/samplers/sampler_oracle.json"),
             "sampler_oracle.json", ORACLE),
    Scenario("levers", "levers.py", ("--threads", "2"), "levers.json", {}, ("fashion-mnist",)),
    Scenario("guidance-cost", "guidance_cost.py", ("--malloc", "command"), "guidance_cost_command.json",
             {"guided / unguided time per image": ("slowdown",)}),
    Scenario("eval-floor", "eval_floor.py", (), "eval_floor.json", {}, ("fashion-mnist",)),
]
SUITES = {"quick": ["throughput-quick", "sampler-oracle-quick"],
          "full": ["throughput", "sampler-oracle", "levers", "guidance-cost", "eval-floor"]}
BY_NAME = {s.name: s for s in SCENARIOS}


def missing(s: Scenario) -> str | None:
    """Why this machine cannot run ``s`` (None: it can)."""
    if "reference" in s.needs and not REFERENCE.is_file():
        return f"the seed's code is not at {REFERENCE} (set SEED_REFERENCE)"
    if "fashion-mnist" in s.needs:
        from ddpm.data import find_fashion_mnist
        from ddpm.errors import DdpmError

        try:
            find_fashion_mnist(None, download=False)
        except DdpmError as e:
            return str(e)
    return None


def dig(record: dict, path: tuple[str, ...]) -> object:
    for key in path:
        record = record[key]
    return record


def run(s: Scenario, out: Path) -> dict:
    why = missing(s)
    if why:
        return {"status": "skipped", "why": why}
    argv = [sys.executable, str(ROOT / "bench" / s.script), *(a.format(out=out) for a in s.args)]
    log = out / "logs" / f"{s.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "DDPM_BENCH_RESULTS": str(out)}).returncode
    wall = round(time.perf_counter() - t0, 1)
    if code:
        return {"status": "failed", "exit": code, "wall_s": wall, "log": str(log)}
    path = out / suite_of(s.script) / s.record
    record = json.loads(path.read_text())
    figures = {label: dig(record, p) for label, p in s.headline.items()}
    return {"status": "ok", "wall_s": wall, "record": str(path.relative_to(out)), "headline": figures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["quick"], help="suites (quick, full) or scenarios")
    ap.add_argument("--out", type=Path, help="folder for the records (default bench/out/bench-TIME)")
    ap.add_argument("--list", action="store_true", help="list the suites and scenarios")
    a = ap.parse_args()
    if a.list:
        for suite, names in SUITES.items():
            print(f"{suite}: {', '.join(names)}")
        return 0
    unknown = [n for n in a.names if n not in SUITES and n not in BY_NAME]
    if unknown:
        print(f"error: unknown suite or scenario {unknown[0]!r}; choose from "
              f"{', '.join([*SUITES, *BY_NAME])}", file=sys.stderr)
        return 2
    names = [m for n in a.names for m in SUITES.get(n, [n])]
    out = (a.out or OUT / f"bench-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        print(f"bench: {name} ...", flush=True)
        results[name] = run(BY_NAME[name], out)
        print(f"bench: {name}: {results[name]['status']} {results[name].get('why', '')}".rstrip(), flush=True)
    write_record(out / "summary.json", {"scenarios": results})
    for name, r in results.items():
        for label, value in r.get("headline", {}).items():
            print(f"  {name:22s} {label}: {value:.3g}" if isinstance(value, float) else f"  {name}: {label}: {value}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
