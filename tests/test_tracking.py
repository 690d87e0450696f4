"""``--report_to tensorboard``: the loss terms reach TensorBoard event files in OUT/logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from selective_amnesia import tracking
from selective_amnesia.cli import main
from selective_amnesia.errors import AmnesiaError

REPO = Path(__file__).resolve().parents[1]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def test_pretraining_losses_reach_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # a dev dependency; the feature itself is optional
    out = tmp_path / "model"
    config = str(REPO / "configs" / "mnist_cvae_tiny.yaml")
    assert (
        main(["pretrain", config, "--out", str(out), "--report_to", "tensorboard", "pretrain.steps=120"]) == 0
    )
    scalars = _scalars(out / "logs")
    steps = [s for s, _ in scalars["pretraining/nelbo"]]
    assert steps == [100, 120]  # logged every 100 steps and at the last, as the report's history
    assert all(v > 0 for _, v in scalars["pretraining/nelbo"])


def test_without_the_package_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AmnesiaError, match="pip install tensorboard"):
        tracking.check_available("tensorboard")
    tracking.check_available("none")  # nothing needed when off


def test_tracking_is_off_by_default(tmp_path: Path) -> None:
    with tracking.session("none", tmp_path / "logs", "x"):
        tracking.log("forgetting", 1, {"total": 1.0})
    assert not (tmp_path / "logs").exists()
