"""Evaluation metrics of paper section 4 as pure functions of probabilities or feature matrices.

Features are extracted elsewhere (``MNISTClassifier.extract_features``); these functions only compute
statistics, in float64, so they are easy to test against closed forms.

* forgetting: ``P_phi(y = c_f | x)`` and the classifier entropy on samples of the forgotten class;
* remembered classes: classifier accuracy, Frechet distance and precision/recall/density/coverage.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ArrayLike = Tensor | np.ndarray


def _probs64(probs: ArrayLike) -> Tensor:
    p = torch.as_tensor(probs).detach().cpu().double()
    if p.dim() != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"probs must be (N >= 1, K >= 2), got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=torch.float64), atol=1e-4):
        raise ValueError("each row of probs must sum to 1 (pass softmax probabilities, not logits)")
    return p


def _labels(labels: ArrayLike, n: int) -> Tensor:
    y = torch.as_tensor(labels).detach().cpu()
    if y.shape != (n,) or y.is_floating_point():
        raise ValueError(f"labels must be integers of shape ({n},), got {y.dtype} {tuple(y.shape)}")
    return y.long()


def forget_metrics(probs: ArrayLike, forget_label: int) -> dict[str, float]:
    """Classifier verdict on samples generated for the forgotten class ``forget_label``.

    Returns ``p_forget`` = mean ``P(y = c_f | x)`` (-> 1/K when forgetting to uniform noise),
    ``entropy`` = mean entropy of ``P(y|x)`` in nats (-> ln K), ``frac_classified_forget`` = fraction
    with ``argmax == c_f``, and ``n``.
    """
    p = _probs64(probs)
    if not 0 <= forget_label < p.shape[1]:
        raise ValueError(f"forget_label {forget_label} is outside [0, {p.shape[1]})")
    entropy = -torch.special.xlogy(p, p).sum(1)  # 0 log 0 = 0
    return {
        "p_forget": float(p[:, forget_label].mean()),
        "entropy": float(entropy.mean()),
        "frac_classified_forget": float((p.argmax(1) == forget_label).double().mean()),
        "n": int(p.shape[0]),
    }


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of rows whose argmax equals the label (e.g. whether replayed classes stay recognisable)."""
    p = _probs64(probs)
    y = _labels(labels, p.shape[0])
    return float((p.argmax(1) == y).double().mean())


def per_class_accuracy(probs: ArrayLike, labels: ArrayLike) -> dict[int, float]:
    """Accuracy for each label present in ``labels``: shows which remembered classes degrade."""
    p = _probs64(probs)
    y = _labels(labels, p.shape[0])
    hit = (p.argmax(1) == y).double()
    return {int(c): float(hit[y == c].mean()) for c in torch.unique(y).tolist()}


def aggregate_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean and sample std (ddof=1; 0 for one seed) of each numeric metric over classifier seeds.

    The result has ``key`` (mean) and ``key_std`` for every numeric key present in all entries, plus
    ``classifier_seeds`` (the number of entries), matching the report's metrics dict.
    """
    if not per_seed:
        raise ValueError("need at least one per-seed result")
    keys = [
        k
        for k, v in per_seed[0].items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and all(isinstance(d.get(k), (int, float)) for d in per_seed)
    ]
    out: dict[str, float] = {}
    for k in keys:
        values = np.asarray([float(d[k]) for d in per_seed], dtype=np.float64)
        out[k] = float(values.mean())
        out[f"{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["classifier_seeds"] = len(per_seed)
    return out


def _features64(feats: ArrayLike, name: str) -> Tensor:
    f = torch.as_tensor(feats).detach().cpu().double()
    if f.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {tuple(f.shape)}")
    if f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 samples of dimension >= 1, got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return f


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID consume feature matrices directly."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature matrices (N_a, D) and (N_b, D).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` computed in float64 by torchmetrics'
    ``FrechetInceptionDistance`` fed with precomputed features (its public custom-feature path), so the
    number matches the standard implementation. Tiny negative values from round-off are clamped to 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _features64(feats_a, "feats_a"), _features64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    # sync_on_compute=False: a pure function of the two matrices, also when a process group exists
    # (torchrun / accelerate launch), where torchmetrics would otherwise gather from every process
    fid = FrechetInceptionDistance(
        feature=_PrecomputedFeatures(a.shape[1]), reset_real_features=True, sync_on_compute=False
    )
    fid.update(a, real=True)
    fid.update(b, real=False)
    value = float(fid.compute())
    if not math.isfinite(value):
        raise ValueError("Frechet distance is not finite (degenerate covariance?)")
    return max(value, 0.0)


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall (Kynkaanniemi et al.), density and coverage (Naeem et al.) via ``prdc``.

    Precision says how many generated samples fall on the real manifold (fidelity), recall how much of
    the real manifold the samples cover (diversity). ``prdc`` builds N x N distance matrices, so memory
    grows quadratically (about 0.4 GB per matrix at N = 10,000 in float32, which it is given).
    """
    from prdc import compute_prdc

    real, fake = _features64(real_feats, "real_feats"), _features64(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if nearest_k < 1 or min(real.shape[0], fake.shape[0]) <= nearest_k:
        raise ValueError(f"nearest_k must be >= 1 and smaller than both sample counts, got {nearest_k}")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
        out = compute_prdc(
            real_features=real.float().numpy(), fake_features=fake.float().numpy(), nearest_k=nearest_k
        )
    return {k: float(out[k]) for k in ("precision", "recall", "density", "coverage")}
