"""The forgetting defences of text-to-image runs: which conditions they add, and that a run uses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from selective_amnesia.config import load_config
from selective_amnesia.core.defences import (
    Adversary,
    defended_conditions,
    noisy_embeddings,
    read_templates,
    template_prompts,
)
from selective_amnesia.core.fisher import Fisher
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.conditioning import HIDDEN
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import register_prompts, run_text_to_image

REPO = Path(__file__).resolve().parents[2]
FAST = [
    "progress=false",
    "t2i.surrogate_count=4",
    "t2i.replay_per_prompt=1",
    "t2i.retention_per_prompt=0",
    "fisher.estimator=subsampled",
    "fisher.timesteps_per_sample=4",
    "fisher.num_samples=2",
    "forget.steps=2",
    "forget.batch_size=2",
]


def _stored_adversary(run_dir: Path) -> Adversary:
    """An adversary over the finds a run saved in ``run_dir`` (its targets unused: only resume is called)."""
    return Adversary(
        torch.zeros(1, 4, 4, 4),
        [0],
        every=2,
        steps=1,
        lr=0.1,
        seed=0,
        path=run_dir / "adversarial.safetensors",
    )


def _cfg(world: Path, *extra: str) -> object:
    return load_config(REPO / "configs" / "t2i_mnist.yaml", [f"t2i.model={world}", *FAST, *extra])


def test_templates_fill_every_word_and_skip_what_is_taken() -> None:
    got = template_prompts(["a {}", "{} here"], ["seven", "7"], exclude=["7 here"])
    assert got == ["a seven", "a 7", "seven here"]
    shipped = read_templates(None)
    assert len(shipped) >= 30 and all(t.count("{}") == 1 for t in shipped)


def test_a_template_without_a_slot_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "t.txt"
    bad.write_text("a {}\nno slot here\n")
    with pytest.raises(AmnesiaError, match="exactly one"):
        read_templates(bad)


def test_noisy_copies_sit_around_the_prompt_at_the_asked_scale(tiny_world: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    ids = noisy_embeddings(model, ["a handwritten 7"], copies=64, noise=0.5, seed=0)
    assert len(ids) == 64 and len(set(ids)) == 64
    clean = model.encode_prompts(["a handwritten 7"])[HIDDEN][0]
    rms = clean.pow(2).mean(-1, keepdim=True).sqrt()
    moved = torch.stack([model.encode_prompts([model.prompts[i]])[HIDDEN][0] for i in ids])
    ratio = ((moved - clean) / rms).std().item()
    assert 0.45 < ratio < 0.55  # std 0.5 of the per-token RMS
    # the same seed gives the same copies
    again = TextToImageModel.from_pretrained(tiny_world)
    ids2 = noisy_embeddings(again, ["a handwritten 7"], copies=64, noise=0.5, seed=0)
    assert torch.equal(again.encode_prompts([again.prompts[ids2[3]]])[HIDDEN], moved[3:4])


def test_defences_add_forget_and_replay_conditions(tiny_world: Path) -> None:
    cfg = _cfg(
        tiny_world,
        "t2i.concept_words=[seven, '7']",
        "t2i.augment_templates=true",
        "t2i.template_replay_words=[one]",
        "t2i.embedding_copies=2",
        "t2i.embedding_noise=0.1",
    )
    model = TextToImageModel.from_pretrained(tiny_world)
    forget_ids, replay_prompts, _ = register_prompts(cfg, model)  # type: ignore[arg-type]
    plain = [model.prompts[i] for i in forget_ids]
    ids, template_replay = defended_conditions(cfg, model, forget_ids, replay_prompts)  # type: ignore[arg-type]
    prompts = [model.prompts[i] for i in ids]
    n_templates = len(read_templates(None))
    assert prompts[: len(plain)] == plain and "a photo of a seven" in prompts and "a photo of a 7" in prompts
    texts = [p for p in prompts if not p.startswith("<")]
    assert len(texts) == len(plain) + 2 * n_templates  # no template gives a forget prompt again
    assert len(ids) == 3 * len(texts)  # every text condition plus two noisy copies
    assert "a photo of a one" in template_replay and not set(template_replay) & set(replay_prompts)
    assert not set(template_replay) & set(texts)


def test_a_run_with_defences_trains_on_them_and_keeps_the_fisher(tiny_world: Path, tmp_path: Path) -> None:
    plain = run_text_to_image(_cfg(tiny_world), tmp_path / "plain")  # type: ignore[arg-type]
    defended = run_text_to_image(  # type: ignore[arg-type]
        _cfg(
            tiny_world,
            "t2i.concept_words=[seven]",
            "t2i.augment_templates=true",
            "t2i.template_replay_words=[one]",
            "t2i.embedding_copies=1",
            "t2i.embedding_noise=0.1",
        ),
        tmp_path / "defended",
    )
    n_templates = len(read_templates(None))
    assert defended["forget_conditions"] == 2 * (plain["forget_conditions"] + n_templates)
    assert defended["replay_images"] == plain["replay_images"] + 2 * n_templates  # 2 images per prompt
    # the Fisher is over the run's own prompts, whatever the defences add
    fa = Fisher.load(tmp_path / "plain" / "fisher.safetensors")
    fb = Fisher.load(tmp_path / "defended" / "fisher.safetensors")
    made_with = ("model_hash", "num_samples", "seed", "estimator", "sampler", "prompts", "parameters")
    assert {k: fa.metadata[k] for k in made_with} == {k: fb.metadata[k] for k in made_with}


def test_adversarial_conditions_join_the_forget_set_and_come_back_on_resume(
    tiny_world: Path, tmp_path: Path
) -> None:
    from selective_amnesia.io.artifacts import load_tensors

    cfg = _cfg(
        tiny_world,
        "forget.steps=4",
        "t2i.adversarial_every=2",
        "t2i.adversarial_steps=2",
        "t2i.adversarial_targets=4",
    )
    report = run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert report["adversarial_conditions"] == 2  # steps 2 and 4
    tensors, meta = load_tensors(tmp_path / "adversarial.safetensors")
    assert meta["steps"] == "[2, 4]" and set(tensors) == {
        "2.encoder_hidden_states",
        "4.encoder_hidden_states",
    }
    # a run resumed at step 4 registers exactly what was found before it
    model = TextToImageModel.from_pretrained(tiny_world)
    adv = _stored_adversary(tmp_path)
    ids = adv.resume(model, start_step=4)
    assert [model.prompts[i] for i in ids] == ["<adversarial:2>"]
    assert torch.equal(
        model.encode_prompts(["<adversarial:2>"])[HIDDEN][0], tensors["2.encoder_hidden_states"]
    )


def test_defence_settings_are_checked() -> None:
    with pytest.raises(AmnesiaError, match="concept_words"):
        load_config(None, ["t2i.augment_templates=true"])
    with pytest.raises(AmnesiaError, match="together"):
        load_config(None, ["t2i.embedding_copies=4"])
    with pytest.raises(AmnesiaError, match="augment_templates"):
        load_config(None, ["t2i.template_replay_words=[one]"])


class _Fixed:
    """A surrogate of constant images (only the conditions matter here)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.zeros(n, 1)


