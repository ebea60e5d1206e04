"""The evaluation's yardsticks, measured: the shipped feature net's accuracy on the Fashion-MNIST
test split, and the real-data floor of FD-FMNIST (n real training images against the test
set's statistics, as every `ddpm eval` report's ``fd_reference``) at several n.

    python bench/eval_floor.py                      # n = 500, 1000, 10000; a few minutes on one core
Writes RESULTS/eval_floor.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from harness import cpu_info, save

from ddpm.data import load_fashion_mnist, load_fashion_mnist_labels
from ddpm.evaluation.evaluate import ReferenceStats, floor_fd
from ddpm.evaluation.metrics import gaussian_stats
from ddpm.evaluation.features import default_feature_net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="500,1000,10000", help="comma-separated sample counts for the floor")
    ap.add_argument("--seed", type=int, default=0, help="which training images the floor draws (as `ddpm eval --seed`)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    net = default_feature_net()
    test, labels = load_fashion_mnist("test"), load_fashion_mnist_labels("test")
    embedded = net.embed_and_classify(test)  # one pass: the accuracy and the reference statistics
    accuracy = (embedded.logits.argmax(dim=1) == labels).double().mean().item()
    ref = ReferenceStats(embedded.features, *gaussian_stats(embedded.features))  # as reference_stats builds it
    pool = load_fashion_mnist("train")
    floors = {n: floor_fd(net, pool, n, ref, seed=a.seed, cache=False)
              for n in (int(v) for v in a.n.split(",") if v)}
    save("eval_floor", {
        "command": "python " + " ".join(sys.argv),
        "feature_net_test_accuracy": accuracy, "test_images": len(labels),
        "feature_net_recorded_accuracy": net.meta.test_accuracy,
        "fd_floor": {str(n): fd for n, fd in floors.items()}, "floor_seed": a.seed,
        "what": "FD of n real Fashion-MNIST training images against the 10k test images' statistics",
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), **cpu_info()},
        "seconds": round(time.perf_counter() - t0, 1),
    })


if __name__ == "__main__":
    main()
