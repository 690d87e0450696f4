"""Evaluation classifiers ("judges") that ship inside the package, so a first run does not train them.

``judges/`` beside this module holds safetensors files named like the user cache's
(``classifier-{dataset}-{recipe hash}-seed{seed}.safetensors``) and ``manifest.json``, which lists for
each file its dataset, seed, full training recipe, recipe hash, test accuracy and sha256.
``load_or_train_classifier`` looks in the user cache first, then here (only for an exact match of dataset
name, recipe hash and seed), and trains only when neither has the judge. A packaged file is used only
after its sha256 matches the manifest; one that does not is refused (a warning names it) and the judge is
trained into the user cache as if nothing were packaged. The sha256 guards against a damaged or edited
file, not against someone who can rewrite the manifest too. Only safetensors are read: nothing is
unpickled.

Maintainers: ``amnesia classifiers --retrain --config CFG --out DIR`` trains judges in the cache format;
copy them into ``judges/`` and run ``python -m selective_amnesia.evaluate.packaged`` to rewrite the
manifest from the files' own metadata.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selective_amnesia.errors import AmnesiaError

PACKAGE_DIR = Path(__file__).resolve().parent / "judges"
MANIFEST = "manifest.json"
FORMAT = "selective_amnesia.packaged_judges"
_HEADER_LIMIT = 1 << 20  # a judge's safetensors header is a few kB


@dataclass(frozen=True)
class PackagedJudge:
    """One manifest entry: a packaged judge and what it was trained with."""

    file: str
    dataset: str
    recipe_hash: str
    seed: int
    recipe: dict[str, Any]
    cache_version: int
    sha256: str
    test_accuracy: float
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / self.file


def judges_dir() -> Path:
    """The folder of the packaged judges (tests point ``PACKAGE_DIR`` elsewhere)."""
    return PACKAGE_DIR


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(raw: Any, where: Path, directory: Path) -> PackagedJudge:
    try:
        judge = PackagedJudge(
            file=str(raw["file"]),
            dataset=str(raw["dataset"]),
            recipe_hash=str(raw["recipe_hash"]),
            seed=int(raw["seed"]),
            recipe=dict(raw["recipe"]),
            cache_version=int(raw["cache_version"]),
            sha256=str(raw["sha256"]).lower(),
            test_accuracy=float(raw["test_accuracy"]),
            directory=directory,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AmnesiaError(f"{where} has an invalid entry ({e!r}): reinstall selective-amnesia") from None
    if Path(judge.file).name != judge.file or not judge.file.endswith(".safetensors"):
        raise AmnesiaError(f"{where} names {judge.file!r}, not a .safetensors file beside it")
    return judge


def read_manifest(directory: Path | None = None) -> list[PackagedJudge]:
    """The packaged judges; none when the folder or its manifest is absent. A manifest that cannot be
    read raises ``AmnesiaError``."""
    directory = judges_dir() if directory is None else Path(directory)
    where = directory / MANIFEST
    if not where.is_file():
        return []
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AmnesiaError(f"{where} is not readable JSON ({e}): reinstall selective-amnesia") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("judges"), list):
        raise AmnesiaError(f"{where} is not a packaged-judges manifest: reinstall selective-amnesia")
    return [_entry(raw, where, directory) for raw in data["judges"]]


def find_packaged(
    dataset: str, recipe_hash: str, seed: int, directory: Path | None = None
) -> PackagedJudge | None:
    """The packaged judge for exactly this (dataset name, recipe hash, seed), else None."""
    for judge in read_manifest(directory):
        if (judge.dataset, judge.recipe_hash, judge.seed) == (dataset, recipe_hash, seed):
            return judge
    return None


def verify(judge: PackagedJudge) -> str | None:
    """None when the file exists and its sha256 is the manifest's; else what is wrong, in one sentence."""
    if not judge.path.is_file():
        return f"packaged judge {judge.path} is missing"
    found = sha256_of(judge.path)
    if found != judge.sha256:
        return (
            f"packaged judge {judge.path} has sha256 {found[:16]}..., not the manifest's "
            f"{judge.sha256[:16]}... (a damaged or edited file)"
        )
    return None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its JSON header alone (no tensors, no torch)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise AmnesiaError(f"{path} is not a safetensors file (no header)")
        (size,) = struct.unpack("<Q", head)
        if size > _HEADER_LIMIT:
            raise AmnesiaError(f"{path} is not a judge's safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise AmnesiaError(f"{path} is not a safetensors file ({e})") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def manifest_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a judge file written by ``load_or_train_classifier``, from its metadata; its
    recipe hash is recomputed with the current code and must be the one in its name."""
    from selective_amnesia.evaluate.classifier import ClassifierRecipe  # the classifier imports this module

    meta = safetensors_metadata(path)
    try:
        recipe = json.loads(meta["recipe"])
        seed, version = int(meta["seed"]), int(meta["cache_version"])
        dataset, accuracy = meta["dataset"], float(meta["test_accuracy"])
    except (KeyError, TypeError, ValueError) as e:
        raise AmnesiaError(f"{path} lacks the classifier metadata ({e!r}): not a judge file") from None
    recipe_hash = ClassifierRecipe(**recipe).fingerprint()
    expected = f"classifier-{dataset}-{recipe_hash}-seed{seed}.safetensors"
    if path.name != expected:
        raise AmnesiaError(f"{path} holds the judge {expected} (its metadata, the current code's hash)")
    return {
        "file": path.name,
        "dataset": dataset,
        "recipe_hash": recipe_hash,
        "seed": seed,
        "recipe": recipe,
        "cache_version": version,
        "input_shape": json.loads(meta.get("input_shape", "[1, 28, 28]")),
        "test_accuracy": accuracy,
        "train_seconds": float(meta.get("train_seconds", "nan")),
        "trained_with": json.loads(meta.get("environment", "{}")),
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
    }


def write_manifest(directory: Path | None = None) -> Path:
    """Rewrite ``manifest.json`` from the ``.safetensors`` files in ``directory`` (sorted by name)."""
    directory = judges_dir() if directory is None else Path(directory)
    entries = [manifest_entry(p) for p in sorted(directory.glob("*.safetensors"))]
    data = {
        "format": FORMAT,
        "about": "judges shipped with selective-amnesia; rewritten by `python -m "
        "selective_amnesia.evaluate.packaged` from the files' metadata (docs/mnist_cvae.md)",
        "judges": entries,
    }
    where = directory / MANIFEST
    where.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return where


if __name__ == "__main__":  # python -m selective_amnesia.evaluate.packaged [DIR]
    written = write_manifest(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"wrote {written}")
