"""How well the MNIST judges classify real test digits shrunk to 16x16 and brought back to 28x28, the path
the CPU-scale DDPM's samples take in evaluation (configs/ddpm_mnist.yaml, data.image_size=16): the judges
trained on full-size digits, and the ones the pipeline trains on the same 16 px round trip.

    python benchmarks/classifier_at_16px.py
"""

from __future__ import annotations

from selective_amnesia.config import load_config
from selective_amnesia.data import load_dataset
from selective_amnesia.evaluate.assess import for_classifier
from selective_amnesia.pipeline.classes import load_classifiers


def main() -> None:
    full = load_dataset("mnist", "test")
    small = load_dataset("mnist", "test", image_size=16)
    for judge, size in (("trained at 28 px", "null"), ("trained via 16 px", "16")):
        cfg = load_config("configs/ddpm_mnist.yaml", ["progress=false", f"data.image_size={size}"])
        classifiers, _ = load_classifiers(cfg)
        for seed, clf in zip(cfg.classifier.seeds, classifiers, strict=True):
            acc_full = float((clf.predict_proba(full.images).argmax(1) == full.labels).double().mean())
            probs = clf.predict_proba(for_classifier(small.images, clf))
            acc_small = float((probs.argmax(1) == small.labels).double().mean())
            print(
                f"judge {judge}, seed {seed}: real test digits {acc_full:.4f} at 28 px, "
                f"{acc_small:.4f} via 16 px"
            )


if __name__ == "__main__":
    main()
