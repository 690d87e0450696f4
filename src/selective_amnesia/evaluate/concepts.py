"""Every class after every step of a sequence: rebound of the forgotten ones, drift of the kept ones.

For each model theta_0 .. theta_K and each class c, ``num_per_class`` samples of c are judged by the
evaluation classifiers; "as itself" is the fraction whose argmax is c (mean over classifier seeds). For
a class forgotten by step k that is the rate at which it is still (or again: rebound) drawn as itself;
for a kept class it is its accuracy. The kept classes' FID (first classifier's features, as in
``assess``) is measured at every step too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from selective_amnesia.core.sampling import cached_samples
from selective_amnesia.data import ImageDataset
from selective_amnesia.evaluate.assess import for_classifier, real_features
from selective_amnesia.evaluate.classifier import MNISTClassifier
from selective_amnesia.evaluate.metrics import frechet_distance

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel


def class_rates(
    model: ConditionalGenerativeModel,
    classifiers: list[MNISTClassifier],
    labels: list[int],
    *,
    num_per_class: int,
    seed: int,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[dict[int, float], dict[int, float], dict[int, float], torch.Tensor, torch.Tensor]:
    """Per class: fraction drawn as itself (mean over classifier seeds), its spread over seeds and mean
    P(c | x); plus the first classifier's features of every sample and their labels."""
    u, y = cached_samples(model, labels, num_per_class, seed, cache_dir, progress=progress)
    x = for_classifier(u, classifiers[0])
    hits, probs_c = [], []
    feats = torch.empty(0)
    for i, clf in enumerate(classifiers):
        probs, f = clf.predict_proba_and_features(x)
        probs = torch.as_tensor(probs)
        feats = f if i == 0 else feats
        hits.append(np.array([float((probs[y == c].argmax(1) == c).double().mean()) for c in labels]))
        probs_c.append(np.array([float(probs[y == c][:, c].double().mean()) for c in labels]))
    h, p = np.stack(hits), np.stack(probs_c)
    std = h.std(axis=0, ddof=1) if len(classifiers) > 1 else np.zeros(len(labels))
    rate = {c: float(v) for c, v in zip(labels, h.mean(0), strict=True)}
    spread = {c: float(v) for c, v in zip(labels, std, strict=True)}
    p_self = {c: float(v) for c, v in zip(labels, p.mean(0), strict=True)}
    return rate, spread, p_self, torch.as_tensor(feats), y


def sequence_table(
    models: Sequence[ConditionalGenerativeModel],
    steps: list[list[int]],
    classifiers: list[MNISTClassifier],
    real_test: ImageDataset,
    labels: list[int],
    *,
    num_per_class: int,
    seed: int,
    cache_root: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The concept x step table of a sequence: ``models[k]`` is theta_k (0 the base), ``steps[k-1]``
    the classes step k forgot. Returned as report.json's ``sequence`` (JSON keys are strings)."""
    forgotten_all = [c for s in steps for c in s]
    kept = [c for c in labels if c not in forgotten_all]
    real_feats = real_features(classifiers[0], real_test, kept)
    columns = []
    for k, model in enumerate(models):
        cache = cache_root / str(k) if cache_root is not None else None
        rate, spread, p_self, feats, y = class_rates(
            model,
            classifiers,
            labels,
            num_per_class=num_per_class,
            seed=seed,
            cache_dir=cache,
            progress=progress,
        )
        forgotten = [c for s in steps[:k] for c in s]
        kept_rows = torch.isin(y, torch.tensor(kept))
        columns.append(
            {
                "step": k,
                "forgotten_so_far": forgotten,
                "as_itself": {str(c): rate[c] for c in labels},
                "as_itself_std": {str(c): spread[c] for c in labels},
                "p_itself": {str(c): p_self[c] for c in labels},
                "forgotten_max_as_itself": max((rate[c] for c in forgotten), default=None),
                "kept_accuracy": float(np.mean([rate[c] for c in kept])),
                "kept_fid": frechet_distance(real_feats, feats[kept_rows]),
            }
        )
    return {
        "classes": labels,
        "kept": kept,
        "forgotten_at_step": {str(c): k for k, s in enumerate(steps, start=1) for c in s},
        "num_per_class": num_per_class,
        "judge": "fraction of each class's samples whose classifier argmax is the class, mean over seeds",
        "columns": columns,
    }
