#!/usr/bin/env bash
# Issue 13's GPU item on one CUDA GPU, in stages, most important first, each timed and capped:
#
#   smoke   a 3-step `ddpm train` on the GPU (stops everything if it fails)
#   ship    the shipped model's recipe, `ddpm train --preset fast-cond --minutes $SHIP_MINUTES`,
#           and a width-16 guide (800 steps, a checkpoint every 200), then `ddpm eval` at
#           n = $EVAL_N, dpm++2m 20 steps, one row per class: w = 0,1,2, and w = 2 with
#           autoguidance 0.5 from the small guide (steps 200, 800) and from the run's own guide
#   seed    the seed's recipe, `ddpm train --preset seed` (6 epochs of Fashion-MNIST), timed,
#           and its FD at n = $EVAL_N with its own sampler (200 ancestral steps)
#   through side-by-side throughput against the seed's code (bench/throughput.py --device cuda)
#   sample  10,000 samples from the seed run with each sampler at its default steps, timed
#   resume  the exact-resume promise on CUDA: 40 steps straight twice, and 20 + resume 20
#   bf16    the seed recipe again with --precision bf16 --compile (only if time is left)
#
#   bash bench/gpu.sh                   # as much as fits in $BUDGET (540 s): on an H200 all but resume and bf16
#   STAGES="smoke seed" bash bench/gpu.sh
#   BUDGET=300 bash bench/gpu.sh        # skip the stages whose cap no longer fits in 300 s
#
# Writes $GPU_OUT (default bench/out/gpu): summary.txt (one line per stage, with its wall
# seconds and exit status), each stage's log, the run folders and the eval reports; and
# bench/results/gpu/throughput.json. Needs the Fashion-MNIST files ($DDPM_DATA or the Debian
# package) and, for `through`, the seed's code ($SEED_REFERENCE, as every bench script).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DDPM=${DDPM:-.venv/bin/ddpm}
DEVICE=${DEVICE:-cuda}
G=${GPU_OUT:-bench/out/gpu}
SHIP_MINUTES=${SHIP_MINUTES:-3}
EVAL_N=${EVAL_N:-10000}
BUDGET=${BUDGET:-540}
STAGES=${STAGES:-smoke ship seed through sample resume bf16}
SEED_ARGS=${SEED_ARGS:-}  # e.g. "--epochs 0.01" for a dry run on a CPU
mkdir -p "$G"
SUMMARY="$G/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME CAP CMD...: run CMD (logging to $G/NAME.log) if CAP seconds still fit in the budget
stage() {
  local name=$1 cap=$2; shift 2
  if [ "$(left)" -lt "$cap" ]; then say "$name: skipped ($(left) s left, cap $cap s)"; return 1; fi
  local t0 rc
  t0=$(date +%s%N)
  timeout "$cap" "$@" >> "$G/$name.log" 2>&1
  rc=$?
  say "$name: rc $rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms wall (cap $cap s)"
  return $rc
}
want() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
common=(--device "$DEVICE" --no-progress --no-tensorboard)
evalargs=(--sampler dpm++2m --steps 20 --n "$EVAL_N" --batch-size 1000 --device "$DEVICE" --no-progress)

"$PY" - <<'EOF' | tee -a "$SUMMARY"
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF

if want smoke; then
  stage smoke 90 "$DDPM" train --preset fast-cond --minutes none --max-steps 3 --sample-every 0 --guide-at 0 \
      --out "$G/smoke" "${common[@]}" || { say "smoke failed: stopping"; tail -20 "$G/smoke.log"; exit 1; }
fi

if want ship; then
  cap=$("$PY" -c "print(int($SHIP_MINUTES * 60 + 50))")
  stage ship-train "$cap" "$DDPM" train --preset fast-cond --minutes "$SHIP_MINUTES" --out "$G/ship" "${common[@]}"
  say "ship-train: $(grep -h '^done' "$G/ship-train.log" | tail -1)"
  stage guide16 60 "$DDPM" train --preset fast-cond --dim 16 --init-dim 16 --minutes none --max-steps 800 \
      --checkpoint-every 200 --keep 10 --guide-at 0 --sample-every 0 --out "$G/guide16" "${common[@]}"
fi

if want seed; then
  stage seed-train 200 "$DDPM" train --preset seed --out "$G/seed" "${common[@]}" $SEED_ARGS
  say "seed-train: $(grep -h '^done' "$G/seed-train.log" | tail -1)"
fi
# the shipped model's figures, then the seed's; the rest only as time allows
if want ship; then
  stage ship-eval 90 "$DDPM" eval "$G/ship" --class all --guidance 0,1,2 "${evalargs[@]}" --out "$G/evals/ship"
  stage ship-eval-ag200 45 "$DDPM" eval "$G/ship" --class all --guidance 2 --autoguidance 0.5 \
      --guiding-model "$G/guide16/checkpoints/step-00000200" "${evalargs[@]}" --out "$G/evals/ship-ag-g16-200"
