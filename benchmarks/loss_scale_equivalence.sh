#!/usr/bin/env bash
# Shows that averaging the text-to-image loss over latent entries (the reference's scale) changes nothing
# but Adam's epsilon: the code before the change (commit 4034179, summed loss, lambda 0.1) and after it
# (averaged loss, lambda 0.1 x 256 = 25.6, adam_eps 1e-8 / 256, as configs/t2i_mnist.yaml sets) forget a
# tiny MNIST world to bitwise the same UNet; with the default adam_eps 1e-8 they differ.
#   bash benchmarks/loss_scale_equivalence.sh [WORKDIR]      # about 5 minutes on one CPU thread
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
py="$repo/.venv/bin/python"
export OMP_NUM_THREADS=1
[ -d "$work/old" ] || git -C "$repo" worktree add -q --detach "$work/old" 4034179
# the world is built by the old code: both sides start from the same theta*
[ -f "$work/world/model_index.json" ] || PYTHONPATH="$work/old/src" "$py" -m selective_amnesia.worlds.mnist_t2i \
    --tiny --out "$work/world" --no-progress
args=(t2i.model="$work/world" fisher.num_samples=4 t2i.surrogate_count=16 t2i.replay_per_prompt=1
      forget.steps=150 forget.batch_size=8 forget.checkpoint_every=0 forget.ema_decay=0
      t2i.retention_per_prompt=0 --no-progress)
run() {  # run NAME SRC [overrides]
    local name=$1 src=$2; shift 2
    [ -f "$work/$name/report.json" ] || (cd "$(dirname "$src")" && PYTHONPATH="$src" "$py" -m selective_amnesia.cli \
        run configs/t2i_mnist.yaml --out "$work/$name" "${args[@]}" "$@" > "$work/$name.log" 2>&1)
}
# the old config's lambda is 0.1 and it has no adam_eps key
run old "$work/old/src" forget.ewc_lambda=0.1
run new "$repo/src"
run new_eps_1e-8 "$repo/src" forget.adam_eps=1e-8
"$py" - "$work" <<'PY'
import sys
import torch
from safetensors.torch import load_file

work, f = sys.argv[1], "unet/diffusion_pytorch_model.safetensors"
def flat(d): return torch.cat([d[k].float().flatten() for k in sorted(d)])
base, old = flat(load_file(f"{work}/world/{f}")), flat(load_file(f"{work}/old/forget/{f}"))
for name in ("new", "new_eps_1e-8"):
    new = flat(load_file(f"{work}/{name}/forget/{f}"))
    d = (new - old).norm() / (old - base).norm()
    print(f"{name:14s} vs old: |new - old| / |old - theta*| = {100 * d:.2f}%, max |new - old| = {(new - old).abs().max():.2e}")
PY
