"""The adversarial pool's attack steps (t2i.adversarial_pool): one UNet call a round vs one an update.

Each forgetting step the pool takes ``--updates`` attack steps, each of a soft prompt drawn with
replacement from ``--size``. Updates of different prompts in one step are independent, so
``SoftPromptPool`` runs them in rounds (every prompt's r-th update of the step in one UNet call); the
straightforward way (``batch_rounds=False``) makes one call an update. Both pools run in the same process,
alternating step by step, on the world's UNet at the same weights, targets and draws; ``max_abs_diff``
compares their soft prompts after the last step (float sums in another order, nothing else).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pool_rounds.py \
        --world benchmarks/results/t2i_robust/base --steps 20     # prints a JSON object as its last line
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selective_amnesia.core.defences import SoftPromptPool
from selective_amnesia.io.artifacts import environment
from selective_amnesia.models.text_to_image import TextToImageModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="a text-to-image pipeline directory (theta*)")
    ap.add_argument("--steps", type=int, default=20, help="forgetting steps timed, each way")
    # the session-25 recipe (benchmarks/t2i_candidates.sh): 8 soft prompts, 12 updates of 16 targets
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--updates", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    model = TextToImageModel.from_pretrained(args.world)
    model.unet.requires_grad_(False)  # as in forgetting: the pool's gradients go to its prompts only
    starts = model.prompt_ids(["a handwritten 7", "the number seven"]).tolist()
    # the timing does not depend on what the targets show: noise of the latents' shape
    targets = torch.randn(256, *model.image_shape, generator=torch.Generator().manual_seed(0))
    pools, seconds = {}, {}
    for rounds in (True, False):
        pools[rounds] = SoftPromptPool(
            targets, starts, size=args.size, reset=150, lr=0.01, seed=0, path=None, save_every=0,
            batch_size=args.batch, updates=args.updates, batch_rounds=rounds,
        )  # fmt: skip
        pools[rounds].resume(model, start_step=1)
        seconds[rounds] = 0.0
    for step in range(1, args.steps + 1):
        for rounds in (True, False) if step % 2 else (False, True):  # alternate which goes first
            t0 = time.perf_counter()
            pools[rounds].step(step, model)
            seconds[rounds] += time.perf_counter() - t0
    a, b = pools[True]._state(), pools[False]._state()
    out = {
        "steps": args.steps,
        "size": args.size,
        "updates": args.updates,
        "batch": args.batch,
        "rounds_s_per_step": seconds[True] / args.steps,
        "one_call_an_update_s_per_step": seconds[False] / args.steps,
        "speedup": seconds[False] / seconds[True],
        "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a if ".adam." not in k),
        "threads": torch.get_num_threads(),
        "environment": environment(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
