"""The one key and the one reuse rule of every stage and cache (selective_amnesia.core.cache_keys)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selective_amnesia.core.cache_keys import (
    block_set,
    cached_set,
    finished,
    reusable,
    set_file,
    settings_hash,
)
from selective_amnesia.core.sampling import blockwise_sets
from selective_amnesia.io.artifacts import load_tensors, write_json


def test_settings_hash_ignores_key_order_and_tuples() -> None:
    a = {"model": "ab12", "sampler": {"steps": 4, "scale": 7.5}, "labels": (1, 2)}
    b = json.loads(json.dumps({"labels": [1, 2], "sampler": {"scale": 7.5, "steps": 4}, "model": "ab12"}))
    assert settings_hash(a, 3) == settings_hash(b, 3) != settings_hash(b, 4)
    assert len(settings_hash(a)) == 16


def test_cached_set_regenerates_when_the_key_differs(tmp_path: Path) -> None:
    made: list[int] = []

    def make(value: float) -> torch.Tensor:
        made.append(1)
        return torch.full((2, 3), value)

    slot = {"prompt": "a red car"}
    first, new = cached_set(tmp_path, slot, {"seed": 0}, lambda: make(1.0))
    assert new and set_file(tmp_path, slot) == tmp_path / f"{settings_hash(slot)}.safetensors"
    _, meta = load_tensors(tmp_path / f"{settings_hash(slot)}.safetensors")
    assert meta["key"] == settings_hash({"seed": 0})  # the key's hash travels with the file
    again, new = cached_set(tmp_path, slot, {"seed": 0}, lambda: make(2.0))
    assert not new and torch.equal(again, first) and len(made) == 1  # read back, not made again
    other, new = cached_set(tmp_path, slot, {"seed": 1}, lambda: make(2.0))
    assert new and torch.equal(other, torch.full((2, 3), 2.0)) and len(made) == 2  # another key: made again
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # in the same file (the slot's), replaced
    assert torch.equal(cached_set(tmp_path, slot, {"seed": 1}, lambda: make(3.0))[0], other)
    # no cache folder: always made, nothing written
    assert cached_set(None, slot, {"seed": 0}, lambda: make(4.0))[1] and len(made) == 3


def test_block_sets_resume_and_regenerate_by_key(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    def make(lo: int, n: int) -> torch.Tensor:
        calls.append((lo, n))
        return torch.arange(lo, lo + n, dtype=torch.float32)

    (a,) = blockwise_sets([block_set(tmp_path, "s", {"k": 1}, 5, 2, make, "x")])
    assert torch.equal(a, torch.arange(5.0)) and calls == [(0, 2), (2, 2), (4, 1)]
    blockwise_sets([block_set(tmp_path, "s", {"k": 1}, 5, 2, make, "x")])
    assert len(calls) == 3  # the whole set is stored under its key
    blockwise_sets([block_set(tmp_path, "s", {"k": 2}, 5, 2, make, "x")])
    assert len(calls) == 6  # another key: made again


def test_finished_reads_the_metadata_each_output_writes_last(tmp_path: Path) -> None:
    cls, pipe, lora = tmp_path / "cls", tmp_path / "pipe", tmp_path / "lora"
    assert not reusable(cls, "k") and finished(cls, "k") is None  # nothing there
    write_json(cls / "config.json", {"family": "cvae", "settings_hash": "k", "history": {"steps": [1]}})
    write_json(pipe / "model_index.json", {"_class_name": "x", "_selective_amnesia": {"settings_hash": "k"}})
    write_json(lora / "amnesia.json", {"settings_hash": "k"})
    for path in (cls, pipe, lora):
        assert reusable(path, "k") and not reusable(path, "other"), path
    assert finished(cls, "k") == {"family": "cvae", "settings_hash": "k", "history": {"steps": [1]}}
    assert finished(cls, "other") is None
