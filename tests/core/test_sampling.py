"""Small generated sets drawn in shared calls: which calls, and each block drawn once."""

from __future__ import annotations

from pathlib import Path

import torch

from selective_amnesia.core.sampling import BlockSet, SharedCalls, blockwise_sets, call_groups
from selective_amnesia.io.artifacts import save_tensors


def test_calls_group_the_one_block_sets_not_stored(tmp_path: Path) -> None:
    sets = [
        BlockSet(tmp_path / f"set{i}.safetensors", f"k{i}", n, 4, None, "x")
        for i, n in enumerate([2, 2, 9, 2, 2, 2])
    ]  # type: ignore[arg-type]
    save_tensors(tmp_path / "set1.safetensors", {"x": torch.zeros(2)}, {"key": "k1"})
    # set 1 is stored and set 2 takes several blocks (drawn alone); the rest go two to a call
    assert call_groups(sets, 2) == [[(0, 0, 2), (3, 0, 2)], [(4, 0, 2), (5, 0, 2)]]


def test_shared_calls_draw_each_block_once() -> None:
    drawn: list[list[tuple[int, int, int]]] = []

    def draw(blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        drawn.append(blocks)
        return torch.cat([torch.arange(lo, lo + n) + 100 * i for i, lo, n in blocks]).float()

    calls = SharedCalls(draw)
    sets = [BlockSet(None, f"k{i}", n, 4, calls.maker(i), "x") for i, n in enumerate([2, 2, 6, 2])]
    calls.use(call_groups(sets, 2))
    out = blockwise_sets(sets)
    assert [t.tolist() for t in out] == [[0, 1], [100, 101], [200, 201, 202, 203, 204, 205], [300, 301]]
    assert drawn == [[(0, 0, 2), (1, 0, 2)], [(2, 0, 4)], [(2, 4, 2)], [(3, 0, 2)]]
    assert not calls.made  # nothing drawn in vain
