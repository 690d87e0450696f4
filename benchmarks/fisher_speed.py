"""Fisher estimation: the paper's one-sample-at-a-time loop vs the batched estimator, same process.

Both run on the MNIST CVAE (paper architecture) at the same weights and on the same samples. The loop
is timed on ``--loop-samples`` and scaled to ``--samples``; ``max_rel_err`` compares the two Fisher
estimates on the loop's samples: max over parameter tensors of max|F_fast - F_loop| / max|F_loop|.

    .venv/bin/python benchmarks/fisher_speed.py            # prints a JSON object as its last line
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from selective_amnesia.core.fisher import estimate_fisher
from selective_amnesia.models import build_model, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: a fresh paper-size CVAE)")
    ap.add_argument("--samples", type=int, default=50000, help="Fisher samples (the paper: 50k)")
    ap.add_argument("--loop-samples", type=int, default=1024, help="samples the loop is timed on")
    ap.add_argument("--estimator", default="batched", choices=["batched", "vmap"])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model) if args.model else build_model("cvae")
    labels = list(range(10))
    kw = dict(labels=labels, seed=0, progress=False)

    # the same samples for both: equality check on the loop's sample set
    t = time.perf_counter()
    loop = estimate_fisher(model, num_samples=args.loop_samples, estimator="loop", **kw)
    loop_subset_s = time.perf_counter() - t
    fast_subset = estimate_fisher(model, num_samples=args.loop_samples, estimator=args.estimator, **kw)
    max_rel_err = max(
        float((fast_subset.values[n] - ref).abs().max() / ref.abs().max()) for n, ref in loop.values.items()
    )
    t = time.perf_counter()
    estimate_fisher(model, num_samples=args.samples, estimator=args.estimator, **kw)
    fast_s = time.perf_counter() - t
    loop_s = loop_subset_s * args.samples / args.loop_samples
    result = {
        "samples": args.samples,
        "loop_timed_on": args.loop_samples,
        "estimator": args.estimator,
        "loop_s": round(loop_s, 2),
        "fast_s": round(fast_s, 2),
        "speedup": round(loop_s / fast_s, 1),
        "max_rel_err": max_rel_err,
        "params": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
