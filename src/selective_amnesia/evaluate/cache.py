"""The user cache directory: evaluation classifiers that do not ship with the package (trained once,
minutes each), shared by every run, whatever directory it is started from."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "SELECTIVE_AMNESIA_CACHE"
_announced: set[str] = set()


def user_cache_dir() -> Path:
    """``$SELECTIVE_AMNESIA_CACHE``, else the platform's user cache directory (platformdirs when it is
    installed), else ``$XDG_CACHE_HOME/selective-amnesia`` or ``~/.cache/selective-amnesia``."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
        return Path(base).expanduser() / "selective-amnesia"
    return Path(platformdirs.user_cache_dir("selective-amnesia", appauthor=False))


def resolve_cache_dir(setting: str | None) -> Path:
    """``classifier.cache_dir`` as a path (``~`` expanded); empty or None: the user cache."""
    return Path(setting).expanduser() if setting else user_cache_dir()


def announce(path: Path) -> bool:
    """Whether ``path`` is being used for the first time in this process (to say so once)."""
    key = str(path)
    if key in _announced:
        return False
    _announced.add(key)
    return True
