"""How far the adversarial pool's soft prompts and the evaluation attack's finds travelled from their start.

    python benchmarks/t2i_pool_drift.py --base runs/t2i_world --run RUN --select OUT --step 500

For one snapshot step of a forgetting run made with ``t2i.adversarial_pool`` and judged by
benchmarks/t2i_select.py (into OUT): each pool prompt's Adam steps and its distance from the embedding of
"a handwritten 7", and for each attack seed the attack's found sequence's distance from the same start
and from the nearest pool prompt. Distances are Frobenius norms relative to the start's norm. A diagnostic
for why one run resists the free soft prompt and another does not (docs/robustness.md, session 18).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open

from selective_amnesia.io.artifacts import load_tensors
from selective_amnesia.models.text_to_image import TextToImageModel

KEY = "encoder_hidden_states"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="theta* (the attack's starting prompt is encoded with it)")
    p.add_argument("--run", required=True, help="the forgetting run (holds adversarial_pool.safetensors)")
    p.add_argument("--select", required=True, help="t2i_select.py's --out for that run")
    p.add_argument("--step", type=int, required=True, help="the snapshot step the attacks were run on")
    p.add_argument("--prompt", default="a handwritten 7", help="the attack's and the pool's starting prompt")
    args = p.parse_args()

    start = TextToImageModel.from_pretrained(args.base).encode_prompts([args.prompt])[KEY][0].float()
    scale = float(start.norm())
    with safe_open(str(Path(args.run) / "adversarial_pool.safetensors"), "pt") as f:
        keys = f.keys()  # a safe_open handle is not iterable
        names = sorted(k for k in keys if k.startswith(f"{args.step}/") and k.endswith(KEY))
        if not names:
            raise SystemExit(f"no pool state saved at step {args.step} in {args.run}")
        pool = torch.stack([f.get_tensor(k).float() for k in names])
        adam = [int(f.get_tensor(f"{k}.adam.step").max()) for k in names]
    drift = [float((q - start).norm()) / scale for q in pool]
    print(f"pool at step {args.step}: Adam steps {adam}")
    print("pool drift from the start: " + ", ".join(f"{d:.2f}" for d in drift))
    for found in sorted(Path(args.select, "attacks").glob(f"step-{args.step:05d}_s*")):
        tensors, _ = load_tensors(found / "soft-prompt" / "embeddings.safetensors")
        seq = next(v for k, v in tensors.items() if KEY in k).float().reshape(start.shape)
        nearest = float((pool - seq).flatten(1).norm(dim=1).min()) / scale
        travelled = float((seq - start).norm()) / scale
        print(f"{found.name}: attack drift {travelled:.2f}, nearest pool prompt {nearest:.2f}")


if __name__ == "__main__":
    main()
