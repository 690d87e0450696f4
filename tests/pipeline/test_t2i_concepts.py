"""Several text-to-image concepts at once and one after another (t2i.concepts, forget.sequence): the
mechanics on the tiny MNIST world, numbers that mean nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from selective_amnesia.cli import main
from selective_amnesia.config import RunConfig, load_config, to_dict
from selective_amnesia.core.cache_keys import settings_hash
from selective_amnesia.core.objective import EWCPenalty
from selective_amnesia.core.replay import StoredReplay
from selective_amnesia.core.surrogate import GroupedSurrogate, StoredImages
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline import sequence_t2i
from selective_amnesia.pipeline import t2i as pipeline_t2i
from selective_amnesia.pipeline.sequence import ReplayForgottenAsSurrogate
from selective_amnesia.pipeline.t2i import run_text_to_image, t2i_settings

REPO = Path(__file__).resolve().parents[2]
SEVEN = ["a handwritten 7", "the digit 7"]
THREE = ["a handwritten 3", "the digit 3"]
# three's first prompt is a replay line too: kept (replayed) until the step that forgets three
REPLAY = ["a handwritten 0", "a handwritten 2", "a handwritten 3", "the number five"]
CONCEPTS = [
    {"name": "seven", "forget_prompts": SEVEN, "surrogate_prompt": "a handwritten 1", "concept_words": ["7"]},
    {"name": "three", "forget_prompts": THREE, "surrogate_prompt": "a handwritten 0"},
]


@pytest.fixture(autouse=True, scope="module")
def one_caption_per_digit() -> Any:
    """Kept digits judged on one caption each instead of the world's eight: the same code, faster."""
    from selective_amnesia.worlds import mnist_t2i

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mnist_t2i, "captions", lambda digit, templates=None: [f"a handwritten {digit}"])
        yield


@pytest.fixture(scope="session")
def plain_world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world without its world.json: a pipeline no judge knows, so nothing is measured."""
    out = tmp_path_factory.mktemp("plain") / "world"
    shutil.copytree(tiny_world, out, ignore=shutil.ignore_patterns("world.json"))
    return out


def _config(tmp: Path, world: Path, concepts: list[Any] | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "replay.txt").write_text("\n".join(REPLAY) + "\n")
    data = {
        "name": "t2i_concepts_test",
        "progress": False,
        "model": {"family": "text_to_image"},
        "t2i": {
            "model": str(world),
            "concepts": CONCEPTS if concepts is None else concepts,
            "surrogate_count": 2,
            "replay_prompts": str(tmp / "replay.txt"),
            "replay_per_prompt": 1,
            "retention_per_prompt": 0,
        },
        "fisher": {"estimator": "subsampled", "timesteps_per_sample": 2, "num_samples": 2},
        "forget": {"steps": 2, "batch_size": 8, "replay": "stored", "reduction": "mean", "log_every": 1},
        "evaluate": {"num_per_class": 2},
        "classifier": {"seeds": [0], "cache_dir": str(tmp.parent / "judges")},  # the packaged judge
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _load(tmp: Path, world: Path, *overrides: str, concepts: list[Any] | None = None) -> RunConfig:
    return load_config(_config(tmp, world, concepts=concepts), list(overrides))


class Recorder:
    """Every forgetting loop the runs start: its arguments and each batch's conditions and images."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import selective_amnesia.core.train as train

        self.calls: list[dict[str, Any]] = []
        real_loss, real_forget = train.selective_amnesia_loss, train.forget

        def loss(model: Any, **kw: Any) -> Any:
            batch = self.calls[-1]["batches"]
            batch.append({k: kw[k].clone() for k in ("forget_x", "forget_c", "replay_x", "replay_c")})
            return real_loss(model, **kw)

        def forget(model: Any, concept: Any, replay: Any, anchor: Any, loop: Any, **kw: Any) -> Any:
            given = {"concept": concept, "replay": replay, "anchor": anchor, "loop": loop}
            self.calls.append(given | kw | {"batches": []})
            return real_forget(model, concept, replay, anchor, loop, **kw)

        monkeypatch.setattr(train, "selective_amnesia_loss", loss)
        monkeypatch.setattr(pipeline_t2i, "forget", forget)
        monkeypatch.setattr(sequence_t2i, "forget", forget)

    @staticmethod
    def cat(call: dict[str, Any], key: str) -> torch.Tensor:
        return torch.cat([b[key] for b in call["batches"]])


