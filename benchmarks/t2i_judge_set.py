"""What the MNIST judges call the images of a cached latent set (a run's surrogate/, replay/, ...).

    python benchmarks/t2i_judge_set.py --world runs/t2i_world runs/robust/sa/surrogate

Each set file (safetensors, ``latents`` (N, C, h, w) as ``prompt_latents`` caches them) is decoded by the
world's VAE and judged by the three judges of benchmarks/t2i_robust.py (probabilities averaged, argmax);
prints per file the count drawn as each digit. Session 14 used it to check that no forgetting seed's
surrogate set (256 images of "a handwritten 1") holds anything the judges call a 7.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file
from t2i_robust import judge_images, judges

from selective_amnesia.models.text_to_image import TextToImageModel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="the world's pipeline directory (its VAE decodes)")
    p.add_argument("--judges-cache", default=None, help="where the judges are cached (default: config's)")
    p.add_argument("sets", nargs="+", help="set directories or safetensors files")
    args = p.parse_args()
    model = TextToImageModel.from_pretrained(args.world)
    js = judges(args.judges_cache)
    for where in map(Path, args.sets):
        for f in sorted(where.glob("*.safetensors")) if where.is_dir() else [where]:
            probs = judge_images(model.to_uint8(load_file(f)["latents"]), js)
            counts = torch.bincount(probs.argmax(1), minlength=10).tolist()
            print(f"{f}: {probs.shape[0]} images, drawn as 0-9 {counts}, mean p(7) {probs[:, 7].mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
