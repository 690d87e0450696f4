"""Fast tests of the evaluation package: metrics against closed forms, classifier cache, report files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selective_amnesia.data import ImageDataset, load_dataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate import (
    ClassifierRecipe,
    MNISTClassifier,
    accuracy,
    aggregate_seeds,
    classifier_cache_path,
    forget_metrics,
    frechet_distance,
    image_grid,
    load_or_train_classifier,
    per_class_accuracy,
    plot_losses,
    precision_recall,
    save_png,
    train_classifier,
    write_html_report,
)
from selective_amnesia.evaluate import classifier as classifier_module

# ---- forgetting metrics ------------------------------------------------------------------------------


def test_forget_metrics_uniform_probs_reach_the_paper_ideal() -> None:
    probs = torch.full((50, 10), 0.1, dtype=torch.float64)
    m = forget_metrics(probs, forget_label=3)
    assert m["p_forget"] == pytest.approx(0.1, abs=1e-12)
    assert m["entropy"] == pytest.approx(math.log(10), abs=1e-9)
    assert m["frac_classified_forget"] == 0.0  # ties go to argmax index 0, not 3
    assert m["n"] == 50


def test_forget_metrics_one_hot_is_certain() -> None:
    probs = torch.nn.functional.one_hot(torch.zeros(7, dtype=torch.long), 10).double()
    m = forget_metrics(probs, forget_label=0)
    assert m["p_forget"] == 1.0
    assert m["entropy"] == 0.0  # 0 log 0 = 0, not NaN
    assert m["frac_classified_forget"] == 1.0


def test_forget_metrics_mixed_rows() -> None:
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    m = forget_metrics(probs, forget_label=1)
    assert m["p_forget"] == pytest.approx(0.75)
    assert m["entropy"] == pytest.approx(math.log(2) / 2)
    assert m["frac_classified_forget"] == pytest.approx(0.5)  # row 0 ties -> index 0


@pytest.mark.parametrize(
    "probs, label",
    [
        (torch.full((4, 10), 0.1), 10),  # label out of range
        (torch.full((4, 10), 0.2), 0),  # rows do not sum to 1
        (torch.randn(4, 10), 0),  # logits, not probabilities
        (torch.full((10,), 0.1), 0),  # not 2-D
        (torch.full((4, 10), float("nan")), 0),
    ],
)
def test_forget_metrics_rejects_bad_input(probs: torch.Tensor, label: int) -> None:
    with pytest.raises(ValueError):
        forget_metrics(probs, label)


def test_accuracy_and_per_class() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    assert accuracy(probs, labels) == pytest.approx(0.75)
    assert per_class_accuracy(probs, labels) == {0: 1.0, 1: pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        accuracy(probs, labels[:3])


def test_aggregate_seeds_mean_and_sample_std() -> None:
    per_seed = [{"entropy": 2.0, "p_forget": 0.1, "n": 5}, {"entropy": 2.2, "p_forget": 0.3, "n": 5}]
    agg = aggregate_seeds(per_seed)
    assert agg["entropy"] == pytest.approx(2.1)
    assert agg["entropy_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
    assert agg["classifier_seeds"] == 2
    assert aggregate_seeds(per_seed[:1])["entropy_std"] == 0.0


# ---- Frechet distance and precision/recall ------------------------------------------------------------


def _gaussian(n: int, d: int, seed: int, shift: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x if shift is None else x + shift


def test_frechet_distance_identical_features_is_zero() -> None:
    x = torch.relu(_gaussian(500, 16, seed=0))  # ReLU-like features with some exact zeros
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_form_for_mean_shift() -> None:
    # N(0, I) vs N(mu, I): FID = ||mu||^2. Sample estimates with 20k points each are within ~0.05.
    d = 8
    distances = []
    for norm2 in (0.0, 1.0, 4.0):
        mu = torch.zeros(d, dtype=torch.float64)
        mu[0] = math.sqrt(norm2)
        fid = frechet_distance(_gaussian(20_000, d, seed=1), _gaussian(20_000, d, seed=2, shift=mu))
        assert fid == pytest.approx(norm2, abs=0.05)
        distances.append(fid)
    assert distances[0] < distances[1] < distances[2]


def test_frechet_distance_matches_scipy_reference() -> None:
    from scipy import linalg

    g = torch.Generator().manual_seed(3)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64
    )
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 1
    an, bn = a.numpy(), b.numpy()
    mu1, mu2 = an.mean(0), bn.mean(0)
    s1, s2 = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(an, b) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "a, b",
    [
        (torch.zeros(1, 4), torch.zeros(5, 4)),  # one sample
        (torch.zeros(5, 4), torch.zeros(5, 3)),  # dimension mismatch
        (torch.full((5, 4), float("inf")), torch.zeros(5, 4)),
        (torch.zeros(5), torch.zeros(5)),  # not a matrix
    ],
)
def test_frechet_distance_rejects_bad_input(a: torch.Tensor, b: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        frechet_distance(a, b)


def test_precision_recall_sanity(capsys: pytest.CaptureFixture[str]) -> None:
    real = _gaussian(600, 4, seed=4)
    same = _gaussian(600, 4, seed=5)
    far = _gaussian(600, 4, seed=6, shift=torch.full((4,), 20.0, dtype=torch.float64))
    close = precision_recall(real, same, nearest_k=5)
    assert set(close) == {"precision", "recall", "density", "coverage"}
    assert close["precision"] > 0.8 and close["recall"] > 0.8 and close["coverage"] > 0.8
    apart = precision_recall(real, far, nearest_k=5)
    assert apart["precision"] == 0.0 and apart["recall"] == 0.0 and apart["coverage"] == 0.0
    assert capsys.readouterr().out == ""  # prdc's print is swallowed
    with pytest.raises(ValueError):
        precision_recall(real[:5], same, nearest_k=5)


# ---- classifier -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_small() -> tuple[ImageDataset, ImageDataset]:
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    return (
        ImageDataset(train.images[:2000], train.labels[:2000]),
        ImageDataset(test.images[:500], test.labels[:500]),
    )


TINY = ClassifierRecipe(epochs=2, batch_size=32, lr=3e-3, max_train_images=1024)


def test_classifier_shapes_and_probabilities() -> None:
    torch.manual_seed(0)
    model = MNISTClassifier()
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 50)
    assert (model.features(x) >= 0).all()  # post-ReLU
    probs = model.predict_proba(x, batch_size=2)
    assert probs.dtype == torch.float64 and probs.shape == (3, 10)
    assert torch.allclose(probs.sum(1), torch.ones(3, dtype=torch.float64))
    # uint8 images are accepted and mean the same thing as their [0, 1] float version
    x8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(model.predict_proba(x8), model.predict_proba(x8.float() / 255))
    assert model.training  # predict_proba restores the mode it found
    assert model.extract_features(x).shape == (3, 50)
    p2, f2 = model.predict_proba_and_features(x, batch_size=2)
    model.eval()
    assert torch.allclose(p2, probs) and torch.allclose(f2, model.features(x).double())
    with pytest.raises(ValueError):
        model.predict_proba(torch.rand(3, 28, 28))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": -1},
        {"lr": 0.0},
        {"gamma": 2.0},
        {"max_train_images": 0},
        {"epochs": 1.5},
    ],
)
def test_recipe_validation(kwargs: dict) -> None:
    with pytest.raises(AmnesiaError):
        ClassifierRecipe(**kwargs)


def test_train_classifier_is_deterministic_and_learns(mnist_small: tuple[ImageDataset, ImageDataset]) -> None:
    train, test = mnist_small
    rng_before = torch.get_rng_state()
    a = train_classifier(TINY, train, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    b = train_classifier(TINY, train, seed=7, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not a.training
    acc = accuracy(a.predict_proba(test.images), test.labels)
    assert acc > 0.5  # 1024 images, two epochs: far above the 0.1 of chance


def test_classifier_cache_round_trip_and_corruption(
    tmp_path: Path, mnist_small: tuple[ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, test = mnist_small
    monkeypatch.setattr(
        classifier_module, "load_dataset", lambda name, split, root=None: train if split == "train" else test
    )
    model, info = load_or_train_classifier(TINY, tmp_path, seed=1, progress=False)
    path = classifier_cache_path(tmp_path, TINY, 1, "mnist")
    assert info["cached"] is False and Path(info["path"]) == path and path.is_file()
    assert path.name.startswith("classifier-mnist-") and path.name.endswith("-seed1.safetensors")
    assert 0.5 < info["test_accuracy"] <= 1.0

    again, info2 = load_or_train_classifier(TINY, tmp_path, seed=1, progress=False)
    assert info2["cached"] is True
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert info2["train_seconds"] == info["train_seconds"]
    assert not again.training
    assert torch.equal(model.predict_proba(test.images[:64]), again.predict_proba(test.images[:64]))

    # a different seed or recipe is a different file
    assert classifier_cache_path(tmp_path, TINY, 2, "mnist") != path
    other = ClassifierRecipe(epochs=2, lr=1e-3, max_train_images=512)
    assert classifier_cache_path(tmp_path, other, 1, "mnist") != path

    path.write_bytes(b"not a safetensors file")
    with pytest.raises(AmnesiaError):
        load_or_train_classifier(TINY, tmp_path, seed=1, progress=False)


# ---- report -----------------------------------------------------------------------------------------


def test_image_grid_layout() -> None:
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous()
    grid = image_grid(imgs, nrow=4)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * 30 + 2, 4 * 30 + 2, 1)
    assert grid[2, 2, 0] == 0 and grid[2, 32, 0] == 1 and grid[32, 2, 0] == 4
    assert grid[0, 0, 0] == 255 and grid[-1, -1, 0] == 255  # padding and empty cells
    rgb = image_grid(torch.zeros(2, 3, 5, 5, dtype=torch.uint8), nrow=8)
    assert rgb.shape == (9, 16, 3)
    with pytest.raises(ValueError):
        image_grid(torch.zeros(2, 1, 5, 5), nrow=2)  # float, not uint8


def test_save_png_and_plot_losses(tmp_path: Path) -> None:
    grid = image_grid(torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), nrow=3)
    save_png(grid, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (grid.shape[1], grid.shape[0]) and im.mode == "L"
        assert np.array_equal(np.asarray(im), grid[:, :, 0])
    steps = list(range(0, 100, 10))
    history = {
        "total": [10.0 / (s + 1) for s in steps],
        "fisher": [0.0] * 10,
        "replay": [-1.0 + s for s in steps],
    }
    plot_losses(history, steps, tmp_path / "losses.png")
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_losses({"total": [1.0]}, steps, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "losses.png"]  # no temporaries left


def test_write_html_report(tmp_path: Path) -> None:
    report = {
        "title": "MNIST <forget 0>",
        "forget_label": 0,
        "metrics": {
            "base": {
                "p_forget": 0.9671,
                "entropy": 0.1234,
                "entropy_std": 0.0101,
                "frac_classified_forget": 0.99,
                "remembered_accuracy": 0.9876,
                "fid": 1.2345,
                "precision": 0.81,
                "recall": 0.79,
                "classifier_seeds": 3,
            },
            "forget": {"p_forget": 0.0581, "entropy": 2.2876, "entropy_std": 0.0042, "kl_extra": 0.5},
        },
        "timings": {"forget_s": 12.5},
        "config": {"forget": {"label": 0, "lambda": 100}},
        "environment": {"torch": "2.13.0"},
    }
    path = write_html_report(tmp_path, report, {"before": "before.png", "losses": "losses.png"})
    assert path == tmp_path / "report.html"
    text = path.read_text()
    for needle in ("0.9671", "0.0581", "2.2876", "0.0042", "1.2345", "0.9876", "12.5000", "2.13.0"):
        assert needle in text
    assert "MNIST &lt;forget 0&gt;" in text and "<forget 0>" not in text  # escaped
    assert 'src="before.png"' in text and 'src="losses.png"' in text
    assert "\u2014" in text  # the forgotten model's missing FID etc.
    assert "kl_extra" in text and "lambda: 100" in text
    # an empty report still renders
    write_html_report(tmp_path, {}, {})
    assert "Selective Amnesia report" in (tmp_path / "report.html").read_text()


def test_classifier_takes_other_datasets_native_shapes() -> None:
    from selective_amnesia.evaluate.classifier import FEATURE_DIM, MNISTClassifier

    rgb = MNISTClassifier((3, 32, 32))
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    probs, feats = rgb.predict_proba_and_features(x)
    assert probs.shape == (5, 10) and feats.shape == (5, FEATURE_DIM)
    assert torch.allclose(probs.sum(1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        rgb.predict_proba(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 28x28"):
        MNISTClassifier((1, 16, 16))