def test_condition_shares_give_each_kind_its_share_of_the_batch() -> None:
    from selective_amnesia.core.defences import SharedConcept, condition_kind

    names = ["a 7", "the 7"] + [f"a photo of {i}" for i in range(96)] + ["<noisy:0:a 7>", "<noisy:1:a 7>"]
    given = {"a 7", "the 7"}
    concept = SharedConcept(
        _Fixed(), range(len(names)), [0.5, 0.25, 0.25, 0.0], lambda i: condition_kind(names[i], given)
    )
    _, cond = concept.sample(8000, torch.Generator().manual_seed(0))
    kinds = torch.tensor([condition_kind(names[int(c)], given) for c in cond])
    shares = torch.bincount(kinds, minlength=4).float() / len(cond)
    # uniform draws would give the 2 given prompts 2% of the batch; their share is half
    assert shares[0] == pytest.approx(0.5, abs=0.03) and shares[1] == pytest.approx(0.25, abs=0.03)
    assert shares[2] == pytest.approx(0.25, abs=0.03) and shares[3] == 0
    assert set(cond[kinds == 0].tolist()) == {0, 1}  # uniform within a kind: both given prompts drawn


def test_a_kind_without_conditions_gives_its_share_until_the_adversary_finds_one() -> None:
    from selective_amnesia.core.defences import SharedConcept, condition_kind

    names = ["a 7", "a photo of 7"]
    concept = SharedConcept(_Fixed(), [0, 1], [1, 0, 0, 1], lambda i: condition_kind(names[i], {"a 7"}))
    _, cond = concept.sample(64, torch.Generator().manual_seed(0))
    assert set(cond.tolist()) == {0}  # no adversarial condition yet: all of it to the given prompt
    names.append("<adversarial:100>")
    concept.add([2])
    _, cond = concept.sample(4000, torch.Generator().manual_seed(1))
    assert (cond == 2).float().mean().item() == pytest.approx(0.5, abs=0.04)
    with pytest.raises(AmnesiaError, match="no share"):
        SharedConcept(_Fixed(), [1], [1, 0, 0, 0], lambda i: condition_kind(names[i], {"a 7"})).sample(2)


