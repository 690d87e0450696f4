"""Relearning resistance (``amnesia evaluate --relearn N``): does a forgotten class come back when an
attacker fine-tunes on a few real images of it?

A copy of the model is fine-tuned on N real training images of the forgotten class (its own NELBO, Adam,
a fixed budget of steps); after 0, 1/4, 1/2 and all of the budget, samples of the class are judged by
the evaluation classifiers (fraction drawn as the class, argmax, mean over seeds). The same fine-tune of
a reference model — ideally one trained without the class, else the base — says how fast the class is
learnt from scratch: a forgotten model that relearns much faster than that still holds the concept.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from selective_amnesia.core.sampling import sample_per_label
from selective_amnesia.data import ImageDataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate.assess import for_classifier
from selective_amnesia.evaluate.classifier import MNISTClassifier
from selective_amnesia.families import get_family

if TYPE_CHECKING:
    from selective_amnesia.config import RunConfig
    from selective_amnesia.models.base import ConditionalGenerativeModel


def drawn_as(
    model: ConditionalGenerativeModel, classifiers: list[MNISTClassifier], label: int, num: int, seed: int
) -> float:
    """Fraction of ``num`` samples of ``label`` the classifiers call ``label`` (mean over seeds)."""
    with torch.no_grad():
        x, _ = sample_per_label(model, [label], num, seed)
    images = for_classifier(model.to_uint8(x), classifiers[0])
    rates = [float((clf.predict_proba(images).argmax(1) == label).double().mean()) for clf in classifiers]
    return sum(rates) / len(rates)


def relearn_curve(
    model: ConditionalGenerativeModel,
    train: ImageDataset,
    classifiers: list[MNISTClassifier],
    *,
    label: int,
    num_images: int,
    steps: int,
    lr: float,
    batch_size: int,
    num_samples: int,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``num_images`` real images of ``label``; the fraction of its
    samples drawn as ``label`` after 0, steps/4, steps/2 and ``steps`` steps."""
    if not get_family(model.family).relearnable:
        raise AmnesiaError("--relearn fine-tunes the conditional VAE; this model is not one")
    if num_images < 1 or steps < 1:
        raise AmnesiaError(
            f"--relearn needs N >= 1 images and --relearn-steps >= 1, got {num_images}, {steps}"
        )
    pool = (train.labels == label).nonzero().flatten()
    if len(pool) < num_images:
        raise AmnesiaError(f"--relearn {num_images}: the training set has only {len(pool)} images of {label}")
    gen = torch.Generator().manual_seed(seed)
    chosen = pool[torch.randperm(len(pool), generator=gen)[:num_images]]
    x_all = model.from_uint8(train.images[chosen])
    c_all = torch.full((num_images,), label, dtype=torch.int64)
    copy_ = copy.deepcopy(model).train()
    device = next(copy_.parameters()).device
    opt = torch.optim.Adam([p for p in copy_.parameters() if p.requires_grad], lr=lr)
    marks = sorted({0, steps // 4, steps // 2, steps})
    curve = {0: drawn_as(copy_.eval(), classifiers, label, num_samples, seed + 1)}
    copy_.train()
    for step in range(1, steps + 1):
        idx = torch.randint(num_images, (min(batch_size, num_images),), generator=gen)
        loss = copy_.nelbo(x_all[idx].to(device), c_all[idx].to(device), generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in marks:
            curve[step] = drawn_as(copy_.eval(), classifiers, label, num_samples, seed + 1)
            copy_.train()
    return {
        "num_images": num_images,
        "steps": steps,
        "lr": lr,
        "batch_size": min(batch_size, num_images),
        "drawn_as_class": {str(k): v for k, v in curve.items()},
    }


def relearn_report(
    cfg: RunConfig,
    model: ConditionalGenerativeModel,
    model_dir: str,
    classifiers: list[MNISTClassifier],
    counts: list[int],
    steps: int,
    reference: str | None,
) -> dict[str, Any]:
    """``--relearn``: each forgotten class relearnt from each of ``counts`` real images, by the model and
    by the reference (``reference``, else the run's base beside the model, else none)."""
    from pathlib import Path

    from selective_amnesia.data import load_dataset
    from selective_amnesia.models import load_model

    ref_dir = reference
    if ref_dir is None and (Path(model_dir).parent / "base" / "config.json").is_file():
        ref_dir = str(Path(model_dir).parent / "base")
    ref_model = load_model(ref_dir).to(next(model.parameters()).device) if ref_dir else None
    train = load_dataset(cfg.data.dataset, "train", cfg.data.root, cfg.data.image_size)
    common: dict[str, Any] = {
        "steps": steps,
        "lr": cfg.pretrain.lr,
        "batch_size": cfg.pretrain.batch_size,
        "num_samples": cfg.evaluate.num_forget_samples,
        "seed": cfg.seed + 5,
    }
    rows = []
    for label in cfg.forget.forget_labels():
        for n in counts:
            row: dict[str, Any] = {"class": label, "num_images": n}
            row["model"] = relearn_curve(model, train, classifiers, label=label, num_images=n, **common)
            if ref_model is not None:
                row["reference"] = relearn_curve(
                    ref_model, train, classifiers, label=label, num_images=n, **common
                )
            rows.append(row)
    return {
        "reference": ref_dir,
        "reference_kind": (
            "given (--relearn-reference)" if reference else ("the run's base model" if ref_dir else None)
        ),
        "judge": "fraction of samples of the class whose classifier argmax is the class, mean over seeds",
        "rows": rows,
    }
