"""Optional experiment tracking: the loss terms of pretraining and forgetting sent to TensorBoard through
accelerate's tracker (``report_to: tensorboard``, ``amnesia run --report_to tensorboard``), written to
``OUT/logs/``; ``tensorboard --logdir OUT/logs`` shows them. Off by default; the report's plots do not
depend on it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selective_amnesia.errors import AmnesiaError

REPORT_TO = ("none", "tensorboard")
_tracker: Any = None


def check_available(report_to: str) -> None:
    """A clear error before any work when the tracker's package is missing."""
    if report_to not in REPORT_TO:
        raise AmnesiaError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to == "tensorboard" and not any(
        importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX")
    ):
        raise AmnesiaError("report_to=tensorboard needs the tensorboard package: pip install tensorboard")


@contextmanager
def session(report_to: str, logging_dir: str | Path, run_name: str) -> Iterator[None]:
    """Send what ``log`` receives inside the block to the tracker ``report_to`` (nothing for "none")."""
    global _tracker
    check_available(report_to)
    if report_to == "none":
        yield
        return
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(run_name, str(logging_dir))
    tracker.start()  # what Accelerator.init_trackers does: opens the writer (on the main process)
    _tracker = tracker
    try:
        yield
    finally:
        _tracker = None
        tracker.finish()


def log(phase: str, step: int, values: dict[str, float]) -> None:
    """Loss terms of ``phase`` ("forgetting", "pretraining") at ``step``, as ``phase/term`` scalars."""
    if _tracker is not None:
        _tracker.log({f"{phase}/{k}": v for k, v in values.items()}, step=step)
