"""Kill points for the crash tests: ``SELECTIVE_AMNESIA_KILL_AT=name:n`` makes the process SIGKILL
itself the n-th time it reaches ``faults.point(name)``.

The points sit where an interruption is most dangerous (between writing data and committing it, in the
middle of a training step, a Fisher block or an image block). Unset, ``point`` is one dict lookup.
The kill is a real SIGKILL: no ``finally``, no atexit, no flushing, exactly like ``kill -9`` or a
power cut as far as this process is concerned.
"""

from __future__ import annotations

import os
import signal

ENV = "SELECTIVE_AMNESIA_KILL_AT"
_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, n = spec.rpartition(":")
    return (name, int(n)) if name and n.isdigit() else (spec, 1)


_TARGET = _target()


def point(name: str) -> None:
    """Count a pass through kill point ``name``; SIGKILL this process if it is the chosen one."""
    if _TARGET is None or name != _TARGET[0]:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