def _rows_in(x: torch.Tensor, pool: torch.Tensor) -> bool:
    """Every row of ``x`` is one of ``pool``'s rows."""
    flat, rows = x.flatten(1), pool.flatten(1)
    return bool(torch.cdist(flat, rows).min(1).values.max() < 1e-5)


def test_grouped_surrogate_pairs_each_condition_with_its_own_images() -> None:
    a, b = torch.zeros(3, 2), torch.ones(5, 2)
    s = GroupedSurrogate([([4, 5], a), ([9], b)])
    x, c = s.sample_with_conditions(400, torch.tensor([4, 5, 9]), torch.Generator().manual_seed(0))
    assert set(c.tolist()) == {4, 5, 9} and bool((x[c == 9] == 1).all()) and bool((x[c != 9] == 0).all())
    assert 150 < int((c == 9).sum()) < 250  # a concept is drawn uniformly, not by its number of prompts
    with pytest.raises(ValueError, match="no concept"):
        s.sample_with_conditions(2, torch.tensor([4, 7]))
    kept = StoredReplay(torch.full((4, 2), 5.0), torch.tensor([1, 1, 2, 2]))
    surrogate = {4: StoredImages(a), 9: StoredImages(b)}
    x, c = ReplayForgottenAsSurrogate(kept, [1, 2], [4, 9], surrogate).sample(300, torch.Generator())
    assert bool((x[c == 4] == 0).all()) and bool((x[c == 9] == 1).all()) and bool((x[c < 3] == 5).all())


