#!/usr/bin/env bash
# The seed recipe on a CUDA GPU: side-by-side throughput against the seed's own code, the wall
# time of `ddpm train --preset seed` (6 epochs of Fashion-MNIST), and of drawing 10,000 samples
# with each sampler. Prepared on machines without a GPU and not run there (see BENCHMARKS.md).
#
#   bash bench/gpu.sh                 # everything, ~10-20 min on one modern GPU
#   QUICK=1 bash bench/gpu.sh         # throughput only (a minute or two)
#
# Writes bench/out/gpu/: throughput.json, train.log, sample-*.log and summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DDPM=${DDPM:-.venv/bin/ddpm}
OUT=bench/out/gpu
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
TIMEFORMAT='%R'  # bash's `time`: wall seconds only

"$PY" - <<'EOF' | tee -a "$SUMMARY"
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to PyTorch " + torch.__version__)
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# 1. Training and sampling images/s, ours against the seed's code, in turns in one process
#    (all 200 sampling iterations timed; FLOP/s against an 8192^3 fp32 matmul).
"$PY" bench/throughput.py --device cuda --train-rounds 30 --sample-rounds 3 --sample-iters 200 \
    --memory-steps 5 --profile --out gpu/throughput
"$PY" - <<'EOF' | tee -a "$SUMMARY"
import json
r = json.load(open("bench/results/gpu/throughput.json"))
t, s, f, m = r["train"], r["sample"], r["flops"], r["memory"]
print(f"train: ours {t['ours_img_per_s']:.0f} img/s, seed code {t['reference_img_per_s']:.0f} img/s, ratio {t['ratio']:.2f}x; "
      f"bf16 autocast {t['ours_bf16_img_per_s']:.0f} img/s, ratio {t['ratio_bf16']:.2f}x")
print(f"sample (200 steps, 64 images): ours {s['ours_img_per_s']:.1f} img/s "
      f"({s['ours_channels_last_img_per_s']:.1f} channels-last), seed code {s['reference_img_per_s']:.1f}, "
      f"ratio {s['ratio']:.2f}x ({s['ratio_channels_last']:.2f}x; bf16 {s['ratio_channels_last_bf16']:.2f}x)")
print(f"flops: {f['ours_gflop_per_s']:.0f} GFLOP/s, {100 * f['ours_fraction_of_peak']:.0f}% of the fp32 matmul's "
      f"{f['peak_gflop_per_s']:.0f}")
print(f"cuda memory: ours {m['ours'].get('cuda_peak_mib', 0):.0f} MiB, seed code {m['reference'].get('cuda_peak_mib', 0):.0f} MiB")
EOF
[ -n "${QUICK:-}" ] && exit 0

# 2. The seed's recipe end to end: 6 epochs, batch 128, with EMA, periodic grids and checkpoints.
RUN="$OUT/seed-$(date +%Y%m%d-%H%M%S)"
{ time "$DDPM" train --preset seed --device cuda --out "$RUN" --no-progress > "$OUT/train.log" 2>&1; } 2> "$OUT/train.seconds"
echo "train --preset seed (6 epochs): $(cat "$OUT/train.seconds") s wall; $(grep '^done' "$OUT/train.log")" | tee -a "$SUMMARY"
# the same recipe with bf16 autocast and torch.compile (not the exact fp32 function)
{ time "$DDPM" train --preset seed --device cuda --precision bf16 --compile --out "$RUN-bf16" --no-progress \
    > "$OUT/train-bf16.log" 2>&1; } 2> "$OUT/train-bf16.seconds"
echo "train --preset seed --precision bf16 --compile: $(cat "$OUT/train-bf16.seconds") s wall; $(grep '^done' "$OUT/train-bf16.log")" \
  | tee -a "$SUMMARY"

# 3. 10,000 samples from the EMA weights, 1,000 at a time, with each sampler at its own steps.
for spec in "ddpm" "ddim --steps 50" "dpm++2m --steps 20" "heun --steps 10"; do
  name=${spec%% *}
  # shellcheck disable=SC2086
  { time "$DDPM" sample "$RUN" --n 10000 --batch-size 1000 --sampler $spec --device cuda \
      --out "$OUT/samples-$name" > "$OUT/sample-$name.log" 2>&1; } 2> "$OUT/sample-$name.seconds"
  echo "sample --n 10000 --sampler $spec: $(cat "$OUT/sample-$name.seconds") s wall; $(grep '^sampler' "$OUT/sample-$name.log")" \
    | tee -a "$SUMMARY"
done
echo "wrote $SUMMARY"
