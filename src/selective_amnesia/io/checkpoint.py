"""Resumable training state: model, optimizer, EMA and RNG states, saved without pickle.

A checkpoint is a directory holding one ``tensors-<step>-<id>.safetensors`` file and ``state.json``,
which names that file and holds everything that is not a tensor (step, optimizer hyperparameters,
EMA scalars, ``extra``, ``key``). ``state.json`` is the commit marker and is written last, by an
atomic rename, so an interruption at any moment leaves either the previous complete checkpoint or
the new one:

1. the new tensors go to a fresh file name (the previous file is left alone);
2. ``state.json`` is renamed into place, naming the new file;
3. only then are files that ``state.json`` no longer names deleted.

Loading: a directory without ``state.json`` holds no complete checkpoint (it was interrupted before
step 2) and is ignored (``None``). A ``state.json`` that is unreadable, or whose tensor file is
missing, truncated or does not match it, cannot come from an interrupted save, so it raises
``AmnesiaError`` telling the user to delete the directory rather than silently restarting.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import atomic_path, load_tensors, read_json, save_tensors

__all__ = ["load_state", "load_training_state", "remove_training_state", "save_state", "save_training_state"]

log = logging.getLogger(__name__)

FORMAT = "selective_amnesia.training_state"
VERSION = 1
MARKER = "state.json"
_TENSORS_PREFIX = "tensors-"
_TENSORS_SUFFIX = ".safetensors"
_TENSOR_REF = "__tensor__"  # JSON placeholder {"__tensor__": name} for a tensor nested in a state dict


def save_training_state(
    path: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: Any | None = None,
    extra: dict[str, Any] | None = None,
    key: str = "",
) -> None:
    """Atomically replace the checkpoint in directory ``path`` with the current training state.

    ``ema`` is a ``diffusers.training_utils.EMAModel`` (anything with ``state_dict``/``load_state_dict``
    holding tensors, lists of tensors and JSON scalars works). ``extra`` must be JSON-serialisable;
    ``key`` identifies the settings the state belongs to (``load_training_state`` ignores other keys).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, t in _unshare(model.state_dict()).items():
        tensors[f"model.{name}"] = t
    opt_state = optimizer.state_dict()
    optim_json = {
        # JSON keys are strings; load turns them back into the int ids optimizer.load_state_dict expects.
        "state": {
            str(pid): _split(s, f"optimizer.state.{pid}", tensors) for pid, s in opt_state["state"].items()
        },
        "param_groups": _split(opt_state["param_groups"], "optimizer.param_groups", tensors),
    }
    ema_json = None if ema is None else _split(ema.state_dict(), "ema", tensors)
    tensors["rng.generator"] = generator.get_state()
    # Dropout and other ops without an explicit generator draw from the global RNG(s).
    tensors["rng.torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
            n_cuda += 1

    state = {
        "step": int(step),
        "model_keys": sorted(k[len("model.") :] for k in tensors if k.startswith("model.")),
        "optimizer": optim_json,
        "ema": ema_json,
        "cuda_rng_devices": n_cuda,
        "extra": extra if extra is not None else {},
    }
    save_state(path, tensors, state, key=key)
    log.info("saved training state at step %d to %s", step, path)


def save_state(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], *, key: str = "") -> None:
    """Atomically replace the checkpoint in directory ``path`` with ``tensors`` and the JSON ``state``.

    The generic commit protocol (module docstring) that every resumable stage uses: training, the
    Fisher's partial sums, generated image blocks.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AmnesiaError(f"checkpoint path {path} exists and is not a directory; move it away")
    step = int(state.get("step", 0))
    checkpoint_id = secrets.token_hex(4)
    tensors_name = f"{_TENSORS_PREFIX}{step:08d}-{checkpoint_id}{_TENSORS_SUFFIX}"
    marker = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "checkpoint_id": checkpoint_id,
        "tensors_file": tensors_name,
        **state,
    }
    # Serialise before touching the disk so a non-JSON state fails without leaving files behind.
    try:
        text = json.dumps(marker, indent=1) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint state is not JSON-serialisable ({e}); check `extra`") from None

    path.mkdir(parents=True, exist_ok=True)
    tensors_path = path / tensors_name
    save_tensors(tensors_path, tensors, {"checkpoint_id": checkpoint_id, "step": str(step)})
    _fsync(tensors_path)  # the data must be on disk before the marker that points at it
    faults.point("checkpoint.tensors_written")
    with atomic_path(path / MARKER) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path)
    faults.point("checkpoint.committed")
    _remove_stale(path, keep=tensors_name)


def load_state(path: Path, *, key: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and JSON state of the checkpoint in ``path``; ``None`` when there is none, it is
    incomplete, or it was saved for another ``key``/format. A damaged one raises ``AmnesiaError``."""
    path = Path(path)
    marker = path / MARKER
    if not path.exists():
        log.info("no checkpoint at %s; starting from scratch", path)
        return None
    if not path.is_dir():
        raise AmnesiaError(f"checkpoint path {path} is not a directory; move it away")
    if not marker.is_file():
        log.info("ignoring incomplete checkpoint in %s (no %s); starting from scratch", path, MARKER)
        return None
    state = _read_marker(marker)
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        log.info(
            "ignoring checkpoint in %s: format %r version %r, expected %r version %d",
            path,
            state.get("format"),
            state.get("version"),
            FORMAT,
            VERSION,
        )
        return None
    if state.get("key") != key:
        log.info("ignoring checkpoint in %s: saved for settings %r, not %r", path, state.get("key"), key)
        return None
    try:
        tensors_path = path / str(state["tensors_file"])
        tensors, meta = _read_tensors(tensors_path, path)
        if meta.get("checkpoint_id") != state["checkpoint_id"]:
            raise _damaged(path, f"{tensors_path.name} belongs to a different save than {MARKER}")
    except (KeyError, TypeError) as e:
        raise _damaged(path, f"missing or malformed entry {e}") from None
    return tensors, state


