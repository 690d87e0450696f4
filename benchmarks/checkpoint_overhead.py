"""What resumability costs: the same work with and without its periodic checkpoints, side by side.

Three pieces, each timed alternately (A, B, A, B, ...) in this one process so that machine noise hits both:

- the VAE Fisher (default architecture) with a checkpoint at every 256-sample block vs none: why the VAE's
  default is none (its whole Fisher takes seconds);
- the DDPM all-timestep Fisher (``configs/ddpm_mnist.yaml`` architecture, 1000 timesteps), a checkpoint
  after every sample vs none (the default is every 10 samples);
- VAE forgetting (default settings, ``forget.checkpoint_every`` 500 vs 0, every 10 steps as a stress case).

Prints the median ratio (with / without) and writes ``--out`` as JSON.

    OMP_NUM_THREADS=2 python benchmarks/checkpoint_overhead.py \
        --out benchmarks/results/checkpoint_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selective_amnesia.config import ForgetConfig, load_config
from selective_amnesia.core.fisher import estimate_fisher
from selective_amnesia.core.fisher_diffusion import estimate_diffusion_fisher
from selective_amnesia.core.train import Loop, class_forgetting, forget
from selective_amnesia.io.artifacts import environment, write_json
from selective_amnesia.models import build_model_from_config


def side_by_side(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(repeats):
        for name, fn in (("without", a), ("with", b)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ratios = [w / o for w, o in zip(times["with"], times["without"], strict=True)]
    return {
        "seconds_without": times["without"],
        "seconds_with": times["with"],
        "median_ratio": statistics.median(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vae-samples", type=int, default=5000)
    ap.add_argument("--ddpm-samples", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    results: dict[str, Any] = {}

    torch.manual_seed(0)
    vae = build_model_from_config(load_config().model)
    labels = list(range(10))

    def vae_fisher(every: int) -> Callable[[], Any]:
        kw = {"num_samples": args.vae_samples, "labels": labels, "progress": False}
        where = tmp / "vf" if every else None
        return lambda: estimate_fisher(vae, checkpoint_dir=where, checkpoint_every=every, **kw)

    results["vae_fisher"] = side_by_side(vae_fisher(0), vae_fisher(100), args.repeats)
    results["vae_fisher"]["num_samples"] = args.vae_samples

    ddpm = build_model_from_config(load_config("configs/ddpm_mnist.yaml").model)

    def ddpm_fisher(every: int) -> Callable[[], Any]:
        kw = {"num_samples": args.ddpm_samples, "labels": labels, "progress": False, "timestep_chunk": 250}
        where = tmp / "df" if every else None
        return lambda: estimate_diffusion_fisher(ddpm, checkpoint_dir=where, checkpoint_every=every, **kw)

    results["ddpm_fisher"] = side_by_side(ddpm_fisher(0), ddpm_fisher(1), args.repeats + 1)
    results["ddpm_fisher"]["num_samples"] = args.ddpm_samples
    results["ddpm_fisher"]["checkpoint_every"] = 1

    def forgetting(every: int) -> Callable[[], Any]:
        cfg = ForgetConfig(ewc_lambda=0, steps=200, checkpoint_every=every)

        def run() -> None:
            model = build_model_from_config(load_config().model)
            where = tmp / "fg" if every else None
            concept, replay = class_forgetting(cfg, model, labels)  # ewc_lambda=0: no anchor
            forget(model, concept, replay, None, Loop(cfg, 0), progress=False, checkpoint_dir=where)

        return run

    results["vae_forget_every_10_steps"] = side_by_side(forgetting(0), forgetting(10), args.repeats)
    for name, r in results.items():
        print(f"{name:28s} with/without checkpoints: median ratio {r['median_ratio']:.3f}")
    write_json(
        args.out,
        {"results": results, "environment": environment(), "torch_threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    main()
