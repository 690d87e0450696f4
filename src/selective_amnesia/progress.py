"""What a long command tells the person waiting: a header before each stage and named progress bars.

Headers and notes go to stderr (stdout keeps the results), beside tqdm's bars; ``amnesia -q`` silences
them and the bars.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``-q``: no stage headers or notes (the CLI also turns the bars off)."""
    global _quiet
    _quiet = quiet


def note(text: str) -> None:
    """One line for the person waiting (not a result: those go to stdout)."""
    if not _quiet:
        print(text, file=sys.stderr, flush=True)


def stage(k: int, n: int, title: str) -> None:
    """The header of stage ``k`` of ``n``: ``[2/5] Fisher (50,000 samples)``."""
    note(f"[{k}/{n}] {title}")


@contextmanager
def bar_name(module: Any, desc: str) -> Iterator[None]:
    """Bars that ``module`` opens inside the block are named ``desc`` (what they do, which seed or label).

    The sampling helpers name every bar "sampling"; this names them for the stage without changing their
    signatures. It replaces ``module.tqdm`` for the block, so it is for the main thread's CLI work only.
    """
    original = module.tqdm

    def named(*args: Any, **kwargs: Any) -> Any:
        kwargs["desc"] = desc
        return original(*args, **kwargs)

    module.tqdm = named
    try:
        yield
    finally:
        module.tqdm = original
