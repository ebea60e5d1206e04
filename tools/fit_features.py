"""Train the Fashion-MNIST feature net shipped in ddpm/assets and record its test accuracy.

    PYTHONPATH=src python tools/fit_features.py            # train, test, write the assets
    PYTHONPATH=src python tools/fit_features.py --val 5000 --no-save   # tune on a held-out slice

Writes src/ddpm/assets/fmnist_features.{safetensors,json} and bench/results/shipped/fit_features.json
(a record committed with the asset it describes).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ddpm.data import load_fashion_mnist, load_fashion_mnist_labels
from ddpm.evaluation.features import (ASSET_NAME, FeatureNetConfig, fit_classifier, num_parameters,
                           save_feature_net)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' record helpers
from harness import PUBLISHED, ROOT, write_record  # noqa: E402

ASSET = ROOT / "src" / "ddpm" / "assets" / f"{ASSET_NAME}.safetensors"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shift", type=int, default=2)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--convs", type=int, nargs="+", default=[1, 2, 1])
    p.add_argument("--val", type=int, default=0, help="hold out the last N training images and "
                   "report accuracy on them instead of the test split (for tuning)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); "
                   "1 is fastest when other jobs share the CPU")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--out", type=Path, default=ASSET)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = load_fashion_mnist("train", args.data), load_fashion_mnist_labels("train", args.data)
    if args.val:
        x, y, x_eval, y_eval, eval_name = x[:-args.val], y[:-args.val], x[-args.val:], y[-args.val:], "val"
    else:
        x_eval, y_eval = load_fashion_mnist("test", args.data), load_fashion_mnist_labels("test", args.data)
        eval_name = "test"
    config = FeatureNetConfig(widths=tuple(args.widths), convs_per_stage=tuple(args.convs))
    print(f"training on {len(x)} images, {torch.get_num_threads()} threads, {config}")
    t0 = time.perf_counter()
    net, acc = fit_classifier(x, y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, test_images=x_eval, test_labels=y_eval,
                              max_shift=args.max_shift, config=config, log=print)
    seconds = time.perf_counter() - t0
    recipe = net.meta.recipe
    print(f"{eval_name} accuracy {acc:.4f}; {num_parameters(net)} parameters; fit {recipe.seconds:.0f} s "
          f"wall, {recipe.cpu_seconds:.0f} s CPU; with loading and testing {seconds:.0f} s")
    record = {"eval_split": eval_name, "accuracy": acc, "fit_seconds": round(seconds, 1),
              "parameters": num_parameters(net), "threads": torch.get_num_threads(),
              "config": asdict(config), "recipe": asdict(net.meta.recipe)}
    if not args.no_save and not args.val:
        meta = replace(net.meta, notes="tools/fit_features.py; accuracy on the 10k test split; "
                                       "features: the BN'd pre-ReLU penultimate layer")
        save_feature_net(net, args.out, meta)
        record["weights_bytes"] = args.out.stat().st_size
        print(f"wrote {args.out} ({record['weights_bytes']} bytes) and {args.out.with_suffix('.json')}")
    write_record(PUBLISHED / "shipped" / "fit_features.json", record)


if __name__ == "__main__":
    main()
