#!/usr/bin/env bash
# One candidate of the free-soft-prompt experiments (docs/robustness.md, sessions 16-18): the 256-target
# surrogate-distillation recipe forgetting "seven" in the MNIST text-to-image world at forgetting seed
# SEED on seed 0's sets, plus OVERRIDES; stopped once its snapshot at STEP exists (its checkpoint stays,
# so `amnesia run` with the same arguments resumes it), then judged on the development split by
# benchmarks/t2i_select.py (free soft prompt at development attack seeds 0 and 1, the other digits).
#
#   bash benchmarks/t2i_candidates.sh NAME SEED STEP [OVERRIDES...]
#   bash benchmarks/t2i_candidates.sh u12_s0 0 500 t2i.adversarial_pool_updates=12
#   FINISH=1 REPORT=4,5,6,7 bash benchmarks/t2i_candidates.sh u12_s0 0 1500 t2i.adversarial_pool_updates=12
#
# FINISH=1 lets the run end by itself (STEP should then be its last step); REPORT names held-out attack
# seeds for t2i_select.py's report on the chosen step (default: none, development only).
#
# WORLD: θ* (default: the committed float16 base, loaded as float32); RUNS / SELECT: where runs and their
# select.json go; SETS: a run at sets seed 0 whose generated sets to copy in (each is reused only if its
# cache key matches) and FISHER its Fisher to reuse (session 17's seeds 3-6 did both), else the run
# makes its own; THREADS: OMP threads (1 when two candidates share this 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1 SEED=$2 STEP=$3
shift 3
WORLD=$(realpath -m "${WORLD:-benchmarks/results/t2i_robust/base}")
RUNS=$(realpath -m "${RUNS:-runs/candidates}")
SELECT=$(realpath -m "${SELECT:-runs/candidates_select}")
JUDGES=$(realpath -m "${JUDGES:-runs/cache}")
export OMP_NUM_THREADS=${THREADS:-1}
PY=${PY:-python}
RECIPE=(  # session 11's t < 500 recipe + session 12's surrogate distillation + session 14's 256 targets
  t2i.adversarial_pool=8 t2i.adversarial_pool_updates=6 t2i.adversarial_pool_reset=150
  t2i.concept_ablation_pool=0.5 t2i.concept_ablation_kept=0.25 forget.ewc_lambda=3.2
  t2i.concept_ablation_kept_max_t=500 t2i.replay_distill=2 t2i.replay_distill_images=surrogate
  t2i.adversarial_targets=256
)
run="$RUNS/$NAME"
snapshot=$(printf "%s/snapshots/step-%05d" "$run" "$STEP")
if [ ! -d "$snapshot" ]; then
  mkdir -p "$run"
  for d in surrogate replay template_replay unconditional_replay adversarial_targets; do
    if [ -n "${SETS:-}" ] && [ -d "$SETS/$d" ] && [ ! -e "$run/$d" ]; then cp -r "$SETS/$d" "$run/"; fi
  done
  $PY -m selective_amnesia.cli run configs/t2i_mnist_robust.yaml --out "$run" "t2i.model=$WORLD" progress=false \
    "seed=$SEED" t2i.sets_seed=0 forget.snapshot_every=250 "${RECIPE[@]}" ${FISHER:+"fisher.path=$FISHER"} "$@" &
  pid=$!
  if [ "${FINISH:-0}" = 1 ]; then
    wait "$pid"
  else
    while [ ! -d "$snapshot" ] && kill -0 "$pid" 2>/dev/null; do sleep 20; done
    sleep 60  # the checkpoint of the same step is written after the snapshot
    kill "$pid" 2>/dev/null || true
    wait "$pid" || true
  fi
fi
[ -d "$snapshot" ] || { echo "no snapshot at step $STEP in $run" >&2; exit 1; }
(cd benchmarks && $PY t2i_select.py --base "$WORLD" --run "$run" --out "$SELECT/$NAME" --steps "$STEP" \
  --report-seeds "${REPORT:-}" --judges-cache "$JUDGES")