def load_training_state(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: Any | None = None,
    key: str = "",
) -> dict[str, Any] | None:
    """Restore the checkpoint in ``path`` into the given objects, in place.

    Returns ``{"step": int, "extra": dict}``, or ``None`` (logged at info level) when there is no
    complete checkpoint or it was saved with a different ``key`` or format version. A damaged
    checkpoint raises ``AmnesiaError``; nothing is modified unless every file reads back correctly.
    """
    path = Path(path)
    loaded = load_state(path, key=key)
    if loaded is None:
        return None
    tensors, state = loaded
    try:
        model_state = {k: tensors[f"model.{k}"] for k in state["model_keys"]}
        opt_state = {
            "state": {int(pid): _join(s, tensors) for pid, s in state["optimizer"]["state"].items()},
            "param_groups": _join(state["optimizer"]["param_groups"], tensors),
        }
        ema_state = None if state["ema"] is None else _join(state["ema"], tensors)
        gen_state = tensors["rng.generator"]
        torch_state = tensors["rng.torch"]
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(int(state["cuda_rng_devices"]))]
        step = int(state["step"])
        extra = state["extra"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _damaged(path, f"missing or malformed entry {e}") from None
    if ema is not None and ema_state is None:
        raise _damaged(path, "it holds no EMA state but an EMA model was given")

    # Everything is read; a failure from here on means the state does not fit these objects.
    try:
        model.load_state_dict(model_state)
        _restore_tuples(opt_state["param_groups"], optimizer.param_groups)
        optimizer.load_state_dict(opt_state)
        if ema is not None and ema_state is not None:  # both or neither, checked above
            _load_ema(ema, ema_state)
        generator.set_state(gen_state)
        torch.set_rng_state(torch_state)
        if cuda_states:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
                torch.cuda.set_rng_state_all(cuda_states)
            else:
                log.warning("CUDA RNG state of %d device(s) not restored: devices differ", len(cuda_states))
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise _damaged(path, f"it does not fit the model/optimizer being trained ({e})") from None
    log.info("resumed training state at step %d from %s", step, path)
    return {"step": step, "extra": extra}


def remove_training_state(path: Path) -> None:
    """Delete the checkpoint in ``path`` (e.g. once the final model is saved); no-op if absent.

    Only files this module writes are deleted, so a mistaken ``path`` cannot wipe unrelated data;
    the directory itself is removed when that leaves it empty.
    """
    path = Path(path)
    if not path.is_dir():
        return
    _remove_stale(path, keep=None)
    (path / MARKER).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files that are not training state", path)


# --- helpers -----------------------------------------------------------------------------------


def _damaged(path: Path, why: str) -> AmnesiaError:
    return AmnesiaError(
        f"training state in {path} is damaged: {why}; delete the directory {path} to start over"
    )


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        state = read_json(marker)
    except AmnesiaError as e:
        raise _damaged(marker.parent, str(e)) from None
    if not isinstance(state, dict):
        raise _damaged(marker.parent, f"{MARKER} is not a JSON object")
    return state


def _read_tensors(tensors_path: Path, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return load_tensors(tensors_path)
    except AmnesiaError as e:
        raise _damaged(path, str(e)) from None


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list with a JSON reference, collecting it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        name = prefix
        n = 1
        while name in tensors:  # nested keys containing "." could collide; keep names unique
            name = f"{prefix}#{n}"
            n += 1
        # Clone: state_dict() returns live references, and safetensors refuses shared storage.
        tensors[name] = obj.detach().clone()
        return {_TENSOR_REF: name}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_split``: swap ``{"__tensor__": name}`` references back for the loaded tensors."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _restore_tuples(loaded_groups: list[dict[str, Any]], current_groups: list[dict[str, Any]]) -> None:
    """JSON turned tuples (e.g. Adam's betas) into lists; give hyperparameters back their tuple type."""
    for loaded, current in zip(loaded_groups, current_groups, strict=True):
        for k, v in loaded.items():
            if isinstance(current.get(k), tuple) and isinstance(v, list):
                loaded[k] = tuple(v)


def _load_ema(ema: Any, state: dict[str, Any]) -> None:
    # Shadow params were saved from CPU copies: put them back on the device/dtype the EMA uses now.
    current = ema.state_dict()
    for name, value in state.items():
        old = current.get(name)
        if isinstance(value, list) and isinstance(old, list) and value and isinstance(value[0], torch.Tensor):
            if len(value) != len(old):
                raise ValueError(f"EMA {name} has {len(value)} tensors, expected {len(old)}")
            state[name] = [v.to(device=o.device, dtype=o.dtype) for v, o in zip(value, old, strict=True)]
    ema.load_state_dict(state)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share storage (tied weights): safetensors refuses to save shared tensors."""
    seen: set[tuple[Any, int]] = set()
    out = {}
    for k, t in state.items():
        ident = (t.device, t.untyped_storage().data_ptr())
        out[k] = t.detach().clone() if ident in seen else t
        seen.add(ident)
    return out


def _remove_stale(path: Path, keep: str | None) -> None:
    """Delete tensor files other than ``keep`` and temp files left by interrupted saves."""
    for f in path.iterdir():
        ours = f.name.startswith(_TENSORS_PREFIX) and f.name.endswith(_TENSORS_SUFFIX)
        leftover_tmp = f.name.startswith(".") and f.name.endswith(".tmp")  # from io.atomic_path
        if f.is_file() and f.name != keep and (ours or leftover_tmp):
            f.unlink(missing_ok=True)


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Persist the rename itself; not possible on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
