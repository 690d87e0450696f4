"""Finding a dataset's files under a user-given directory, with an error that says what to do."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from selective_amnesia.errors import AmnesiaError


def find_dataset_dir(
    root: str | Path, *, name: str, subdir: str, markers: Iterable[str], archive: str, expected: str
) -> Path:
    """``root/subdir`` if it exists, else ``root`` if it holds any of ``markers``; otherwise an error
    that mentions ``archive`` (with the command to unpack it) when it lies in ``root``."""
    root = Path(root).expanduser()
    nested = root / subdir
    if nested.is_dir():
        return nested
    if any((root / marker).is_file() for marker in markers):
        return root
    hint = "" if root.is_dir() else " (no such directory)"
    if (root / archive).is_file():
        hint = f" (it has {archive}: run `tar xzf {archive} -C {root}`)"
    raise AmnesiaError(f"{name} not found in {root}{hint}: {expected}")
