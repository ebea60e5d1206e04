"""FD cost of sampling through another engine: a trained run sampled by the same sampler from the
same seeds with its network run by eager PyTorch fp32 and by `--engine openvino|openvino-int8`.

    python bench/engine_fd.py RUN --engines openvino-int8 --sampler ddpm --steps 100 --n 1000 --name NAME

Each engine is the library's own (:func:`ddpm.engines.with_engine`, what `ddpm sample --engine`
runs; int8 calibrated on the requested sampling's own network inputs); only the network changes
between contenders: sampler, schedule, per-image seeds and scoring are the library's
(:func:`ddpm.sampling.generate`, :func:`ddpm.evaluation.evaluate_images`). Unconditional runs.
Writes RESULTS/NAME.json with each engine's FD, its ratio to eager fp32's and the seconds
each took (sampling and scoring; int8's includes its calibration).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from harness import RESULTS, cpu_info, write_record

from ddpm.config import SampleConfig
from ddpm.engines import ENGINES, with_engine
from ddpm.evaluation.evaluate import evaluate_images
from ddpm.sampling.generate import generate, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--engines", default="openvino-int8", help="comma-separated of openvino, openvino-int8")
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", required=True, help="RESULTS/NAME.json")
    a = ap.parse_args()
    wanted = a.engines.split(",")
    unknown = set(wanted) - set(ENGINES[1:])
    if unknown:
        sys.exit(f"unknown engine(s): {', '.join(sorted(unknown))}")
    torch.set_num_threads(a.threads)
    lm = load_model(a.run, device="cpu")
    if lm.config.model.num_classes:
        sys.exit("engine_fd.py takes unconditional runs only")
    sc = SampleConfig(sampler=a.sampler, steps=a.steps, n=a.n, batch_size=250, seed=a.seed, clip="clip")
    rows = {}
    for name in ["eager_fp32", *wanted]:
        t0 = time.perf_counter()
        s = generate(lm if name == "eager_fp32" else with_engine(dataclasses.replace(lm), name, sc), sc)
        rep = evaluate_images(s.images, seed=a.seed)
        rows[name] = {"fd_fmnist": round(rep.fd, 3), "fd_floor": round(rep.fd_reference, 3),
                      "kid": round(rep.kid_mean, 4), "precision": round(rep.precision, 3),
                      "recall": round(rep.recall, 3), "sample_seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(rows[name]), flush=True)
    for name in wanted:
        rows[name]["fd_over_eager_fp32"] = round(rows[name]["fd_fmnist"] / rows["eager_fp32"]["fd_fmnist"], 4)
    out = RESULTS / f"{a.name}.json"
    write_record(out, {"command": "python bench/engine_fd.py " + " ".join(sys.argv[1:]), "run": a.run,
                               "train_step": lm.step, "sampler": a.sampler, "steps": a.steps, "n": a.n,
                               "seed": a.seed, "machine": {"threads": a.threads, **cpu_info()},
                               "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