def test_a_run_with_condition_shares_trains_and_plain_runs_keep_their_key(
    tiny_world: Path, tmp_path: Path
) -> None:
    from selective_amnesia.pipeline.t2i import t2i_settings

    cfg = _cfg(
        tiny_world,
        "t2i.concept_words=[seven]",
        "t2i.augment_templates=true",
        "t2i.condition_shares=[1,1,0,0]",
    )
    report = run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert report["forget_conditions"] > 2 and (tmp_path / "forget" / "model_index.json").is_file()
    assert "condition_shares" in t2i_settings(cfg.t2i)  # type: ignore[attr-defined]
    assert "condition_shares" not in t2i_settings(_cfg(tiny_world).t2i)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "shares", ["[1, 1]", "[1, -1, 0, 0]", "[0, 0, 0, 0]"], ids=["length", "negative", "all-zero"]
)
def test_condition_shares_are_checked(shares: str) -> None:
    with pytest.raises(AmnesiaError, match="condition_shares"):
        load_config(None, [f"t2i.condition_shares={shares}"])


SCORERS = """
import torch


class Bright:  # found where the image is brighter than mid-grey
    name = "bright"

    def score(self, images):
        return (images.float().mean(dim=(1, 2, 3)) > 127.5).double()


class Everything:
    name = "everything"

    def score(self, images):
        return torch.ones(images.shape[0], dtype=torch.float64)
"""


