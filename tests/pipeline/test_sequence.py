"""Several concepts at once and one after another (forget.sequence): mechanics on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from selective_amnesia.cli import main
from selective_amnesia.config import RunConfig, load_config, to_dict
from selective_amnesia.core.fisher import Fisher, online_fisher
from selective_amnesia.core.replay import GenerativeReplay
from selective_amnesia.core.surrogate import StoredImages
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.pipeline import classes as pipeline
from selective_amnesia.pipeline.sequence import ReplayForgottenAsSurrogate

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "mnist_cvae_tiny.yaml"
FAST = [
    "forget.steps=6",
    "fisher.num_samples=64",
    "evaluate.num_per_class=10",
    "evaluate.num_forget_samples=10",
]


class Recorder:
    """Wraps train.forget as the pipeline calls it: keeps each call's forget and replay conditions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import selective_amnesia.core.train as train

        self.calls: list[dict[str, Any]] = []
        real_loss, real_forget = train.selective_amnesia_loss, train.forget

        def loss(model: Any, **kw: Any) -> Any:
            self.calls[-1]["forget_c"].append(kw["forget_c"].clone())
            if kw["replay_c"] is not None:
                self.calls[-1]["replay_c"].append(kw["replay_c"].clone())
            return real_loss(model, **kw)

        def forget(model: Any, concept: Any, replay: Any, anchor: Any, *args: Any, **kw: Any) -> Any:
            self.calls.append({"forget_c": [], "replay_c": [], "replay": replay, "anchor": anchor})
            return real_forget(model, concept, replay, anchor, *args, **kw)

        monkeypatch.setattr(train, "selective_amnesia_loss", loss)
        monkeypatch.setattr(pipeline, "forget", forget)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    """A tiny sequence 0 -> {3, 5} with the online anchor (one pipeline, shared by several tests)."""
    out = tmp_path_factory.mktemp("seq")
    cfg = load_config(
        TINY, [*FAST, "forget.sequence=[0,[3,5]]", "forget.anchor=online", "forget.online_alpha=0.5"]
    )
    pipeline.run_pipeline(cfg, out)
    return out, cfg


def test_several_at_once_forgets_every_listed_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    cfg = load_config(TINY, [*FAST, "forget.forget_label=[0,3]", "pretrain.steps=5"])
    base, _ = pipeline.stage_base(cfg, tmp_path / "base")
    fisher = pipeline.stage_fisher(cfg, base, tmp_path)
    model, _ = pipeline.stage_forget(cfg, base, fisher, tmp_path)
    (call,) = rec.calls
    forget_c, replay_c = torch.cat(call["forget_c"]), torch.cat(call["replay_c"])
    assert set(forget_c.tolist()) == {0, 3}  # both classes are fitted to the surrogate
    assert not set(replay_c.tolist()) & {0, 3}  # and neither is replayed
    assert json.loads((tmp_path / "forget" / "config.json").read_text())["forget_label"] == [0, 3]
    assert not torch.equal(model.state_dict()["decoder.0.weight"], base.state_dict()["decoder.0.weight"])


def test_single_label_settings_hash_is_unchanged() -> None:
    # the keys added for sequences (and later forget keys at their defaults) stay out of a single run's
    # hash: earlier runs are still reused
    settings = to_dict(RunConfig().forget)
    for k in (
        "checkpoint_every",
        "log_every",
        "snapshot_every",
        "sequence",
        "anchor",
        "online_alpha",
        "replay_forgotten",
        "replay_model",
        "lr_decay_steps",
        "lr_decay_to",
        "average_from",
    ):
        settings.pop(k)
    assert pipeline._forget_settings(RunConfig()) == settings
    assert load_config(None, ["forget.forget_label=[4]"]).forget.forget_label == 4


