"""How every stage and every cache decides that something stored may be reused: one key, one rule.

- ``settings_hash(*parts)``: the key of anything made from settings, the sha256 of the parts as sorted
  JSON (16 hex digits). Key order and tuples versus lists do not change it, so metadata read back
  from a file gives the key its freshly made original gave. The stages' keys (base model, Fisher,
  forgetting, a sequence's steps) and the generated sets' keys (replay and surrogate latents of
  text-to-image runs, evaluation images) are all made by it.
- ``finished(path, key)``: a finished output made under ``key``. An output's metadata file is written
  last (``model_index.json``'s ``_selective_amnesia`` entry for a diffusers pipeline, ``amnesia.json``
  for a LoRA adapter, else ``config.json``) and carries ``settings_hash``: an interrupted write or
  other settings are never reused. A forgetting stage (class or text-to-image, single run or sequence
  step) and the base model stage are reused by this rule.
- ``set_file``, ``cached_set``, ``block_set``: a generated set in a cache folder, one safetensors file
  per slot (a prompt, a batch of rows), named by the slot's hash and holding its key's hash in its
  metadata; a file whose key differs is made again (``io.cached_tensor``: atomic writes, no pickle).
  ``block_set`` keeps each finished block while the set is made (``sampling.blockwise_sets``), so an
  interrupted set resumes and several processes share the blocks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_amnesia.io.artifacts import cached_tensor, read_json

if TYPE_CHECKING:
    from torch import Tensor

    from selective_amnesia.core.distributed import Share
    from selective_amnesia.core.sampling import BlockSet

# the metadata file an output writes last: a diffusers pipeline's (its own entry in it), a LoRA adapter's
PIPELINE_INDEX, ADAPTER_META = "model_index.json", "amnesia.json"


def settings_hash(*parts: Any) -> str:
    """sha256 of ``parts`` as JSON with sorted keys (anything else as its ``str``), 16 hex digits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stored_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of the finished output ``path`` (a model directory or a LoRA adapter), else None."""
    index, adapter, config = path / PIPELINE_INDEX, path / ADAPTER_META, path / "config.json"
    if index.is_file():
        from selective_amnesia.models.text_to_image import META_KEY

        meta = read_json(index)
        meta = meta.get(META_KEY) if isinstance(meta, dict) else None
    elif adapter.is_file():
        meta = read_json(adapter)
    elif config.is_file():
        meta = read_json(config)
    else:
        return None
    return meta if isinstance(meta, dict) else None


def reusable(path: Path, key: str) -> bool:
    """``path`` is a finished output made under ``key`` (its metadata's ``settings_hash``)."""
    meta = stored_metadata(path)
    return meta is not None and meta.get("settings_hash") == key


def finished(path: Path, key: str, share: Share | None = None) -> dict[str, Any] | None:
    """The metadata of ``path`` when it is a finished output made under ``key``, else None. With several
    processes (``share``) it is reused only if every process sees it so, and all decide together before
    process 0 may write (``agree`` is a collective)."""
    ok = reusable(path, key)
    if share is not None:
        ok = share.agree([ok])[0]
    return stored_metadata(path) if ok else None


def set_file(cache_dir: Path | None, slot: Any) -> Path | None:
    """The file of one generated set in ``cache_dir``: named by the hash of its ``slot`` (what it is
    of, e.g. ``{"prompt": p}``), so a set made again with other settings replaces it. None: no cache."""
    return cache_dir / f"{settings_hash(slot)}.safetensors" if cache_dir is not None else None


def cached_set(
    cache_dir: Path | None, slot: Any, key: Any, make: Callable[[], Tensor], name: str = "images"
) -> tuple[Tensor, bool]:
    """The tensor stored for ``slot`` in ``cache_dir`` when it was made under ``key`` (anything
    JSON-able: its ``settings_hash`` is kept in the file's metadata), else ``make()``, written there
    atomically. Returns the tensor and whether it was made now."""
    return cached_tensor(set_file(cache_dir, slot), settings_hash(key), name, make)


def block_set(
    cache_dir: Path | None,
    slot: Any,
    key: Any,
    total: int,
    block: int,
    make: Callable[[int, int], Tensor],
    name: str,
) -> BlockSet:
    """``cached_set`` made block by block (``make(lo, n)``), for ``sampling.blockwise_sets``."""
    from selective_amnesia.core.sampling import BlockSet

    return BlockSet(set_file(cache_dir, slot), settings_hash(key), total, block, make, name)
