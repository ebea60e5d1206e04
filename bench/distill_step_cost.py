"""The cost of one distillation step, progressive against consistency, in one process and in
turns (the same teacher, data and batch; 3 warm-up steps, then ``--steps`` timed, ``--rounds``
rounds), beside a training step of the teacher's own recipe.

    PYTHONPATH=src python bench/distill_step_cost.py src/ddpm/assets/models/fashion-mnist

Writes RESULTS/distill_step_cost.json: seconds per step, the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, cpu_info, write_record

from ddpm.checkpoint import load_checkpoint
from ddpm.training.distill import ConsistencyDistiller, DistillConfig, Distiller, student_config
from ddpm.training.train import Trainer, _load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("teacher")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tck = load_checkpoint(a.teacher)
    kinds = {"progressive": Distiller, "consistency": ConsistencyDistiller, "training": Trainer}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, kind in kinds.items():
                d = DistillConfig(a.teacher, method="progressive" if name == "training" else name, teacher_steps=16,
                                  student_steps=4, steps_per_round=125)
                cfg = student_config(tck.config, d) if name != "training" else tck.config
                data, labels = _load_data(cfg)
                run = Path(tmp) / f"{name}-{r}"
                if name == "training":
                    tr = Trainer(cfg, run, data, torch.device("cpu"), labels=labels)
                else:
                    tr = kind(cfg, run, data, torch.device("cpu"), d, tck.sampling_weights(True), labels)
                for _ in range(3):
                    tr.train_step()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    tr.train_step()
                times[name].append((time.perf_counter() - t0) / a.steps)
    res = {"command": " ".join(["python", "bench/distill_step_cost.py", *sys.argv[1:]]), "cpu": cpu_info(),
           "threads": torch.get_num_threads(), "batch_size": tck.config.train.batch_size,
           "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
           "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()}}
    res["over_training_step"] = {k: v / res["seconds_per_step"]["training"] for k, v in res["seconds_per_step"].items()}
    write_record(RESULTS / "distill_step_cost.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