def test_sequence_writes_steps_forget_and_table(online_run: tuple[Path, RunConfig]) -> None:
    out, _ = online_run
    for d in ("steps/1", "steps/2", "forget"):
        assert (out / d / "config.json").is_file()
    assert (out / "forget" / "model.safetensors").read_bytes() == (
        out / "steps/2/model.safetensors"
    ).read_bytes()
    saved = json.loads((out / "forget" / "config.json").read_text())
    assert saved["run_config"]["forget"]["forget_label"] == [0, 3, 5]  # what `amnesia evaluate` measures
    report = json.loads((out / "report.json").read_text())
    seq = report["sequence"]
    assert [c["step"] for c in seq["columns"]] == [0, 1, 2]
    assert seq["forgotten_at_step"] == {"0": 1, "3": 2, "5": 2}
    assert seq["columns"][2]["forgotten_so_far"] == [0, 3, 5]
    assert set(seq["columns"][1]["as_itself"]) == {str(c) for c in range(10)}
    assert seq["anchor"] == "online" and seq["replay_forgotten"] == "surrogate"
    page = (out / "report.html").read_text()
    assert "Sequence: every class after every step" in page and "as their surrogate" in page
    assert (out / "sequence.png").is_file()


def test_online_anchor_fisher_is_alpha_previous_plus_current(online_run: tuple[Path, RunConfig]) -> None:
    out, _ = online_run
    f0 = Fisher.load(out / "fisher.safetensors")  # F(theta_0)
    f1 = Fisher.load(out / "steps/1/fisher.safetensors")  # F(theta_1), estimated on step 1's model
    online = Fisher.load(out / "steps/1/fisher_online.safetensors")
    theta1 = pipeline.load_model(out / "steps/1")
    assert f1.metadata["model_hash"] == pipeline.state_hash(theta1.state_dict())
    for name, value in online.values.items():
        torch.testing.assert_close(value, 0.5 * f0.values[name] + f1.values[name])
    by_hand = {n: 0.25 * v for n, v in f0.values.items()}
    got = online_fisher(Fisher(by_hand), Fisher(dict(f0.values)), 0.0)
    assert all(torch.equal(got.values[n], f0.values[n]) for n in f0.values)  # alpha 0: the plain Fisher


def test_replay_gets_surrogate_images_for_forgotten_classes(tiny_cvae: torch.nn.Module) -> None:
    marker = torch.full((4, 1, 28, 28), -5.0)  # no VAE sample looks like this
    kept = [1, 2, 4]
    replay = ReplayForgottenAsSurrogate(GenerativeReplay(tiny_cvae, kept), kept, [0, 3], StoredImages(marker))
    x, c = replay.sample(400, torch.Generator().manual_seed(0))
    forgotten = torch.isin(c, torch.tensor([0, 3]))
    assert x.shape[0] == c.shape[0] == 400 and 0 < int(forgotten.sum()) < 400
    assert bool((x[forgotten] == -5.0).all())  # a forgotten class: only surrogate images
    assert not bool((x[~forgotten] == -5.0).any())  # a kept class: only the model's samples
    assert set(c[~forgotten].tolist()) <= set(kept)


