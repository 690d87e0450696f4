"""One image layout for the CLI and the Python API, and the files ``amnesia sample`` writes.

The layout everyone exchanges is uint8 N x H x W x C (C = 1 or 3), what PIL, numpy and FID tools read.
The models' own ``sample``/``sample_per_label`` return float N x C x H x W in the model's range (what the
loss sees); ``as_uint8_nhwc(model, x)`` converts, exactly as the CLI does.

``amnesia sample --out`` picks the format from the name:
- ``s.npz``: ``images`` (uint8 N x H x W x C), ``labels`` (int64), and ``prompts`` for text-to-image;
- ``DIR/`` (a trailing slash, an existing directory or a name without a suffix): one PNG per image,
  ``{label or prompt index}_{index}.png``, plus ``labels.json`` (file -> label) or ``prompts.json``;
- ``grid.png``: one labelled row per label or prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from selective_amnesia.models.base import ConditionalGenerativeModel


def as_uint8_nhwc(model: ConditionalGenerativeModel, x: Tensor) -> np.ndarray:
    """A model's float N x C x H x W samples -> uint8 N x H x W x C (the CLI's and the files' layout)."""
    return model.to_uint8(x).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def output_kind(out: str) -> str:
    """ "npz", "grid" or "folder", from the ``--out`` name."""
    path = Path(out)
    if out.endswith(("/", "\\")) or path.is_dir() or path.suffix == "":
        return "folder"
    return {".npz": "npz", ".png": "grid"}.get(path.suffix.lower(), "unknown")


def _to_pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(
        image[:, :, 0] if image.shape[2] == 1 else image, "L" if image.shape[2] == 1 else "RGB"
    )


def write_folder(out: Path, images: np.ndarray, labels: np.ndarray, prompts: list[str] | None) -> None:
    """One PNG per image and ``labels.json`` (class models) or ``prompts.json`` (text-to-image); the
    folder is filled under a temporary name and renamed, so it never looks complete half-written."""
    import os
    import shutil
    import tempfile

    from selective_amnesia.io.artifacts import created_mode

    names = []
    counts: dict[int, int] = {}
    for label in labels.tolist():
        i = counts.get(label, 0)
        counts[label] = i + 1
        names.append(f"{label}_{i:05d}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, image in zip(names, images, strict=True):
            _to_pil(image).save(tmp / name, format="PNG")
        if prompts is None:
            index: dict[str, Any] = {
                name: int(label) for name, label in zip(names, labels.tolist(), strict=True)
            }
            (tmp / "labels.json").write_text(json.dumps(index, indent=1) + "\n")
        else:
            files = {name: prompts[int(label)] for name, label in zip(names, labels.tolist(), strict=True)}
            (tmp / "prompts.json").write_text(
                json.dumps({"prompts": prompts, "files": files}, indent=1) + "\n"
            )
        os.chmod(tmp, created_mode(directory=True))
        if out.exists():  # --force: the old folder goes only once the new one is complete
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def grid_image(images: np.ndarray, labels: np.ndarray, names: list[str], pad: int = 2) -> np.ndarray:
    """One row per distinct label (in order of appearance), each row headed by its name."""
    from PIL import Image, ImageDraw

    order = list(dict.fromkeys(labels.tolist()))
    rows = [images[labels == label] for label in order]
    n, h, w, c = images.shape
    cols = max(len(r) for r in rows)
    text_w = max(8 * max(len(names[i]) for i in range(len(order))), 16) + 2 * pad
    width = text_w + cols * (w + pad) + pad
    height = len(rows) * (h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label_images, name) in enumerate(zip(rows, names, strict=True)):
        top = pad + r * (h + pad)
        draw.text((pad, top + max(h // 2 - 6, 0)), name, fill=(0, 0, 0))
        for k, image in enumerate(label_images):
            canvas.paste(_to_pil(image).convert("RGB"), (text_w + k * (w + pad), top))
    return np.asarray(canvas)


def write_grid(out: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """A labelled grid PNG (``names``: one caption per row, in order of first appearance)."""
    from selective_amnesia.evaluate.report import save_png

    save_png(grid_image(images, labels, names), out)


def write_npz(out: Path, images: np.ndarray, labels: np.ndarray, prompts: list[str] | None) -> None:
    from selective_amnesia.io.artifacts import atomic_path

    arrays: dict[str, Any] = {"images": images, "labels": labels.astype(np.int64)}
    if prompts is not None:
        arrays["prompts"] = np.array(prompts)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def write_samples(out: Path, images: np.ndarray, labels: np.ndarray, prompts: list[str] | None) -> str:
    """Write ``images`` (uint8 N x H x W x C) in the format ``out`` names; returns that format."""
    kind = output_kind(str(out))
    if kind == "npz":
        write_npz(out, images, labels, prompts)
    elif kind == "folder":
        write_folder(out, images, labels, prompts)
    else:
        order = list(dict.fromkeys(labels.tolist()))
        names = [_short(prompts[i]) for i in order] if prompts is not None else [str(i) for i in order]
        write_grid(out, images, labels, names)
    return kind


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"
