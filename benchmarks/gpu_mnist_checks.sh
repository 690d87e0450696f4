#!/usr/bin/env bash
# The first GPU check of docs/ddpm.md (paper lambda 10, guidance 2: no forgetting), from the CPU-trained
# base model: the Fisher estimator comparison over seeds, and two forgetting settings beside the default.
# (The two extra settings did not run in that call: their overrides were passed as seeds, fixed since.)
# Usage (repo root; BASE = a trained base model directory, OUT = where the JSON tables go):
#   BASE=runs/ddpm_mnist/base OUT=/tmp/gpu bash benchmarks/gpu_mnist_checks.sh
set -u
BASE=${BASE:-runs/ddpm_mnist/base}
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
run() {  # name, time limit in seconds, then fisher_compare arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/fisher_compare.py --base "$BASE" --device cuda --out "/tmp/fc_$name" "$@" \
    2>&1 | grep -v -i warn | tail -4
  cp "/tmp/fc_$name/fisher_compare.json" "$OUT/$name.json" 2>/dev/null || echo "$name: no result"
}
run compare 290 --estimators all_timesteps subsampled --seeds 0 1
run steps2000 110 --estimators all_timesteps --seeds 0 --set forget.steps=2000
run lr3e-4 90 --estimators all_timesteps --seeds 0 --set forget.lr=3.0e-4