def test_sequence_steps_replay_and_anchor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    cfg = load_config(TINY, [*FAST, "pretrain.steps=5", "forget.sequence=[0,3]", "evaluate.num_per_class=4"])
    pipeline.run_pipeline(cfg, tmp_path)
    first, second = rec.calls
    # step 1 is the single run of class 0: theta_0's fresh samples of every other class
    assert isinstance(first["replay"], GenerativeReplay) and first["replay"].labels.tolist() == list(
        range(1, 10)
    )
    assert isinstance(second["replay"], ReplayForgottenAsSurrogate)
    base = pipeline.load_model(tmp_path / "base")
    for call in (first, second):  # anchor original: theta_0's anchor, not step 2's start; lambda inside
        star = dict(zip(call["anchor"].names, call["anchor"].anchors(), strict=True))
        assert all(torch.equal(star[n], p) for n, p in base.named_parameters())
        assert call["anchor"].weight == cfg.forget.ewc_lambda
    assert 3 not in set(torch.cat(second["replay_c"]).tolist())
    assert set(torch.cat(second["forget_c"]).tolist()) == {3}
    # the kept classes are replayed from theta_0 with the original anchor (forget.replay_model: null)
    replayer = second["replay"].kept.model.state_dict()
    assert all(torch.equal(replayer[n], p) for n, p in base.state_dict().items())
    # resume: everything finished is reused, nothing is trained again
    rec.calls.clear()
    pipeline.run_pipeline(cfg, tmp_path)
    assert rec.calls == []
    omit = load_config(
        TINY, [*FAST, "pretrain.steps=5", "forget.sequence=[0,3]", "forget.replay_forgotten=omit"]
    )
    rec.calls.clear()
    pipeline.run_pipeline(omit, tmp_path)
    assert len(rec.calls) == 1  # step 1 reused, step 2 redone without class 0 in replay
    assert 0 not in set(torch.cat(rec.calls[0]["replay_c"]).tolist())
    # forget.replay_model=latest: step 2 replays step 1's model (and is redone, not reused)
    latest = load_config(
        TINY, [*FAST, "pretrain.steps=5", "forget.sequence=[0,3]", "forget.replay_model=latest"]
    )
    rec.calls.clear()
    pipeline.run_pipeline(latest, tmp_path)
    assert len(rec.calls) == 1
    step1 = pipeline.load_model(tmp_path / "steps" / "1").state_dict()
    replayer = rec.calls[0]["replay"].kept.model.state_dict()
    assert all(torch.equal(replayer[n], p) for n, p in step1.items())
    with pytest.raises(AmnesiaError, match="replay_model"):
        load_config(TINY, ["forget.replay_model=newest"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["forget.sequence=[0,3,0]"], "forgotten twice"),
        (["forget.sequence=[[0,3],3]"], "forgotten twice"),
        (["forget.forget_label=[2,2]"], "forgotten twice"),
        (["forget.sequence=[0,3]", "forget.surrogate=class", "forget.surrogate_label=3"], "cannot stand in"),
        (
            ["forget.forget_label=[0,1]", "forget.surrogate=class", "forget.surrogate_label=1"],
            "cannot stand in",
        ),
        (["forget.sequence=[[0,1,2,3,4],[5,6,7,8,9]]"], "no class is left to keep"),
        (["forget.sequence=[]"], "is empty"),
        (["forget.sequence=[0,[]]"], "at least one class"),
        (["forget.anchor=newest"], "forget.anchor"),
        (["forget.sequence=[0,3]", "forget.objective=naive"], "single class"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    overrides: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(AmnesiaError, match=message):
        load_config(None, overrides)
    assert main(["run", "--out", str(tmp_path / "o"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_evaluate_relearn_reports_model_and_reference(
    online_run: tuple[Path, RunConfig], tmp_path: Path
) -> None:
    out, _ = online_run
    result_file = tmp_path / "m.json"
    args = ["evaluate", "--model", str(out / "forget"), "--out", str(result_file)]
    assert main([*args, "--relearn", "3,5", "--relearn-steps", "4"]) == 0
    result = json.loads(result_file.read_text())
    assert result["forget_label"] == [0, 3, 5]  # every class the sequence forgot
    assert {"p_forget_c0", "p_forget_c3", "p_forget_c5"} <= set(result["metrics"])
    relearn = result["relearn"]
    assert relearn["reference"] == str(out / "base") and relearn["reference_kind"] == "the run's base model"
    assert [(r["class"], r["num_images"]) for r in relearn["rows"]] == [
        (c, n) for c in (0, 3, 5) for n in (3, 5)
    ]
    curve = relearn["rows"][0]["model"]["drawn_as_class"]
    assert set(curve) == {"0", "1", "2", "4"} and all(0 <= v <= 1 for v in curve.values())
    assert "reference" in relearn["rows"][0]
    assert main([*args, "--relearn", "ten"]) == 2


def test_pretrain_without_a_class_never_sees_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the relearning reference: a base trained without the class (pretrain.exclude_labels)
    seen: list[torch.Tensor] = []
    real = pipeline.pretrain

    def spy(model: Any, data: Any, *args: Any, **kw: Any) -> Any:
        seen.append(data.labels.clone())
        return real(model, data, *args, **kw)

    monkeypatch.setattr(pipeline, "pretrain", spy)
    cfg = load_config(TINY, ["pretrain.steps=2", "pretrain.exclude_labels=[0,3]"])
    pipeline.stage_base(cfg, tmp_path / "base")
    assert len(seen[0]) > 0 and not set(seen[0].unique().tolist()) & {0, 3}
    # an unused exclude_labels leaves the settings hash of existing runs as it was
    assert "exclude_labels" not in pipeline._pretrain_settings(RunConfig())
    assert pipeline._pretrain_settings(cfg)["exclude_labels"] == [0, 3]
    with pytest.raises(AmnesiaError, match="distinct"):
        load_config(TINY, ["pretrain.exclude_labels=[2,2]"])
    with pytest.raises(AmnesiaError, match="no class 11"):
        pipeline.without_labels(pipeline.load_dataset("mnist", "test", None, None), [11])
