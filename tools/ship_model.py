"""Put a trained run into the package as a shipped model (``ddpm sample fashion-mnist``).

    python tools/ship_model.py runs/box --name fashion-mnist [--eval-n 1000] [--guide CHECKPOINT]
    python tools/ship_model.py --guide runs/small/checkpoints/step-00000400   # add a guide only

Writes ``src/ddpm/assets/models/NAME/``: the run's ``config.json`` and ``log.jsonl`` and one
sampling-only checkpoint (the EMA weights as ``model.safetensors``, its config and checksums;
no optimiser state), then scores it with ``ddpm eval`` at the defaults of dpm++2m and writes
``bench/results/shipped/shipped_model.json`` (a record committed with the asset it describes). ``--guide`` puts a guiding model for autoguidance in
``NAME/guide`` the same way (a weaker model of the same kind: checked, as ``--guiding-model``
is). The folder must stay under 5 MB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from ddpm.checkpoint import FORMAT_VERSION, GUIDE, _sha256, load_checkpoint, save_snapshot
from ddpm.errors import DdpmError
from ddpm.sampling.generate import check_guide
from ddpm.sampling.pretrained import ASSETS
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benchmarks' record helpers
from harness import PUBLISHED, cpu_info, write_record  # noqa: E402


def add_guide(guide: Path, name: str) -> Path:
    """NAME/guide: autoguidance's guiding model (its EMA weights), checked to be of the shipped
    model's kind; written as training writes RUN/guide."""
    dest = ASSETS / name
    ck = load_checkpoint(guide)
    check_guide(load_checkpoint(dest).config, ck.config, guide)
    return save_snapshot(dest / GUIDE, config=ck.config, step=ck.step, model=ck.sampling_weights(True), ema=None)


def ship(run: Path, name: str) -> Path:
    ck = load_checkpoint(run)
    dest = ASSETS / name
    tmp = Path(tempfile.mkdtemp(dir=ASSETS.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the shipped folder unreadable to other users
    step_dir = tmp / "checkpoints" / f"step-{ck.step:08d}"
    step_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ck.sampling_weights(True).items()}, str(step_dir / "model.safetensors"))
    (step_dir / "model.safetensors").chmod(0o644)
    (step_dir / "config.json").write_text(ck.config.to_json())
    meta = {"format_version": FORMAT_VERSION, "step": ck.step,
            "sha256": {f: _sha256(step_dir / f) for f in ("model.safetensors", "config.json")}}
    (step_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "latest").write_text(step_dir.name)
    shutil.copy(run / "config.json", tmp / "config.json")
    shutil.copy(run / "log.jsonl", tmp / "log.jsonl")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", help="the run to ship (leave out with --guide: add a guide only)")
    ap.add_argument("--name", default="fashion-mnist")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--guide", type=Path, help="a checkpoint to ship as NAME/guide (autoguidance's guiding model)")
    args = ap.parse_args()
    if args.run is None and args.guide is None:
        ap.error("give a run to ship, --guide, or both")
    ASSETS.mkdir(parents=True, exist_ok=True)
    dest = ship(args.run, args.name) if args.run is not None else ASSETS / args.name
    if args.guide is not None:
        try:
            print(f"guide: {add_guide(args.guide, args.name)}")
        except DdpmError as e:  # no such checkpoint, or a guide of another kind: one line
            sys.exit(f"error: {e}")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"shipped {dest} ({size / 1e6:.2f} MB)")
    if size > 5e6:
        sys.exit(f"error: {dest} is {size / 1e6:.2f} MB, over the 5 MB budget")
    if args.run is None:
        return  # the model itself is unchanged: its figures stand
    log = [json.loads(line) for line in (dest / "log.jsonl").read_text().splitlines() if line.strip()]
    out = Path(tempfile.mkdtemp())
    ddpm = str(Path(sys.executable).parent / "ddpm")
    report = {"model": args.name, "size_mb": round(size / 1e6, 3), "cpu": cpu_info(),
              "trained_steps": load_checkpoint(dest).step,
              "train_log_last": log[-1] if log else None, "evals": {}}
    for guidance in ("0", "1"):
        cmd = [ddpm, "eval", args.name, "--sampler", "dpm++2m", "--n", str(args.eval_n), "--out", str(out / guidance),
               "--no-progress"] + (["--class", "all", "--guidance", guidance] if load_checkpoint(dest).config.model.num_classes else [])
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        report["evals"][guidance] = [json.loads(f.read_text()) for f in sorted((out / guidance).glob("*.json"))]
    write_record(PUBLISHED / "shipped" / "shipped_model.json", report)


if __name__ == "__main__":
    main()
