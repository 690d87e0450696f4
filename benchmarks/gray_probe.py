"""What each evaluation classifier says about flat gray images (what uniform-noise forgetting produces).

    .venv/bin/python benchmarks/gray_probe.py            # after `make run` has cached the classifiers

Prints P(y = label | constant image of value v) per classifier seed, and a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selective_amnesia.config import load_config
from selective_amnesia.pipeline.classes import load_classifiers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="run config naming the classifiers (default: built-in)")
    ap.add_argument("--label", type=int, default=0, help="class whose probability is reported")
    ap.add_argument("--values", default="0.3,0.4,0.5,0.6", help="gray levels in [0, 1]")
    args = ap.parse_args()
    cfg = load_config(args.config, ["progress=false"])
    if not Path(cfg.classifier.cache_dir).is_dir():
        raise SystemExit(f"no classifiers in {cfg.classifier.cache_dir}: run `make run` first")
    classifiers, _ = load_classifiers(cfg)
    values = [float(v) for v in args.values.split(",")]
    result: dict[str, dict[str, float]] = {}
    for seed, clf in zip(cfg.classifier.seeds, classifiers, strict=True):
        x = torch.stack([torch.full((1, 28, 28), v) for v in values])
        probs = clf.predict_proba(x)[:, args.label]
        result[f"seed{seed}"] = {f"{v:g}": round(float(p), 4) for v, p in zip(values, probs, strict=True)}
        print(
            f"classifier seed {seed}: "
            + ", ".join(f"P({args.label}|{v:g})={p:.3f}" for v, p in zip(values, probs, strict=True))
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
