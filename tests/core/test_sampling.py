"""Blocks of generated sets: the plan of what a process will make, and calls shared across sets."""

from __future__ import annotations

from pathlib import Path

import torch

from selective_amnesia.core.sampling import BlockSet, SharedCalls, blockwise_sets, planned_blocks
from selective_amnesia.io.artifacts import save_tensors


def _sets(tmp_path: Path, make: object, totals: list[int], block: int = 2) -> list[BlockSet]:
    return [
        BlockSet(tmp_path / f"set{i}.safetensors", f"k{i}", n, block, make, "x")  # type: ignore[arg-type]
        for i, n in enumerate(totals)
    ]


def test_the_plan_skips_stored_sets_and_kept_blocks(tmp_path: Path) -> None:
    sets = _sets(tmp_path, None, [3, 2, 4])
    save_tensors(tmp_path / "set1.safetensors", {"x": torch.zeros(2)}, {"key": "k1"})
    (tmp_path / "set2.safetensors.partial").mkdir()
    save_tensors(
        tmp_path / "set2.safetensors.partial" / f"{0:09d}.safetensors",
        {"x": torch.zeros(2)},
        {"key": "k2 n=2"},
    )
    assert planned_blocks(sets) == [(0, 0, 2), (0, 2, 1), (2, 2, 2)]


def test_shared_calls_make_each_block_once_in_calls_of_up_to_batch(tmp_path: Path) -> None:
    drawn: list[list[tuple[int, int, int]]] = []

    def draw(blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        drawn.append(blocks)
        return torch.cat([torch.arange(lo, lo + n) + 100 * i for i, lo, n in blocks]).float()

    calls = SharedCalls(draw, batch=4)
    sets = [BlockSet(None, f"k{i}", 3, 2, calls.maker(i), "x") for i in range(3)]
    calls.plan = planned_blocks(sets)
    out = blockwise_sets(sets)
    assert [t.tolist() for t in out] == [[0, 1, 2], [100, 101, 102], [200, 201, 202]]
    assert [sum(n for _, _, n in g) for g in drawn] == [3, 3, 3]  # 9 items in 3 calls, not 6
    assert not calls.made  # nothing drawn in vain


def test_with_several_processes_the_plan_is_this_process_share(tmp_path: Path) -> None:
    from selective_amnesia.core.distributed import Share

    sets = [*_sets(tmp_path, None, [3, 2]), BlockSet(None, "k", 3, 2, None, "x")]  # type: ignore[arg-type]
    # the blocks of the sets with a file go round-robin (index 0, 1, 2); a set without a file is made by everyone
    assert planned_blocks(sets, Share(rank=1, world=2)) == [(0, 2, 1), (2, 0, 2), (2, 2, 1)]
    assert planned_blocks(sets, Share(rank=0, world=2)) == [(0, 0, 2), (1, 0, 2), (2, 0, 2), (2, 2, 1)]
