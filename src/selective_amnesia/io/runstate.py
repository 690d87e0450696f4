"""Who is writing an output, and whether it is finished.

- ``output_lock(out)``: an exclusive ``flock`` on ``.<name>.lock`` beside ``out``. A second ``amnesia``
  process writing the same ``--out`` is refused at once; the kernel drops the lock when its holder dies
  (even by SIGKILL), so a crashed run never blocks the rerun that resumes it.
- ``begin(out_dir, command)`` / ``finish``: ``amnesia_run.json`` in a run or model directory records
  ``running``, ``complete`` or ``failed`` (with the error). ``begin`` is called only after the inputs are
  validated, so bad input never marks an existing directory. ``check_complete`` makes readers
  (``sample``, ``evaluate``, ``forget --model``...) refuse a directory that is not ``complete``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import read_json, write_json

log = logging.getLogger(__name__)

STATE_FILE = "amnesia_run.json"
_active: dict[str, Any] = {}


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold the write lock of ``out`` for the duration of the block, or raise ``AmnesiaError``."""
    import fcntl

    out = Path(out).resolve()  # one lock for every path (symlinks, ..) that names the same output
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    tries = 0
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tries += 1
            if tries < 5:  # another writer's check of nested locks holds this one for microseconds
                os.close(fd)
                time.sleep(0.02)
                continue
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AmnesiaError(
                f"{out} is being written by {holder}: wait for it to finish or choose another --out"
            ) from None
        try:  # a releasing holder unlinks the file: the one we locked must still be the one at `lock`
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"amnesia (pid {os.getpid()})\n".encode())
        # one writer per tree: taken first, then checked, so of two racing writers at least one sees
        # the other (both may be refused; neither writes into the other's tree)
        nested = _locked_relative(out, lock)
        if nested is not None:
            where, holder = nested
            raise AmnesiaError(
                f"{where} is being written by {holder}, and {out} "
                f"{'lies inside it' if out.is_relative_to(where) else 'contains it'}: wait for it to "
                "finish or choose another --out"
            )
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def _holder(lock: Path) -> str | None:
    """Who holds the lock file ``lock`` ("amnesia (pid N)"), or None when nobody does."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only if no one holds it exclusively
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # drops the shared lock too
    return None


def _locked_relative(out: Path, own: Path) -> tuple[Path, str] | None:
    """A locked output that contains ``out`` or lies inside it (``own`` is this process's lock file)."""
    for parent in out.parents:  # outputs containing out: their lock sits beside them
        if parent.parent == parent:
            break
        holder = _holder(lock_path(parent))
        if holder is not None:
            return parent, holder
    if out.is_dir():  # outputs inside out: a lock file anywhere in its tree
        for root, _dirs, files in os.walk(out):
            for name in files:
                if name.startswith(".") and name.endswith(".lock") and Path(root, name) != own:
                    holder = _holder(Path(root, name))
                    if holder is not None:
                        return Path(root, name[1 : -len(".lock")]), holder
    return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def begin(out_dir: str | Path, command: str) -> None:
    """Mark ``out_dir`` as being written by ``command`` (call once the inputs are validated)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun / accelerate launch process 0 alone records the run (and holds the lock)
    state = {
        "status": "running",
        "command": command,
        "argv": sys.argv[1:],
        "pid": os.getpid(),
        "started": _now(),
    }
    write_json(out_dir / STATE_FILE, state)
    _active.clear()
    _active.update(path=out_dir / STATE_FILE, state=state)


def finish(error: str | None = None) -> None:
    """Record how the command that called ``begin`` ended (no-op if none did)."""
    if not _active:
        return
    path, state = _active["path"], dict(_active["state"], finished=_now())
    _active.clear()
    state["status"] = "failed" if error else "complete"
    if error:
        state["error"] = error
    write_json(path, state)


def check_complete(path: str | Path) -> None:
    """Refuse a directory whose ``amnesia_run.json`` says it is not finished."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        return
    state = read_json(state_file)
    status = state.get("status") if isinstance(state, dict) else None
    if status == "complete":
        return
    command = state.get("command", "?") if isinstance(state, dict) else "?"
    why = f"its last `amnesia {command}` {'failed' if status == 'failed' else 'did not finish'}"
    raise AmnesiaError(
        f"{path} is not a complete output ({why}): rerun that command with the same --out to finish it"
    )
