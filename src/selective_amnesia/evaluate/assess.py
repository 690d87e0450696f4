"""Evaluate one model: is the forgotten class gone, are the remembered ones intact?

Forgotten class: P(c_f), entropy and fraction classified as c_f by each classifier seed (mean and
spread over seeds, because classifiers that differ only in training disagree on noise images).
Remembered classes: accuracy of their samples, and FID / precision / recall against the real test
images of those classes on the first classifier's penultimate features.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from selective_amnesia.config import EvaluateConfig
from selective_amnesia.core.sampling import cached_samples
from selective_amnesia.data import ImageDataset, resize_images
from selective_amnesia.evaluate.classifier import MNISTClassifier
from selective_amnesia.evaluate.metrics import (
    accuracy,
    aggregate_seeds,
    forget_metrics,
    frechet_distance,
    precision_recall,
)

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel


def for_classifier(images: torch.Tensor, classifier: MNISTClassifier) -> torch.Tensor:
    """uint8 images at the model's size -> float [0, 1] at the classifier's input size (the dataset's
    native size: CPU-scale samples are upsampled to it, and so are the real images they are compared to)."""
    return resize_images(images, classifier.input_shape[-1]).float() / 255


def assess_model(
    model: ConditionalGenerativeModel,
    classifiers: list[MNISTClassifier],
    real_test: ImageDataset,
    *,
    forget_label: int | list[int],
    labels: list[int],
    cfg: EvaluateConfig,
    seed: int,
    real_feats: torch.Tensor | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """All metrics of ``model`` as a flat dict (the report's per-model metrics).

    ``real_feats`` (from ``real_features``) saves recomputing the reference features per model;
    ``cache_dir`` keeps the samples (uint8, what a user would save) so an interrupted evaluation resumes.
    Several forgotten classes (a list) get ``num_forget_samples`` each; the forget metrics are then the
    mean over them, and each class's own are ``<metric>_c<class>``.
    """
    start = time.perf_counter()
    forgotten = forget_label if isinstance(forget_label, list) else [forget_label]
    remembered = [c for c in labels if c not in forgotten]
    given = {"guidance_scale": cfg.guidance_scale, "num_inference_steps": cfg.num_inference_steps}
    sampler: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    u_f, y_f = cached_samples(
        model, forgotten, cfg.num_forget_samples, seed, cache_dir, progress=progress, **sampler
    )
    u_r, y_r = cached_samples(
        model, remembered, cfg.num_per_class, seed, cache_dir, progress=progress, **sampler
    )
    x_f, x_r = for_classifier(u_f, classifiers[0]), for_classifier(u_r, classifiers[0])
    per_seed = []
    fake_feats = torch.empty(0)
    for i, clf in enumerate(classifiers):
        m = _forget_metrics(clf.predict_proba(x_f), y_f, forgotten)
        probs_r, feats_r = clf.predict_proba_and_features(x_r)
        m["remembered_accuracy"] = accuracy(probs_r, y_r)
        fake_feats = feats_r if i == 0 else fake_feats
        per_seed.append(m)
    out: dict[str, Any] = aggregate_seeds(per_seed)
    if real_feats is None:
        real_feats = real_features(classifiers[0], real_test, remembered)
    out["fid"] = frechet_distance(real_feats, fake_feats)
    out.update(precision_recall(real_feats, fake_feats, nearest_k=cfg.nearest_k))
    out["sampler"] = sampler or "the model's defaults"
    out["num_forget_samples"] = int(x_f.shape[0])
    out["num_remembered_samples"] = int(x_r.shape[0])
    out["num_real_images"] = int(real_feats.shape[0])
    out["feature_extractor"] = "penultimate 50-d features of the first classifier seed"
    if cfg.inception_fid:
        out.update(_inception(model, real_test, remembered, u_r, cfg, progress))
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _inception(
    model: ConditionalGenerativeModel,
    real_test: ImageDataset,
    remembered: list[int],
    u_r: torch.Tensor,
    cfg: EvaluateConfig,
    progress: bool,
) -> dict[str, Any]:
    """The TF-FID Inception FID of the remembered classes' samples ``u_r`` against their real test images."""
    from selective_amnesia.evaluate.inception import inception_fid

    keep = torch.isin(real_test.labels, torch.tensor(remembered))
    device = str(next(model.parameters()).device)  # Inception runs where the model runs
    incep = inception_fid(
        real_test.images[keep], u_r, weights=cfg.inception_weights, device=device, progress=progress
    )
    return {
        "inception_fid": incep["inception_fid"],
        "inception_feature_extractor": incep["feature_extractor"],
        "inception_num_real": incep["num_real"],
        "inception_num_fake": incep["num_fake"],
    }


def _forget_metrics(probs: torch.Tensor, y: torch.Tensor, forgotten: list[int]) -> dict[str, Any]:
    """forget_metrics of one class, or the mean over several with each class's own beside it."""
    if len(forgotten) == 1:
        return forget_metrics(probs, forgotten[0])
    per = {c: forget_metrics(probs[y == c], c) for c in forgotten}
    out: dict[str, Any] = {}
    for key in ("p_forget", "entropy", "frac_classified_forget"):
        out[key] = sum(m[key] for m in per.values()) / len(per)
        out.update({f"{key}_c{c}": m[key] for c, m in per.items()})
    out["n"] = sum(m["n"] for m in per.values())
    return out


def real_features(classifier: MNISTClassifier, real_test: ImageDataset, labels: list[int]) -> torch.Tensor:
    """Features of the real test images of ``labels`` (at the model's size, brought to the classifier's
    like the samples): the reference set of FID and precision/recall."""
    keep = torch.isin(real_test.labels, torch.tensor(labels))
    return classifier.extract_features(for_classifier(real_test.images[keep], classifier))
