"""What the judges say about the surrogate itself: uniform-noise images at the model's size, evaluated
exactly as forgotten samples are. A model that forgets perfectly into its surrogate scores about this,
so it bounds the reachable P(c_f) and entropy.

    python benchmarks/surrogate_ceiling.py configs/ddpm_mnist.yaml
"""

from __future__ import annotations

import argparse

import torch

from selective_amnesia.config import load_config
from selective_amnesia.evaluate.assess import for_classifier
from selective_amnesia.evaluate.metrics import forget_metrics
from selective_amnesia.pipeline.classes import load_classifiers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--num", type=int, default=500)
    args = ap.parse_args()
    cfg = load_config(args.config, ["progress=false"])
    classifiers, _ = load_classifiers(cfg)
    d = cfg.model.ddpm if cfg.model.family == "ddpm" else None
    shape = (d.channels, d.image_size, d.image_size) if d else (1, 28, 28)
    noise = torch.randint(0, 256, (args.num, *shape), generator=torch.Generator().manual_seed(0))
    rows = []
    for seed, clf in zip(cfg.classifier.seeds, classifiers, strict=True):
        m = forget_metrics(
            clf.predict_proba(for_classifier(noise.to(torch.uint8), clf)), cfg.forget.forget_label
        )
        rows.append(m)
        print(f"judge seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n"))
    for k in ("p_forget", "entropy", "frac_classified_forget"):
        vals = torch.tensor([r[k] for r in rows])
        print(f"mean over judges: {k} {vals.mean():.3f} ± {vals.std():.3f}")


if __name__ == "__main__":
    main()