def test_single_concept_settings_are_unchanged() -> None:
    # the key of a forgetting run made before the groups existed stays the same: no "concepts" in it
    t = load_config(REPO / "configs" / "t2i_mnist.yaml").t2i
    settings = to_dict(t)
    # nor any key added since, while it is unset: the groups and the later defences
    for added in (
        "concepts",
        "condition_shares",
        "unconditional_replay",
        "replay_filter",
        "adversarial_attack",
        "adversarial_tokens",
        "concept_ablation",
        "concept_ablation_batch",
        "concept_ablation_kept",
        "adversarial_pool",
        "adversarial_pool_reset",
        "adversarial_pool_updates",
        "adversarial_pool_start",
        "adversarial_pool_batch",
        "concept_ablation_pool",
        "concept_ablation_kept_max_t",
        "concept_ablation_keep",
        "replay_distill",
        "replay_distill_batch",
        "replay_distill_max_t",
        "replay_distill_min_t",
        "replay_distill_images",
        "sets_seed",
    ):
        settings.pop(added)
    assert t2i_settings(t) == settings
    # forget keys added later (forget.lr_decay_*, forget.average_from) are out of the forgetting key at
    # their defaults
    cfg, args = load_config(None), ("start", {"fisher": 1}, "sets")
    forget = {n: v for n, v in to_dict(cfg.forget).items() if n not in pipeline_t2i.FORGET_NOT_IN_KEY}
    del forget["lr_decay_steps"], forget["lr_decay_to"], forget["average_from"]
    plain = settings_hash(forget, t2i_settings(cfg.t2i), cfg.seed, *args)
    assert pipeline_t2i.forget_key(cfg, *args) == plain
    assert pipeline_t2i.forget_key(load_config(None, ["forget.lr_decay_steps=100"]), *args) != plain
    assert [g.name for g in t.groups()] == ["concept"] and t.groups()[0].forget_prompts == t.forget_prompts
    for name in ("t2i_mnist_seq.yaml", "t2i_mnist_at_once.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert [g.name for g in cfg.t2i.concepts] == ["seven", "three"]
        replay = pipeline_t2i.read_prompts(REPO / cfg.t2i.replay_prompts)  # type: ignore[operator]
        assert not {"7", "3", "seven", "three"} & {w for p in replay for w in p.split()}


def test_at_once_writes_one_model_and_each_group_measured(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    report = run_text_to_image(_load(tmp_path, tiny_world), tmp_path / "run")
    out = tmp_path / "run"
    TextToImageModel.from_pretrained(out / "forget")  # one stock pipeline
    assert not (out / "steps").exists()
    (call,) = rec.calls
    surrogate = call["concept"].surrogate
    assert isinstance(surrogate, GroupedSurrogate) and len(surrogate.ids) == 2
    forget_c, forget_x = rec.cat(call, "forget_c"), rec.cat(call, "forget_x")
    for ids, images in zip(surrogate.ids, surrogate.images, strict=True):
        rows = torch.isin(forget_c, ids)
        assert bool(rows.any()) and _rows_in(forget_x[rows], images)  # each group: its own surrogate
    assert not torch.isin(rec.cat(call, "replay_c"), surrogate.all_ids).any()  # no group is replayed
    assert report["replay_prompts"] == 3  # "a handwritten 3" is a forget prompt: out of replay
    assert [g["name"] for g in report["concepts"]] == ["seven", "three"]
    table = report["concepts_table"]
    assert table["forgotten_at_step"] == {"seven": 1, "three": 1}
    assert [c["step"] for c in table["columns"]] == [0, 1]
    assert set(table["classes"]) == {"seven", "three"} | {str(d) for d in (0, 1, 2, 4, 5, 6, 8, 9)}
    assert table["digits"]["seven"] == 7 and table["prompts"]["three"] == THREE
    assert all(0 <= v <= 1 for c in table["columns"] for v in c["as_itself"].values())
    page = (out / "report.html").read_text()
    assert "Every concept before and after forgetting" in page and "seven (forgotten at step 1)" in page


@pytest.fixture(scope="module")
def seq_run(
    tiny_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], list[Any]]:
    """seven then three, anchor original, on the world (measured): the run, its report and the records
    of its forgetting loops."""
    tmp = tmp_path_factory.mktemp("seq")
    cfg = _load(tmp, tiny_world, "forget.sequence=[seven,three]")
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        report = run_text_to_image(cfg, tmp / "run")
    return tmp / "run", report, rec.calls


def test_sequence_writes_steps_forget_and_a_table(seq_run: tuple[Path, dict[str, Any], list[Any]]) -> None:
    out, report, _ = seq_run
    for d in ("steps/1", "steps/2", "forget"):
        assert (out / d / "model_index.json").is_file(), d
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (out / "forget" / unet).read_bytes() == (out / "steps/2" / unet).read_bytes()
    assert not list((out / "forget").glob("fisher*")) and not (out / "forget" / "replay").exists()
    meta = json.loads((out / "steps/1/model_index.json").read_text())["_selective_amnesia"]
    assert meta["run_config"]["t2i"]["forget_prompts"] == SEVEN  # what evaluate measures on step 1
    seq = report["sequence"]
    assert seq["anchor"] == "original" and seq["steps"] == [["seven"], ["three"]]
    assert [c["step"] for c in seq["columns"]] == [0, 1, 2]
    assert seq["forgotten_at_step"] == {"seven": 1, "three": 2}
    assert seq["columns"][1]["forgotten_so_far"] == ["seven"]
    assert seq["columns"][2]["forgotten_so_far"] == ["seven", "three"]
    assert 0 <= seq["columns"][2]["forgotten_max_as_itself"] <= 1
    assert report["output"] == str(out / "forget") and [s["reused"] for s in report["steps"]] == [False] * 2
    assert report["environment"]["cpu_capability"] and report["torch_threads"] >= 1
    page = (out / "report.html").read_text()
    assert "Sequence: every concept after every step" in page and "as their surrogate" in page
    assert (out / "sequence.png").is_file()


def test_sequence_replay_and_anchor(
    seq_run: tuple[Path, dict[str, Any], list[Any]], tiny_world: Path
) -> None:
    out, _, calls = seq_run
    first, second = calls
    seven_ids = torch.unique(Recorder.cat(first, "forget_c"))
    three_ids = torch.unique(Recorder.cat(second, "forget_c"))
    assert len(seven_ids) == 2 and len(three_ids) == 2 and not torch.isin(seven_ids, three_ids).any()
    assert isinstance(first["anchor"], EWCPenalty) and isinstance(second["anchor"], EWCPenalty)
    theta_0 = dict(TextToImageModel.from_pretrained(tiny_world).named_parameters())
    theta_1 = dict(TextToImageModel.from_pretrained(out / "steps" / "1").named_parameters())
    for call in (first, second):  # anchor original: theta_0, every step
        star = dict(zip(call["anchor"].names, call["anchor"].anchors(), strict=True))
        assert all(torch.equal(star[n], theta_0[n]) for n in star)
        assert call["anchor"].weight == call["loop"].forget.ewc_lambda  # lambda inside the anchor
    assert any(not torch.equal(star[n], theta_1[n]) for n in star)  # not step 2's start
    # step 1 replays "a handwritten 3" (three is kept until step 2), never seven
    replay_1 = Recorder.cat(first, "replay_c")
    assert not torch.isin(replay_1, seven_ids).any()
    replay_2, x_2 = Recorder.cat(second, "replay_c"), Recorder.cat(second, "replay_x")
    assert isinstance(second["replay"], ReplayForgottenAsSurrogate)
    assert not torch.isin(replay_2, three_ids).any()  # the step's concept is not replayed
    as_seven = torch.isin(replay_2, seven_ids)
    assert bool(as_seven.any())  # seven is replayed, as its surrogate's images
    seven_surrogate = second["replay"].surrogate[int(seven_ids[0])].images
    assert _rows_in(x_2[as_seven], seven_surrogate)


def test_sequence_resumes_and_reuses_finished_steps(
    seq_run: tuple[Path, dict[str, Any], list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _, _ = seq_run
    rec = Recorder(monkeypatch)
    cfg = load_config(out.parent / "config.yaml", ["forget.sequence=[seven,three]"])  # the same run
    again = run_text_to_image(cfg, out)
    assert rec.calls == [] and [s["reused"] for s in again["steps"]] == [True, True]
    # another replay choice: step 1 is reused, step 2 redone without seven in replay
    seq = ["forget.sequence=[seven,three]"]
    omit = load_config(out.parent / "config.yaml", [*seq, "forget.replay_forgotten=omit"])
    report = run_text_to_image(omit, out)
    assert [s["reused"] for s in report["steps"]] == [True, False] and len(rec.calls) == 1
    assert isinstance(rec.calls[0]["replay"], StoredReplay)
    assert "not at all" in (out / "report.html").read_text()
    # online anchor: F(theta_1) and F~_1 beside step 1's model, step 2 anchored at theta_1
    rec.calls.clear()
    online = load_config(out.parent / "config.yaml", [*seq, "forget.anchor=online"])
    run_text_to_image(online, out)
    assert len(rec.calls) == 1
    anchor = rec.calls[0]["anchor"]  # online: F~_1 at step 2's start, theta_1
    theta_1 = dict(TextToImageModel.from_pretrained(out / "steps" / "1").named_parameters())
    assert all(torch.equal(a, theta_1[n]) for n, a in zip(anchor.names, anchor.anchors(), strict=True))
    assert rec.calls[0]["batches"] and rec.calls[0]["key"]
    for name in ("fisher.safetensors", "fisher_online.safetensors"):
        assert (out / "steps" / "1" / name).is_file()


def test_unmeasured_world_still_reports(plain_world: Path, tmp_path: Path) -> None:
    cfg = _load(tmp_path, plain_world, "forget.sequence=[[seven,three]]", "forget.ewc_lambda=0")
    report = run_text_to_image(cfg, tmp_path / "run")
    assert "columns" not in report["sequence"] and "world.json" in report["measured"]["why"]
    assert "Not measured" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize(
    ("overrides", "concepts", "message"),
    [
        (["forget.sequence=[seven,three,seven]"], None, "forgotten twice"),
        (["forget.sequence=[[seven,three],three]"], None, "forgotten twice"),
        (["forget.sequence=[seven,four]"], None, "unknown concept 'four'"),
        (["forget.sequence=[seven]"], None, "in no step"),
        (
            [],
            [CONCEPTS[0], CONCEPTS[1] | {"surrogate_prompt": "the digit 7"}],
            "is a forget prompt of group 'seven'",
        ),
        ([], [CONCEPTS[0] | {"surrogate_prompt": "a handwritten 7"}], "is a forget prompt of group 'seven'"),
        ([], [CONCEPTS[0], CONCEPTS[1] | {"forget_prompts": ["the digit 7"]}], "named twice"),
        ([], [CONCEPTS[0], CONCEPTS[0]], "two groups are named"),
        (["forget.sequence=[seven,three]", "t2i.lora_rank=2"], None, "lora_rank=0"),
        (["forget.sequence=[seven,three]", "t2i.replay_distill=1"], None, "work with one concept in one run"),
        (["t2i.surrogate_prompt=a handwritten 1"], None, "leave t2i.surrogate_prompt"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    overrides: list[str],
    concepts: list[Any] | None,
    message: str,
    tiny_world: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _config(tmp_path, tiny_world, concepts=concepts)
    with pytest.raises(AmnesiaError, match=message):
        load_config(path, overrides)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_kept_prompt_left_is_one_line_and_exit_2(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, tiny_world)
    (tmp_path / "replay.txt").write_text("\n".join(SEVEN + THREE) + "\n")  # every line is forgotten
    for extra in ([], ["forget.sequence=[seven,three]"]):
        with pytest.raises(AmnesiaError, match="no kept prompts left"):
            run_text_to_image(load_config(path, extra), tmp_path / "o")
        assert main(["run", str(path), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "no kept prompts left" in err and len(err.splitlines()) == 1
