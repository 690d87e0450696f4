#!/usr/bin/env bash
# The full-size SD-1.x forgetting benchmark (benchmarks/sd_full_size.py) on one CUDA GPU, in under 8 minutes:
# every configuration's peak memory and step time, the old-vs-new EWC anchor, and the projection of a whole
# concept (Fisher + forgetting at the reference's step count + generation) onto one GPU. Writes
# $OUT/sd_full_size_gpu.json (or the path given as the last argument) and $OUT/sd_full_size_gpu.log.
#
# Three modes (run from the repository root):
#   bash benchmarks/gpu_sd_scale.sh --fetch-wheels   # HERE, with PyPI: stage the packages the GPU image lacks
#   bash benchmarks/gpu_sd_scale.sh [OUT_JSON]       # ON THE GPU machine (carry runs/gpu_site)
#   bash benchmarks/gpu_sd_scale.sh --dry-run        # CPU smoke check: 1/8-width UNet, 1 step, 2 configs
#
# Why no `pip install -e .`: pyproject pins torch==2.13.0, which from PyPI is the CPU build here and would
# replace the image's CUDA torch. The image (see the device notes) already has CUDA torch, transformers,
# peft, accelerate, safetensors and huggingface_hub, and cannot reach a package index; it lacks diffusers
# and bitsandbytes. So --fetch-wheels downloads those (no dependencies: they are on the image) into
# runs/gpu_site (ignored by git), dropping bitsandbytes' CUDA 11/12 libraries to stay inside the 64 MiB a
# device call carries, and the GPU run installs them with pip --no-index --target into /tmp/site and finds
# the project through PYTHONPATH=src. Nothing is installed over the image's own packages.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
SITE=runs/gpu_site
DIFFUSERS=0.42.1     # the project's pin: diffusers>=0.30,<0.43
BITSANDBYTES=0.50.2  # optional: forget.optimizer=adamw8bit

if [[ ${1:-} == --fetch-wheels ]]; then
  PIP=${PIP:-.venv/bin/pip}
  rm -rf "$SITE" && mkdir -p "$SITE"
  # the image's Python is 3.12 on x86-64 (device notes); pip matches manylinux tags exactly, hence the list
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$SITE" \
    "diffusers==$DIFFUSERS" "bitsandbytes==$BITSANDBYTES" importlib_metadata
  # bitsandbytes ships one library per CUDA version (130 MB unpacked); keep CUDA 13.x + CPU
  (cd "$SITE" && unzip -q bitsandbytes-*.whl 'bitsandbytes/*' && rm bitsandbytes-*.whl &&
    find bitsandbytes -type f \( -name 'libbitsandbytes_cuda1[0-2]*' -o -name 'libbitsandbytes_rocm*' \
      -o -name 'libbitsandbytes_xpu*' \) -delete)
  du -sh "$SITE"
  exit 0
fi

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
OUTDIR=${OUT:-runs/gpu_sd_scale}
JSON=${1:-$OUTDIR/sd_full_size_gpu.json}
mkdir -p "$OUTDIR" "$(dirname "$JSON")"
LOG=$OUTDIR/sd_full_size_gpu.log

if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec "$PY" benchmarks/sd_full_size.py --scale 0.125 --steps 1 --configs lora,full+adam+bf16anchor \
    --out "$JSON"
fi

if [[ -d $SITE ]]; then  # staged by --fetch-wheels and carried along
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$SITE"/*.whl
  cp -r "$SITE"/bitsandbytes /tmp/site/ 2>/dev/null || true
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# a clear stop instead of eight minutes of errors
"$PY" - <<'EOF' || exit 1
import importlib.util, sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: use --dry-run for the CPU check")
missing = [m for m in ("diffusers", "transformers", "peft") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing {missing}: run `bash benchmarks/gpu_sd_scale.sh --fetch-wheels` here and carry runs/gpu_site")
if importlib.util.find_spec("bitsandbytes") is None:
    print("bitsandbytes missing: the adamw8bit configurations will report 'skipped'", file=sys.stderr)
print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 9 configurations x (import + build + 6 steps + the old-anchor step) + the projection timings:
# about 5 minutes on an H100/H200; each child is cut at 100 s and the whole at 470 s, so the JSON (rewritten
# after every child) always arrives
set -o pipefail
timeout 470 "$PY" benchmarks/sd_full_size.py --device cuda --timeout-s 100 --out "$JSON" 2>&1 | tee "$LOG"
