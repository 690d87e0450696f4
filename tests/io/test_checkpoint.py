"""Resumable training state: bitwise-identical resume, keys, incomplete/damaged checkpoints, no pickle."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io import checkpoint
from selective_amnesia.io.checkpoint import load_training_state, remove_training_state, save_training_state


class Run:
    """A tiny training loop whose every random draw comes from ``generator`` or the global RNG."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        # Dropout draws from the global RNG, so resuming must restore torch.get_rng_state() too.
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.ema = EMAModel(self.model.parameters(), decay=0.99)
        self.generator = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []

    def train(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            x = torch.randn(16, 4, generator=self.generator)
            loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.ema.step(self.model.parameters())
            self.losses.append(float(loss.detach()))

    def save(self, path: Path, step: int, key: str = "k1") -> None:
        save_training_state(
            path,
            step=step,
            model=self.model,
            optimizer=self.opt,
            generator=self.generator,
            ema=self.ema,
            extra={"losses": self.losses},
            key=key,
        )

    def load(self, path: Path, key: str = "k1") -> dict[str, Any] | None:
        out = load_training_state(
            path, model=self.model, optimizer=self.opt, generator=self.generator, ema=self.ema, key=key
        )
        if out is not None:
            self.losses = list(out["extra"]["losses"])
        return out


def _assert_same(a: Run, b: Run) -> None:
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert len(a.ema.shadow_params) == len(b.ema.shadow_params)
    for s, t in zip(a.ema.shadow_params, b.ema.shadow_params, strict=True):
        assert torch.equal(s, t)
    assert a.ema.optimization_step == b.ema.optimization_step
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid in sa["state"]:
        for k, v in sa["state"][pid].items():
            assert torch.equal(v, sb["state"][pid][k]), (pid, k)
    assert a.losses == b.losses


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "base" / "checkpoint"
    straight = Run(seed=0)
    straight.train(10)
    straight_rng = torch.get_rng_state()

    first = Run(seed=0)
    first.train(5)
    first.save(ckpt, step=5)
    del first

    resumed = Run(seed=1)  # different weights, generator and global RNG: load must restore them all
    out = resumed.load(ckpt)
    assert out is not None and out["step"] == 5 and len(out["extra"]["losses"]) == 5
    assert isinstance(resumed.opt.param_groups[0]["betas"], tuple)
    resumed.train(5)

    _assert_same(straight, resumed)
    assert torch.equal(torch.get_rng_state(), straight_rng)


def test_saving_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2)
    run.train(2)
    run.save(tmp_path, step=4)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert Run(seed=3).load(tmp_path)["step"] == 4  # type: ignore[index]


def test_other_key_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2, key="settings-a")
    fresh = Run(seed=1)
    before = [p.clone() for p in fresh.model.parameters()]
    with caplog.at_level(logging.INFO, logger="selective_amnesia.io.checkpoint"):
        assert fresh.load(tmp_path, key="settings-b") is None
    assert "settings-a" in caplog.text
    assert all(torch.equal(p, q) for p, q in zip(before, fresh.model.parameters(), strict=True))


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert Run(seed=0).load(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert Run(seed=0).load(tmp_path / "empty") is None


def test_missing_marker_is_incomplete_and_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2)
    (tmp_path / checkpoint.MARKER).unlink()
    with caplog.at_level(logging.INFO, logger="selective_amnesia.io.checkpoint"):
        assert Run(seed=1).load(tmp_path) is None
    assert "incomplete" in caplog.text


def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2)
    run.train(2)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # interrupted after the new tensors, before the marker

    monkeypatch.setattr(checkpoint, "atomic_path", fail)
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path, step=4)
    monkeypatch.undo()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # the new file is an orphan

    out = Run(seed=1).load(tmp_path)
    assert out is not None and out["step"] == 2
    run.save(tmp_path, step=4)  # the next save cleans the orphan up
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_truncated_tensors_raise(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2)
    (f,) = tmp_path.glob("*.safetensors")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AmnesiaError, match="delete the directory"):
        Run(seed=1).load(tmp_path)


def test_missing_tensors_or_bad_marker_raise(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2)
    marker = tmp_path / checkpoint.MARKER
    good = marker.read_text()
    marker.write_text(good[: len(good) // 2])
    with pytest.raises(AmnesiaError, match="delete the directory"):
        Run(seed=1).load(tmp_path)
    marker.write_text(good)
    (f,) = tmp_path.glob("*.safetensors")
    f.unlink()
    with pytest.raises(AmnesiaError, match="delete the directory"):
        Run(seed=1).load(tmp_path)


def test_state_that_does_not_fit_raises(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(1)
    run.save(tmp_path, step=1)
    other = Run(seed=0)
    other.model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(AmnesiaError, match="delete the directory"):
        other.load(tmp_path)


def test_without_ema(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(2)
    save_training_state(tmp_path, step=2, model=run.model, optimizer=run.opt, generator=run.generator)
    fresh = Run(seed=1)
    out = load_training_state(tmp_path, model=fresh.model, optimizer=fresh.opt, generator=fresh.generator)
    assert out == {"step": 2, "extra": {}}
    assert all(
        torch.equal(p, q) for p, q in zip(run.model.parameters(), fresh.model.parameters(), strict=True)
    )
    with pytest.raises(AmnesiaError, match="no EMA state"):
        fresh.load(tmp_path, key="")


def test_extra_must_be_json(tmp_path: Path) -> None:
    run = Run(seed=0)
    with pytest.raises(TypeError, match="extra"):
        save_training_state(
            tmp_path / "checkpoint",
            step=0,
            model=run.model,
            optimizer=run.opt,
            generator=run.generator,
            extra={"x": object()},
        )
    assert not (tmp_path / "checkpoint").exists()


def test_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(2)
    run.save(tmp_path, step=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert {Path(f).suffix for f in files} == {".safetensors", ".json"}, files
    for f in tmp_path.iterdir():
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol 2+ magic
        assert b"torch._utils" not in f.read_bytes()


def test_remove_training_state(tmp_path: Path) -> None:
    run = Run(seed=0)
    run.train(1)
    ckpt = tmp_path / "checkpoint"
    run.save(ckpt, step=1)
    remove_training_state(ckpt)
    assert not ckpt.exists()
    remove_training_state(ckpt)  # absent: no-op

    run.save(ckpt, step=1)
    (ckpt / "notes.txt").write_text("not ours")
    remove_training_state(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]