@pytest.fixture
def scorers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import sys

    (tmp_path / "replay_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("replay_scorers", None)
    return "identity:replay_scorers"


def test_the_replay_filter_drops_exactly_what_the_detector_finds(tiny_world: Path, scorers: str) -> None:
    from selective_amnesia.core.defences import filter_replay

    model = TextToImageModel.from_pretrained(tiny_world)
    z = torch.randn(12, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    c = torch.arange(12)
    bright = model.to_uint8(z).float().mean(dim=(1, 2, 3)) > 127.5
    (kept_z, kept_c), dropped = filter_replay(model, (z, c), f"{scorers}:Bright")
    assert (
        dropped == int(bright.sum()) and torch.equal(kept_c, c[~bright]) and torch.equal(kept_z, z[~bright])
    )
    with pytest.raises(AmnesiaError, match="all 12 replay images"):
        filter_replay(model, (z, c), f"{scorers}:Everything")


def test_unconditional_replay_joins_the_replay_set_through_the_filter(
    tiny_world: Path, tmp_path: Path, scorers: str
) -> None:
    plain = run_text_to_image(_cfg(tiny_world), tmp_path / "plain")  # type: ignore[arg-type]
    cfg = _cfg(tiny_world, "t2i.unconditional_replay=3", f"t2i.replay_filter={scorers}:Bright")
    report = run_text_to_image(cfg, tmp_path / "uncond")  # type: ignore[arg-type]
    assert report["replay_images"] + report["replay_filtered_out"] == plain["replay_images"] + 3
    assert len(list((tmp_path / "uncond" / "unconditional_replay").iterdir())) >= 1  # cached for a rerun
    with pytest.raises(AmnesiaError, match="replay_filter"):
        load_config(None, ["t2i.replay_filter=nudenet"])


def test_a_discrete_adversary_adds_real_prompts_without_the_concept_words(
    tiny_world: Path, tmp_path: Path
) -> None:
    import json

    from selective_amnesia.io.artifacts import load_tensors

    cfg = _cfg(
        tiny_world,
        "forget.steps=4",
        "t2i.concept_words=[seven, '7']",
        "t2i.adversarial_every=2",
        "t2i.adversarial_steps=2",
        "t2i.adversarial_targets=4",
        "t2i.adversarial_attack=both",  # step 2: real tokens; step 4: a soft prompt
        "t2i.adversarial_tokens=3",
        "t2i.condition_shares=[1, 0, 0, 1]",
    )
    report = run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert report["adversarial_conditions"] == 2
    tensors, meta = load_tensors(tmp_path / "adversarial.safetensors")
    prompts = json.loads(meta["prompts"])
    assert list(prompts) == ["2"] and "seven" not in prompts["2"] and "7" not in prompts["2"]
    model = TextToImageModel.from_pretrained(tiny_world)  # the stored conditioning is the text's
    assert torch.allclose(model.encode_prompts([prompts["2"]])[HIDDEN][0], tensors["2.encoder_hidden_states"])
    # a resumed run keeps the text of what it found before, for the file it saves again
    adv = _stored_adversary(tmp_path)
    adv.resume(model, start_step=4)
    assert adv.prompts == {2: prompts["2"]}
    with pytest.raises(AmnesiaError, match="adversarial_attack"):
        load_config(None, ["t2i.adversarial_attack=pgd"])


def test_concept_ablation_pulls_forget_conditions_to_the_surrogate_on_the_concept(tiny_world: Path) -> None:
    from selective_amnesia.core.defences import ConceptAblation
    from selective_amnesia.core.train import Concept

    model = TextToImageModel.from_pretrained(tiny_world)
    forget_id, surrogate_id = model.prompt_ids(["a handwritten 7", "a handwritten 1"]).tolist()
    targets = torch.randn(6, *model.image_shape, generator=torch.Generator().manual_seed(0))

    def term(cond: int, seed: int = 1) -> torch.Tensor:
        ablation = ConceptAblation(
            targets, Concept(_Fixed(), [cond]), surrogate_id, weight=2.0, batch_size=4, reduction="mean"
        )
        return ablation(model, torch.Generator().manual_seed(seed))

    assert term(surrogate_id).item() == 0  # the surrogate prompt already denoises as itself
    start = term(forget_id).item()
    assert start > 0
    opt = torch.optim.Adam(model.unet.parameters(), lr=1e-3)
    for step in range(30):
        opt.zero_grad()
        term(forget_id, seed=step).backward()
        opt.step()
    with torch.no_grad():  # on draws it never trained on, the forget prompt now denoises as the surrogate
        after = sum(term(forget_id, seed=100 + i).item() for i in range(4)) / 4
        before = start
    assert after < 0.5 * before


def test_a_run_with_concept_ablation_trains_and_plain_runs_keep_their_key(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selective_amnesia.core.defences import ConceptAblation
    from selective_amnesia.pipeline.t2i import t2i_settings

    calls: list[float] = []
    real = ConceptAblation.__call__

    def spy(self: ConceptAblation, model: object, generator: torch.Generator) -> torch.Tensor:
        value = real(self, model, generator)  # type: ignore[arg-type]
        calls.append(float(value))
        return value

    monkeypatch.setattr(ConceptAblation, "__call__", spy)

    cfg = _cfg(
        tiny_world, "t2i.concept_ablation=1.0", "t2i.concept_ablation_batch=2", "t2i.adversarial_targets=4"
    )
    run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert (tmp_path / "forget" / "model_index.json").is_file()
    assert (tmp_path / "adversarial_targets").is_dir()  # theta*'s images of the concept, made for it
    assert len(calls) == 2 and all(v > 0 for v in calls)  # once per step (forget.steps=2)
    settings = t2i_settings(cfg.t2i)  # type: ignore[attr-defined]
    assert settings["concept_ablation"] == 1.0
    assert "concept_ablation" not in t2i_settings(_cfg(tiny_world).t2i)  # type: ignore[attr-defined]
    for bad in ("t2i.concept_ablation=-1", "t2i.concept_ablation_batch=0"):
        with pytest.raises(AmnesiaError, match="concept_ablation"):
            load_config(None, [bad])
    # a surrogate folder has no prompt to denoise as: refused before anything is generated
    folder = _cfg(
        tiny_world, "t2i.concept_ablation=1.0", "t2i.surrogate_prompt=null", f"t2i.surrogate_path={tmp_path}"
    )
    with pytest.raises(AmnesiaError, match="surrogate prompt"):
        run_text_to_image(folder, tmp_path / "folder")  # type: ignore[arg-type]
    assert not (tmp_path / "folder" / "replay").exists()


def test_word_templates_put_the_slot_where_the_concept_word_was() -> None:
    from selective_amnesia.core.defences import word_templates

    got = word_templates(
        ["a handwritten 7", "the number seven", "sevens galore", "a 7 and a 7"], ["seven", "7"]
    )
    assert got == [("a handwritten {}", "7"), ("the number {}", "seven"), ("a {} and a 7", "7")]


def test_a_token_adversary_inverts_a_token_in_each_forget_prompt_in_turn(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selective_amnesia.attacks import soft_prompt

    used: list[tuple[str, str]] = []
    real = soft_prompt.invert_token

    def spy(model: TextToImageModel, targets: torch.Tensor, template: str, word: str, **kw: object) -> object:
        used.append((template, word))
        return real(model, targets, template, word, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(soft_prompt, "invert_token", spy)
    cfg = _cfg(
        tiny_world,
        "forget.steps=6",
        "t2i.concept_words=[seven, '7']",
        "t2i.adversarial_every=1",
        "t2i.adversarial_steps=1",
        "t2i.adversarial_targets=4",
        "t2i.adversarial_attack=all",  # steps 1, 4: discrete; 2, 5: token; 3, 6: soft prompt
        "t2i.adversarial_tokens=2",
    )
    report = run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert report["adversarial_conditions"] == 6
    assert used == [("a handwritten {}", "7"), ("the number {}", "seven")]  # the forget prompts in turn
    with pytest.raises(AmnesiaError, match="concept_words"):  # nowhere to put the token
        run_text_to_image(
            _cfg(tiny_world, "t2i.adversarial_every=1", "t2i.adversarial_attack=token"), tmp_path / "b"
        )  # type: ignore[arg-type]


def test_concept_ablation_and_the_token_adversary_run_on_a_stock_sd_layout(
    tiny_sd: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "replay.txt"
    prompts.write_text("a dog on a beach\na red car\n")
    cfg = load_config(
        REPO / "configs" / "t2i_mnist.yaml",
        [
            f"t2i.model={tiny_sd}",
            *FAST,
            f"t2i.replay_prompts={prompts}",
            "t2i.forget_prompts=[a photo of brad pitt]",
            "t2i.surrogate_prompt=a middle aged man",
            "t2i.concept_words=[pitt]",
            "t2i.concept_ablation=1.0",
            "t2i.concept_ablation_batch=1",  # as configs/sd_*.yaml
            "t2i.adversarial_every=1",
            "t2i.adversarial_steps=1",
            "t2i.adversarial_targets=2",
            "t2i.adversarial_attack=token",
        ],
    )
    report = run_text_to_image(cfg, tmp_path / "run")
    assert report["adversarial_conditions"] == 2
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "forget")
    image = pipe("a photo of brad pitt", num_inference_steps=2, output_type="pt").images  # type: ignore[operator]
    assert torch.isfinite(image).all()


class _Stop(Exception):
    """Stands for an interruption in the middle of forgetting."""


def test_the_adversarial_pool_follows_the_model_and_resumes_exactly(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selective_amnesia import faults
    from selective_amnesia.io.artifacts import load_tensors
    from selective_amnesia.pipeline.t2i import t2i_settings

    pool = [
        "forget.steps=4",
        "forget.checkpoint_every=2",
        "t2i.adversarial_pool=2",
        "t2i.adversarial_pool_reset=3",
        "t2i.adversarial_pool_updates=3",
        "t2i.adversarial_pool_batch=2",
        "t2i.adversarial_targets=4",
        "t2i.concept_ablation=1.0",
        "t2i.concept_ablation_batch=2",
        "t2i.concept_ablation_kept=0.5",
        "t2i.concept_ablation_pool=0.25",
    ]
    whole = tmp_path / "whole"
    run_text_to_image(_cfg(tiny_world, *pool), whole)  # type: ignore[arg-type]
    tensors, meta = load_tensors(whole / "adversarial_pool.safetensors")
    assert meta["steps"] == "[2, 4]"  # the newest two states, at the checkpoint interval
    start = TextToImageModel.from_pretrained(tiny_world).encode_prompts(["a handwritten 7"])[HIDDEN][0]
    assert not torch.equal(tensors["4/0.encoder_hidden_states"], start)  # it moved from its forget prompt
    assert "4/0.encoder_hidden_states.adam.exp_avg" in tensors

    point, seen = faults.point, [0]

    def stop_at_three(name: str) -> None:
        if name == "train.step":
            seen[0] += 1
            if seen[0] == 3:
                raise _Stop
        point(name)

    cut = tmp_path / "cut"
    monkeypatch.setattr(faults, "point", stop_at_three)
    with pytest.raises(_Stop):
        run_text_to_image(_cfg(tiny_world, *pool), cut)  # type: ignore[arg-type]
    monkeypatch.setattr(faults, "point", point)
    run_text_to_image(_cfg(tiny_world, *pool), cut)  # resumed at step 3 with the pool of step 2
    a = load_tensors(whole / "forget" / "unet" / "diffusion_pytorch_model.safetensors")[0]
    b = load_tensors(cut / "forget" / "unet" / "diffusion_pytorch_model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(
        load_tensors(cut / "adversarial_pool.safetensors")[0]["4/1.encoder_hidden_states"],
        tensors["4/1.encoder_hidden_states"],
    )
    settings = t2i_settings(_cfg(tiny_world, *pool).t2i)  # type: ignore[attr-defined]
    assert settings["adversarial_pool"] == 2 and settings["concept_ablation_kept"] == 0.5
    plain = t2i_settings(_cfg(tiny_world).t2i)  # type: ignore[attr-defined]
    assert not {"adversarial_pool", "adversarial_pool_reset", "adversarial_pool_updates"} & set(plain)
    assert "concept_ablation_kept" not in plain
    bads = ("t2i.adversarial_pool=-1", "t2i.adversarial_pool_reset=0", "t2i.adversarial_pool_updates=0")
    more = ("t2i.adversarial_pool_batch=0", "t2i.adversarial_pool_start=any", "t2i.concept_ablation_kept=1.5")
    for bad in (*bads, *more):
        with pytest.raises(AmnesiaError, match="adversarial_pool|concept_ablation_kept"):
            load_config(None, [bad])
    with pytest.raises(AmnesiaError, match="set t2i.adversarial_every"):
        load_config(None, ["t2i.adversarial_pool_start=finds", "t2i.adversarial_every=0"])


def test_a_pool_step_lowers_the_attack_loss_and_leaves_the_weights_alone(tiny_world: Path) -> None:
    from selective_amnesia.attacks.common import eval_draws, fixed_loss
    from selective_amnesia.core.defences import SoftPromptPool

    model = TextToImageModel.from_pretrained(tiny_world)
    forget_id = int(model.prompt_ids(["a handwritten 7"])[0])
    targets = torch.randn(4, *model.image_shape, generator=torch.Generator().manual_seed(0))
    pool = SoftPromptPool(
        targets, [forget_id], size=1, reset=1000, lr=0.05, seed=0, path=None, save_every=0, batch_size=4
    )
    (pid,) = pool.resume(model, start_step=1)
    draws = eval_draws(model, targets, seed=0)
    before = fixed_loss(model, targets, model.encode_prompts([model.prompts[pid]]), draws)
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    for step in range(1, 21):
        pool.step(step, model)
    after = fixed_loss(model, targets, model.encode_prompts([model.prompts[pid]]), draws)
    assert after < before  # the registered condition is the pool's current soft prompt
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.unet.parameters())


def test_a_pool_step_in_rounds_is_the_same_as_one_update_a_call(tiny_world: Path) -> None:
    from selective_amnesia.core.defences import SoftPromptPool

    model = TextToImageModel.from_pretrained(tiny_world)
    model.unet.double()  # so that the float sums of one call and of several agree to far below a step
    forget_id = int(model.prompt_ids(["a handwritten 7"])[0])
    targets = torch.randn(5, *model.image_shape, generator=torch.Generator().manual_seed(0))
    states = []
    for rounds in (True, False):
        pool = SoftPromptPool(
            targets, [forget_id], size=3, reset=4, lr=0.05, seed=1, path=None, save_every=0, batch_size=3,
            updates=5, batch_rounds=rounds,
        )  # fmt: skip
        pool.resume(model, start_step=1)
        for step in range(1, 7):  # 5 draws from 3 prompts: some drawn twice a step, one restart
            pool.step(step, model)
        states.append(pool._state())
    assert states[0].keys() == states[1].keys() and any(".adam." in k for k in states[0])
    for k, v in states[0].items():  # one UNet call a round, not a call an update: float sums differ only
        torch.testing.assert_close(v, states[1][k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        states[0]["0.encoder_hidden_states"], model.encode_prompts(["a handwritten 7"])[HIDDEN][0]
    )


def test_a_pool_restarts_from_the_adversarys_newest_find_when_asked(tiny_world: Path) -> None:
    from selective_amnesia.core.defences import SoftPromptPool

    model = TextToImageModel.from_pretrained(tiny_world)
    forget_id = int(model.prompt_ids(["a handwritten 7"])[0])
    targets = torch.randn(4, *model.image_shape, generator=torch.Generator().manual_seed(0))
    start = model.encode_prompts(["a handwritten 7"])
    finds: dict[int, dict[str, torch.Tensor]] = {}
    pool = SoftPromptPool(
        targets, [forget_id], size=1, reset=2, lr=0.05, seed=0, path=None, save_every=0, batch_size=4,
        finds=finds,
    )  # fmt: skip
    (pid,) = pool.resume(model, start_step=1)
    assert torch.equal(model.encode_prompts([model.prompts[pid]])[HIDDEN], start[HIDDEN])  # none found yet
    finds[1] = {k: v[0] + 1.0 for k, v in start.items()}
    finds[3] = {k: v[0] - 1.0 for k, v in start.items()}
    pool.step(4, model)  # a restart (4 % reset == 0), then two Adam steps (lr each) from step 3's find
    moved = model.encode_prompts([model.prompts[pid]])[HIDDEN][0]
    assert (moved - finds[3][HIDDEN]).abs().max() < 0.5 < (moved - finds[1][HIDDEN]).abs().max()


def _ablation_of(targets: torch.Tensor, forget_id: int, surrogate_id: int, **kw: Any) -> Any:
    """A ConceptAblation of weight 1 and 16 rows on ``targets``, its forget condition ``forget_id``."""
    from selective_amnesia.core.defences import ConceptAblation
    from selective_amnesia.core.train import Concept

    return ConceptAblation(
        targets,
        Concept(_Fixed(), [forget_id]),
        surrogate_id,
        weight=1.0,
        batch_size=16,
        reduction="mean",
        **kw,
    )


def test_ablation_rows_under_kept_prompts_when_asked(tiny_world: Path) -> None:

    model = TextToImageModel.from_pretrained(tiny_world)
    forget_id, surrogate_id = model.prompt_ids(["a handwritten 7", "a handwritten 1"]).tolist()
    targets = torch.randn(6, *model.image_shape, generator=torch.Generator().manual_seed(0))

    def term(kept: float, pool: float = 0.0) -> float:
        ablation = _ablation_of(
            targets,
            forget_id,
            surrogate_id,
            kept=[surrogate_id],
            kept_share=kept,
            pool=[surrogate_id],
            pool_share=pool,
        )
        return float(ablation(model, torch.Generator().manual_seed(1)))

    # every row under the kept prompt (or the pool's), which here is the surrogate itself: nothing to pull
    assert term(1.0) == 0 and term(0.0, 1.0) == 0 and term(0.5, 0.5) == 0
    assert term(0.0) > 0 and term(0.5) > 0


def test_kept_rows_at_low_noise_and_the_keep_term_under_the_pool(
    tiny_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selective_amnesia.core.defences import ConceptAblation

    model = TextToImageModel.from_pretrained(tiny_world)
    forget_id, surrogate_id, kept_id = model.prompt_ids(
        ["a handwritten 7", "a handwritten 1", "a 9"]
    ).tolist()
    targets = torch.randn(6, *model.image_shape, generator=torch.Generator().manual_seed(0))
    keep = (
        torch.randn(5, *model.image_shape, generator=torch.Generator().manual_seed(2)),
        torch.full((5,), kept_id),
    )

    def ablation(pool: list[int], **kw: object) -> ConceptAblation:
        return _ablation_of(targets, forget_id, surrogate_id, kept=[kept_id], pool=pool, **kw)

    def term(a: ConceptAblation) -> float:
        return float(a(model, torch.Generator().manual_seed(1)))

    seen: list[torch.Tensor] = []
    real = TextToImageModel.noised
    monkeypatch.setattr(TextToImageModel, "noised", lambda m, x, t, e: seen.append(t) or real(m, x, t, e))
    term(ablation([], kept_share=1.0, kept_max_t=10))
    assert int(seen[-1].max()) < 10  # every row is a kept one: all below kept_max_t
    term(ablation([], kept_share=0.0, kept_max_t=10))
    assert int(seen[-1].max()) >= 10  # no kept rows: the timesteps are drawn over the whole range
    # the keep term: off (the same value, bitwise) without a pool or rows; under a pool prompt that is the
    # kept images' own prompt there is nothing to pull; under the forget prompt there is
    plain = term(ablation([forget_id]))
    assert (
        term(ablation([forget_id], keep=keep)) == plain
        and term(ablation([], keep=keep, keep_batch=4)) == plain
    )
    assert term(ablation([kept_id], keep=keep, keep_batch=4)) == term(ablation([kept_id]))
    assert term(ablation([forget_id], keep=keep, keep_batch=4)) > plain
    for bad in (
        "t2i.concept_ablation_kept_max_t=-1",
        "t2i.concept_ablation_keep=-2",
        "t2i.concept_ablation_keep=4",
    ):
        with pytest.raises(AmnesiaError, match="concept_ablation_k"):
            load_config(None, [bad])


def test_replay_distillation_pulls_the_replay_to_theta_star_beside_the_ablation(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    from selective_amnesia.core.defences import ConceptAblation, ReplayDistillation, summed

    base = TextToImageModel.from_pretrained(tiny_world)
    # the replay's prompts are registered on theta* before the copy, as in a run
    kept = base.prompt_ids(["a 9", "a handwritten 1"])
    model = copy.deepcopy(base)
    replay = (
        torch.randn(5, *model.image_shape, generator=torch.Generator().manual_seed(0)),
        kept[[0, 1, 0, 1, 0]],
    )
    term = ReplayDistillation(base, replay, weight=2.0, batch_size=4, reduction="mean")

    def value() -> torch.Tensor:
        return term(model, torch.Generator().manual_seed(1))

    assert float(value()) == 0.0  # theta* itself: nothing to pull
    with torch.no_grad():
        next(p for p in model.unet.parameters() if p.ndim > 1).add_(0.05)
    moved = value()
    moved.backward()
    assert float(moved) > 0 and all(p.grad is None for p in base.parameters())  # theta* is the fixed target
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.unet.parameters())
    assert float(
        ReplayDistillation(base, replay, weight=4.0, batch_size=4, reduction="mean")(
            model, torch.Generator().manual_seed(1)
        )
    ) == pytest.approx(2 * float(moved))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda x, t, c: seen.append((t, c)) or predict(x, t, c))
    ReplayDistillation(base, replay, weight=1.0, batch_size=64, reduction="mean", max_t=3)(
        model, torch.Generator().manual_seed(1)
    )
    assert int(seen[0][0].max()) < 3 < model.config.num_train_timesteps  # max_t: low noise only
    assert set(seen[0][1].tolist()) == set(kept.tolist())  # each image under its own prompt
    ReplayDistillation(base, replay, weight=1.0, batch_size=64, reduction="mean", min_t=3)(
        model, torch.Generator().manual_seed(1)
    )
    assert int(seen.pop()[0].min()) >= 3  # min_t: high noise only
    ReplayDistillation(base, replay, weight=1.0, batch_size=64, reduction="mean", prompts=kept[:1])(
        model, torch.Generator().manual_seed(1)
    )
    assert set(seen[1][1].tolist()) == {int(kept[0])}  # prompts: the conditions drawn from them instead
    monkeypatch.undo()
    assert summed(None, None) is None and summed(None, term) is term
    both = summed(term, term)
    assert both is not None and float(both(model, torch.Generator().manual_seed(1))) > float(moved)

    # in a run, beside the concept ablation: both terms are called every step
    calls: list[str] = []
    terms: list[object] = []
    for cls in (ConceptAblation, ReplayDistillation):
        real = cls.__call__
        monkeypatch.setattr(
            cls,
            "__call__",
            lambda self, m, g, real=real, name=cls.__name__: (
                calls.append(name) or terms.append(self) or real(self, m, g)
            ),
        )
    cfg = _cfg(
        tiny_world,
        "t2i.concept_ablation=1.0",
        "t2i.concept_ablation_batch=2",
        "t2i.adversarial_targets=4",
        "t2i.replay_distill=1.0",
        "t2i.replay_distill_batch=2",
        "t2i.replay_distill_max_t=5",
        "t2i.replay_distill_images=surrogate",  # the surrogate's images under the kept prompts
    )
    run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert sorted(calls) == ["ConceptAblation"] * 2 + ["ReplayDistillation"] * 2
    distilled = next(t for t in terms if isinstance(t, ReplayDistillation))
    assert distilled.prompts is not None and distilled.max_t == 5
    assert distilled.replay[0].shape[0] == 4  # t2i.surrogate_count (FAST): the surrogate's images
    assert len(distilled.prompts) > 4  # under the kept prompts, not their own
    for bad in (
        "t2i.replay_distill=-1",
        "t2i.replay_distill_batch=0",
        "t2i.replay_distill_max_t=-1",
        "t2i.replay_distill_min_t=-1",
        "t2i.replay_distill_min_t=5 t2i.replay_distill_max_t=5",
        "t2i.replay_distill_images=noise",
    ):
        with pytest.raises(AmnesiaError, match="replay_distill"):
            load_config(None, bad.split())
