"""The external MNIST classifier that judges generated samples (paper section 4).

Forgetting is measured by what an independent classifier ``P_phi(y|x)`` says about samples of the
forgotten class, and image quality by statistics of its penultimate features. The network has the
architecture of the paper's reference MNIST classifier (two 5x5 convolutions with batch norm, 2x2 max
pooling, dropout, a 50-unit hidden layer) and, like it, reads raw [0, 1] pixels without normalisation,
so P(c_f) and entropy are comparable with the paper's. The judges the committed configs use ship with the
package (``evaluate/packaged.py``); any other (recipe, seed) is trained once and cached as safetensors, so
every evaluation with the same recipe and seed uses exactly the same judge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from selective_amnesia.data import ImageDataset, load_dataset, resize_images
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import environment, load_tensors, save_tensors

logger = logging.getLogger(__name__)

FEATURE_DIM = 50
NUM_CLASSES = 10
# Bump when the architecture or the training loop changes, so stale caches are not reused.
_CACHE_VERSION = 2


MNIST_SHAPE = (1, 28, 28)


def _as_unit_float(x: Tensor, shape: tuple[int, int, int] = MNIST_SHAPE) -> Tensor:
    """Accept uint8 images in [0, 255] or float images in [0, 1]; return float32 in [0, 1]."""
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"expected images of shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating images, got {x.dtype}")
    return x.float()


class MNISTClassifier(nn.Module):
    """The paper's small MNIST CNN, taking images in [0, 1] of shape (B, *input_shape).

    conv 5x5 (10) + BN -> maxpool 2 -> ReLU -> conv 5x5 (20) + BN -> channel dropout -> maxpool 2 -> ReLU
    -> 320 -> 50 (ReLU; the feature layer) -> dropout -> 10. For other datasets (``input_shape`` their
    native (C, H, W)) an adaptive average pool brings the last map to 4x4; at 28x28 it is the identity,
    so MNIST weights are unchanged. On CIFAR-10/STL-10 this is a weak judge (see docs/ddpm.md).
    """

    def __init__(self, input_shape: tuple[int, int, int] = MNIST_SHAPE) -> None:
        super().__init__()
        c, h, w = input_shape
        if min(h, w) < 28:
            raise ValueError(f"the classifier needs images of at least 28x28, got {h}x{w}")
        self.input_shape = (int(c), int(h), int(w))
        self.conv1 = nn.Conv2d(c, 10, kernel_size=5)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.bn2 = nn.BatchNorm2d(20)
        self.conv2_drop = nn.Dropout2d(0.5)
        self.fc1 = nn.Linear(320, FEATURE_DIM)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def _penultimate(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.bn2(self.conv2(x))), 2))
        x = F.adaptive_avg_pool2d(x, 4)
        return F.relu(self.fc1(torch.flatten(x, 1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        logits: Tensor = self.fc2(self.dropout(self._penultimate(x)))
        return logits

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, 50) after the ReLU: the embedding for FID and precision/recall."""
        return self._penultimate(x)

    def _batched(self, x: Tensor, batch_size: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        x = _as_unit_float(x, self.input_shape)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            with torch.no_grad():
                outs = [fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was_training)
        if not outs:
            return torch.empty(0)
        return torch.cat(outs)

    def predict_proba(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Softmax probabilities (B, 10) in float64, computed in eval mode without gradients.

        float64 keeps ``log`` of tiny probabilities (entropy) and means over many samples accurate.
        Accepts uint8 [0, 255] or float [0, 1] images.
        """
        out = self._batched(x, batch_size, lambda b: torch.softmax(self(b).double(), dim=1))
        return out.reshape(-1, NUM_CLASSES).double()

    def predict_proba_and_features(self, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """``(predict_proba(x), extract_features(x))`` from one forward pass: evaluation needs both."""

        def both(b: Tensor) -> Tensor:
            h = self.features(b)
            return torch.cat([torch.softmax(self.fc2(h).double(), dim=1), h.double()], dim=1)

        out = self._batched(x, batch_size, both).reshape(-1, NUM_CLASSES + FEATURE_DIM).double()
        return out[:, :NUM_CLASSES].contiguous(), out[:, NUM_CLASSES:].contiguous()

    def extract_features(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Penultimate features (B, 50) in float64 for many images, in eval mode without gradients."""
        out = self._batched(x, batch_size, lambda b: self.features(b).double())
        return out.reshape(-1, FEATURE_DIM).double()


@dataclass
class ClassifierRecipe:
    """How the judge is trained: Adam with a StepLR schedule stepped once per epoch (reference recipe)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    step_size: int = 5
    gamma: float = 0.1
    max_train_images: int | None = None  # train on a seeded random subset of this size (fast tests)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AmnesiaError(f"classifier.{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise AmnesiaError(f"classifier.{name} must be a number > 0, got {value!r}")
            setattr(self, name, float(value))
        if self.gamma > 1:
            raise AmnesiaError(f"classifier.gamma must be in (0, 1], got {self.gamma}")
        m = self.max_train_images
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise AmnesiaError(f"classifier.max_train_images must be null or an integer >= 1, got {m!r}")

    def fingerprint(self) -> str:
        """Short hash of every recipe field (and the cache version): names the cache file."""
        payload = json.dumps({"v": _CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_classifier(
    recipe: ClassifierRecipe, train: ImageDataset, seed: int, progress: bool = True
) -> MNISTClassifier:
    """Train the judge with ``recipe``; the result is a deterministic function of ``seed`` and the data.

    Initialisation and dropout draw from the global RNG inside ``torch.random.fork_rng`` (so the caller's
    RNG state is untouched); shuffling and subset selection use their own ``torch.Generator``.
    """
    if len(train) == 0:
        raise AmnesiaError("cannot train the classifier on an empty dataset")
    gen = torch.Generator().manual_seed(seed)
    images, labels = train.images, train.labels
    if recipe.max_train_images is not None and recipe.max_train_images < len(train):
        idx = torch.randperm(len(train), generator=gen)[: recipe.max_train_images]
        images, labels = images[idx], labels[idx]
    n = images.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MNISTClassifier(tuple(images.shape[1:]))  # type: ignore[arg-type]
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe.step_size, gamma=recipe.gamma)
        model.train()
        steps_per_epoch = (n + recipe.batch_size - 1) // recipe.batch_size
        bar = tqdm(
            total=recipe.epochs * steps_per_epoch,
            desc=f"training classifier (seed {seed})",
            disable=not progress,
        )
        try:
            for epoch in range(recipe.epochs):
                perm = torch.randperm(n, generator=gen)
                total, correct, loss_sum = 0, 0, 0.0
                for i in range(0, n, recipe.batch_size):
                    idx = perm[i : i + recipe.batch_size]
                    x = images[idx].float() / 255.0
                    y = labels[idx]
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += y.shape[0]
                    correct += int((logits.argmax(1) == y).sum())
                    loss_sum += loss.item() * y.shape[0]
                    bar.update(1)
                sched.step()
                logger.info(
                    "classifier epoch %d/%d: loss %.4f, train acc %.4f",
                    epoch + 1,
                    recipe.epochs,
                    loss_sum / total,
                    correct / total,
                )
                bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.4f}")
        finally:
            bar.close()
    model.eval()
    return model


def _judged_view(data: ImageDataset, image_size: int | None) -> ImageDataset:
    """The images as a model trained at ``image_size`` sees them, brought back to the native size:
    the judge of a CPU-scale model is trained on what that model could learn (docs/ddpm.md)."""
    if image_size is None or image_size == data.images.shape[-1]:
        return data
    native = data.images.shape[-1]
    return ImageDataset(resize_images(resize_images(data.images, image_size), native), data.labels)


def classifier_accuracy(model: MNISTClassifier, data: ImageDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    probs = model.predict_proba(data.images, batch_size=batch_size)
    return float((probs.argmax(1) == data.labels).double().mean())


def classifier_cache_path(cache_dir: Path, recipe: ClassifierRecipe, seed: int, dataset_name: str) -> Path:
    """Where the classifier for (dataset, recipe, seed) lives."""
    return Path(cache_dir) / f"classifier-{dataset_name}-{recipe.fingerprint()}-seed{seed}.safetensors"


def _decode_meta(value: str) -> Any:
    """``save_tensors`` stores strings verbatim and everything else as JSON."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _load_cached(
    path: Path, recipe: ClassifierRecipe, seed: int, dataset_name: str
) -> tuple[MNISTClassifier, dict[str, Any]]:
    tensors, raw_meta = load_tensors(path)  # corrupt files -> AmnesiaError
    fix = f"delete {path} to retrain it"
    try:
        meta = {k: _decode_meta(v) for k, v in raw_meta.items()}
        stored_recipe, stored_seed = meta["recipe"], meta["seed"]
        stored_dataset = meta["dataset"]
        test_accuracy, train_seconds = float(meta["test_accuracy"]), float(meta["train_seconds"])
    except (KeyError, TypeError, ValueError) as e:
        raise AmnesiaError(f"{path} has missing or invalid metadata ({e!r}); {fix}") from None
    if stored_recipe != asdict(recipe) or stored_seed != seed or stored_dataset != dataset_name:
        raise AmnesiaError(f"{path} was trained with a different recipe, seed or dataset; {fix}")
    shape = tuple(meta.get("input_shape", MNIST_SHAPE))
    try:
        model = MNISTClassifier(shape)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as e:
        raise AmnesiaError(f"{path} does not hold MNISTClassifier weights ({e}); {fix}") from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise AmnesiaError(f"{path} holds non-finite weights; {fix}")
    model.eval()
    info = _info(
        path, recipe, seed, {"test_accuracy": test_accuracy, "train_seconds": train_seconds}, "cache"
    )
    return model, info


def judged_name(dataset_name: str, image_size: int | None) -> str:
    """The name a judge is stored under: the dataset, and the size its images make a round trip through."""
    return dataset_name if image_size is None else f"{dataset_name}-via{image_size}px"


def judged_split(
    dataset_name: str, split: str, data_root: str | None = None, image_size: int | None = None
) -> ImageDataset:
    """A split of the dataset as the judge for ``image_size`` is trained and tested on."""
    return _judged_view(load_dataset(dataset_name, split, root=data_root), image_size)


def _info(
    path: Path, recipe: ClassifierRecipe, seed: int, meta: dict[str, Any], source: str
) -> dict[str, Any]:
    return {
        "path": str(path),
        "recipe_hash": recipe.fingerprint(),
        "test_accuracy": float(meta["test_accuracy"]),
        "train_seconds": float(meta["train_seconds"]),
        "cached": source != "trained",  # not trained by this call
        "source": source,
        "seed": seed,
    }


def train_and_save_classifier(
    recipe: ClassifierRecipe,
    path: Path,
    seed: int,
    dataset_name: str = "mnist",
    data_root: str | None = None,
    progress: bool = True,
    image_size: int | None = None,
) -> tuple[MNISTClassifier, dict[str, Any]]:
    """Train the judge for (dataset, recipe, seed) and write it to ``path`` in the cache format: the
    weights and, as metadata, the recipe, seed, test accuracy, training time and package versions."""
    name = judged_name(dataset_name, image_size)
    logger.info("training classifier (seed %d) -> %s", seed, path)
    train = judged_split(dataset_name, "train", data_root, image_size)
    start = time.perf_counter()
    model = train_classifier(recipe, train, seed, progress=progress)
    train_seconds = time.perf_counter() - start
    test = judged_split(dataset_name, "test", data_root, image_size)
    test_accuracy = classifier_accuracy(model, test)
    logger.info("classifier seed %d: test accuracy %.4f after %.1f s", seed, test_accuracy, train_seconds)
    metadata = {
        "format": "selective_amnesia.classifier",
        "cache_version": _CACHE_VERSION,
        "dataset": name,
        "recipe": asdict(recipe),
        "seed": seed,
        "input_shape": list(model.input_shape),
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
        "environment": environment(),
    }
    save_tensors(path, model.state_dict(), metadata)
    return model, _info(path, recipe, seed, metadata, "trained")


def load_packaged_classifier(
    recipe: ClassifierRecipe, seed: int, name: str
) -> tuple[MNISTClassifier, dict[str, Any]] | None:
    """The packaged judge for exactly (name, recipe, seed) once its sha256 is checked; None when there is
    none. One that fails the check is refused with a warning (None: the caller trains it)."""
    from selective_amnesia.evaluate import packaged

    judge = packaged.find_packaged(name, recipe.fingerprint(), seed)
    if judge is None:
        return None
    problem = packaged.verify(judge)
    if problem is None:
        try:
            model, info = _load_cached(judge.path, recipe, seed, name)
        except AmnesiaError as e:
            problem = str(e)
        else:
            info.update(source="packaged", sha256=judge.sha256)
            logger.info(
                "loaded packaged classifier %s (test accuracy %.4f)", judge.path, info["test_accuracy"]
            )
            return model, info
    logger.warning(
        "%s: not used; training this judge instead (reinstall selective-amnesia to restore it)", problem
    )
    return None


def load_or_train_classifier(
    recipe: ClassifierRecipe,
    cache_dir: Path,
    seed: int,
    dataset_name: str = "mnist",
    data_root: str | None = None,
    progress: bool = True,
    image_size: int | None = None,
) -> tuple[MNISTClassifier, dict[str, Any]]:
    """Return the judge for (dataset, recipe, seed): from the cache, else packaged, else trained now.

    1. the cache file ``classifier-{dataset}-{recipe hash}-seed{seed}.safetensors`` in ``cache_dir``: one
       that exists but is unreadable or inconsistent raises ``AmnesiaError`` rather than being replaced;
    2. the judge shipped with the package for exactly this dataset name, recipe hash and seed, after its
       sha256 matches the packaged manifest (a mismatch is refused with a warning, and step 3 runs);
    3. trained now and written to the cache file (weights and, as metadata, the recipe, seed, test
       accuracy, training time and package versions).

    Returns the model in eval mode and ``{"path", "recipe_hash", "test_accuracy", "train_seconds",
    "cached", "source", "seed"}``: ``source`` is "cache", "packaged" or "trained", ``cached`` whether it
    was not trained by this call (packaged ones add their ``sha256``).
    """
    name = judged_name(dataset_name, image_size)
    path = classifier_cache_path(Path(cache_dir), recipe, seed, name)
    if path.exists():
        model, info = _load_cached(path, recipe, seed, name)
        logger.info("loaded classifier %s (test accuracy %.4f)", path, info["test_accuracy"])
        return model, info
    found = load_packaged_classifier(recipe, seed, name)
    if found is not None:
        return found
    return train_and_save_classifier(recipe, path, seed, dataset_name, data_root, progress, image_size)