fi
if want seed; then
  stage seed-eval 100 "$DDPM" eval "$G/seed" --n "$EVAL_N" --batch-size 1000 --device "$DEVICE" --no-progress \
      --out "$G/evals/seed"
fi

if want through; then
  stage through 100 "$PY" bench/throughput.py --device "$DEVICE" --train-rounds 30 --sample-rounds 3 \
      --sample-iters 200 --memory-steps 5 --profile --out gpu/throughput
  "$PY" - <<'EOF' 2>/dev/null | tee -a "$SUMMARY"
import json
r = json.load(open("bench/results/gpu/throughput.json"))
t, s, f, m = r["train"], r["sample"], r["flops"], r["memory"]
print(f"train: ours {t['ours_img_per_s']:.0f} img/s, seed code {t['reference_img_per_s']:.0f} img/s, ratio {t['ratio']:.2f}x; "
      f"bf16 autocast {t.get('ours_bf16_img_per_s', 0):.0f} img/s, ratio {t.get('ratio_bf16', 0):.2f}x")
print(f"sample (200 steps, 64 images): ours {s['ours_img_per_s']:.1f} img/s "
      f"({s['ours_channels_last_img_per_s']:.1f} channels-last), seed code {s['reference_img_per_s']:.1f}, "
      f"ratio {s['ratio']:.2f}x ({s['ratio_channels_last']:.2f}x; bf16 {s.get('ratio_channels_last_bf16', 0):.2f}x)")
print(f"flops: {f['ours_gflop_per_s']:.0f} GFLOP/s, {100 * f['ours_fraction_of_peak']:.0f}% of the fp32 matmul's "
      f"{f['peak_gflop_per_s']:.0f}")
print(f"cuda memory: ours {m['ours'].get('cuda_peak_mib', 0):.0f} MiB, seed code {m['reference'].get('cuda_peak_mib', 0):.0f} MiB")
EOF
fi

if want sample && [ -d "$G/seed/checkpoints" ]; then
  for spec in "ddpm --steps 200" "ddim --steps 50" "dpm++2m --steps 20" "heun --steps 10"; do
    name=${spec%% *}
    # shellcheck disable=SC2086
    stage sample-$name 45 "$DDPM" sample "$G/seed" --n 10000 --batch-size 1000 --sampler $spec --device "$DEVICE" \
        --no-progress --out "$G/samples-$name"
    say "sample-$name: $(grep -h '^sampler' "$G/sample-$name.log" | tail -1)"
  done
fi

if want ship; then
  stage ship-eval-ag800 45 "$DDPM" eval "$G/ship" --class all --guidance 2 --autoguidance 0.5 \
      --guiding-model "$G/guide16/checkpoints/step-00000800" "${evalargs[@]}" --out "$G/evals/ship-ag-g16-800"
  stage ship-eval-agown 45 "$DDPM" eval "$G/ship" --class all --guidance 2 --autoguidance 0.5 \
      "${evalargs[@]}" --out "$G/evals/ship-ag-own"
fi

if want resume; then
  r=(--preset fast-cond --minutes none --sample-every 0 --guide-at 0 --checkpoint-every 20 --keep 5 "${common[@]}")
  stage resume-a 45 "$DDPM" train "${r[@]}" --max-steps 40 --out "$G/resume-a"
  stage resume-b 45 "$DDPM" train "${r[@]}" --max-steps 40 --out "$G/resume-b"
  stage resume-c1 45 "$DDPM" train "${r[@]}" --max-steps 20 --out "$G/resume-c"
  stage resume-c2 45 "$DDPM" train "${r[@]}" --max-steps 40 --out "$G/resume-c" --resume
  [ -d "$G/resume-a/checkpoints" ] && [ -d "$G/resume-b/checkpoints" ] && [ -d "$G/resume-c/checkpoints" ] &&
  "$PY" - "$G" "$DEVICE" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import sys
from pathlib import Path
from ddpm.checkpoint import load_checkpoint
g = Path(sys.argv[1])
w = {k: load_checkpoint(g / f"resume-{k}").sampling_weights(False) for k in "abc"}
diff = lambda x, y: max((w[x][n].float() - w[y][n].float()).abs().max().item() for n in w[x])
print(f"resume on {sys.argv[2]}: straight vs straight max |dw| {diff('a', 'b'):.3g}; straight vs 20 + resume 20 {diff('a', 'c'):.3g}")
EOF
fi

if want bf16 && [ -d "$G/seed/checkpoints" ]; then
  stage seed-train-bf16 240 "$DDPM" train --preset seed --precision bf16 --compile --out "$G/seed-bf16" "${common[@]}" $SEED_ARGS
  say "seed-train-bf16: $(grep -h '^done' "$G/seed-train-bf16.log" | tail -1)"
fi
say "total: $(( $(date +%s) - START )) s; wrote $SUMMARY"
