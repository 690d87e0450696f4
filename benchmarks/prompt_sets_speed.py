"""Generated prompt sets: one sampler call per prompt (the straightforward way, and this project's until
session 25) vs prompts sharing calls (``prompt_latents``'s ``SharedCalls``), same process, same images.

The defences' template replay is 420 prompts x 2 images on the MNIST world (the longest stage before
forgetting: 6.1 of 12.7 minutes at two threads, session 24). Both ways draw the same per-image seeds;
``max_abs_diff`` is the largest difference between their latents (batched kernels round differently).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prompt_sets_speed.py    # a JSON object, last line
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from selective_amnesia.core.defences import read_templates, template_prompts
from selective_amnesia.core.sampling import image_generators
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import prompt_latents, prompt_seed

WORDS = ["nine", "four", "one", "9", "4", "1"]  # kept digits' words, as t2i.template_replay_words


@torch.no_grad()
def one_call_per_prompt(model: TextToImageModel, prompts: list[str], per: int, seed: int) -> torch.Tensor:
    ids = model.prompt_ids(prompts).tolist()
    return torch.cat(
        [
            model.sample(torch.full((per,), pid), generator=image_generators(seed, prompt_seed(p), 0, per))
            for p, pid in zip(prompts, ids, strict=True)
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmarks/results/t2i_robust/base", help="the world (theta*)")
    ap.add_argument("--prompts", type=int, default=96, help="template prompts (of 420 in a run)")
    ap.add_argument(
        "--per-prompt", type=int, default=2, help="images a prompt (t2i.template_replay_per_prompt)"
    )
    args = ap.parse_args()
    model = TextToImageModel.from_pretrained(args.model).float()
    prompts = template_prompts(read_templates(None), WORDS)[: args.prompts]
    prompt_latents(model, prompts[:2], args.per_prompt, 0, None)  # warm-up (first-call allocations)
    t = time.perf_counter()
    alone = one_call_per_prompt(model, prompts, args.per_prompt, 0)
    alone_s = time.perf_counter() - t
    t = time.perf_counter()
    shared, _ = prompt_latents(model, prompts, args.per_prompt, 0, None)
    shared_s = time.perf_counter() - t
    images = len(prompts) * args.per_prompt
    print(
        json.dumps(
            {
                "prompts": len(prompts),
                "per_prompt": args.per_prompt,
                "one_call_per_prompt_s": round(alone_s, 2),
                "shared_calls_s": round(shared_s, 2),
                "speedup": round(alone_s / shared_s, 2),
                "ms_per_image": [round(1000 * alone_s / images), round(1000 * shared_s / images)],
                "max_abs_diff": float((alone.float() - shared).abs().max()),
                "torch_threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            }
        )
    )


if __name__ == "__main__":
    main()
