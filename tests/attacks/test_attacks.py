"""``amnesia attack`` on the tiny in-code pipelines: outputs, reproducibility, what each attack optimises,
and bad input. The detector is a test double plugged in as an identity scorer (no MNIST judges here)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selective_amnesia.attacks.common import TokenSlots, batched, eval_draws, fixed_loss
from selective_amnesia.attacks.soft_prompt import invert_sequence, optimise_sequence, token_slots
from selective_amnesia.cli import main
from selective_amnesia.io.artifacts import load_tensors
from selective_amnesia.models.text_to_image import TextToImageModel

DOUBLE = '''
import torch

class Bright:
    """Found when the mean pixel is above the threshold: a stand-in for a real judge."""

    name = "bright"

    def score(self, images):
        return images.float().mean(dim=(1, 2, 3)) / 255
'''
DETECTOR = ["--detector", "identity:attack_double:Bright", "--threshold", "0.2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    where = tmp_path_factory.mktemp("double")
    (where / "attack_double.py").write_text(DOUBLE)
    sys.path.insert(0, str(where))
    yield
    sys.path.remove(str(where))
    sys.modules.pop("attack_double", None)


def run(*argv: str) -> int:
    return main(["attack", *argv, *DETECTOR, "--no-progress"])


def targets_from(model_dir: Path, prompt: str = "a handwritten 7") -> list[str]:
    return ["--target-model", str(model_dir), "--target-prompt", prompt, "--num-targets", "4"]


SMALL = ["--steps", "3", "--train-batch", "2", "--num-images", "2"]


def read(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    report = json.loads((out / "attack.json").read_text())
    with np.load(out / "images.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return report, arrays


# ---- paraphrase ---------------------------------------------------------------------------------------


def test_paraphrase_reports_per_prompt_and_matches_amnesia_sample(tiny_world: Path, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# a comment\na handwritten 7\n\nthe number seven\n")
    (tmp_path / "t.txt").write_text("a sketch of a {}\nthe {} again\n")
    out = tmp_path / "para"
    code = run(
        "paraphrase", "--model", str(tiny_world), "--out", str(out), "--prompts", str(tmp_path / "p.txt"),
        "--concept-words", "seven", "7", "--templates", str(tmp_path / "t.txt"), "--num-per-prompt", "2",
        "--seed", "3",
    )  # fmt: skip
    assert code == 0
    report, arrays = read(out)
    prompts = [
        "a handwritten 7", "the number seven", "a sketch of a seven", "a sketch of a 7", "the seven again",
        "the 7 again",
    ]  # fmt: skip
    assert [r["prompt"] for r in report["per_prompt"]] == prompts
    assert list(arrays["prompts"]) == prompts
    assert arrays["images"].shape == (12, 16, 16, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [i for i in range(6) for _ in range(2)]
    assert report["asr"] == pytest.approx(arrays["found"].mean())
    assert report["num_images"] == 12 and report["seed"] == 3
    assert (out / "grid.png").is_file() and Image.open(out / "grid.png").size[0] >= 2 * 64
    assert json.loads((out / "amnesia_run.json").read_text())["status"] == "complete"
    # the images are those of `amnesia sample` with the same seed
    assert main(["sample", "--model", str(tiny_world), "--prompt", "the 7 again", "--num-per-label", "2",
                 "--seed", "3", "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0  # fmt: skip
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_array_equal(f["images"], arrays["images"][arrays["labels"] == 5])


# ---- soft prompts -----------------------------------------------------------------------------------


def test_soft_prompt_sequence_is_reproducible(tiny_world: Path, tmp_path: Path) -> None:
    def attack(name: str, seed: str) -> tuple[dict, dict[str, np.ndarray], dict[str, torch.Tensor]]:
        out = tmp_path / name
        argv = ["soft-prompt", "--model", str(tiny_world), "--out", str(out), *targets_from(tiny_world)]
        assert run(*argv, *SMALL, "--prompt", "a handwritten 1", "--seed", seed) == 0
        report, arrays = read(out)
        return report, arrays, load_tensors(out / "embeddings.safetensors")[0]

    r1, a1, e1 = attack("a", "5")
    r2, a2, e2 = attack("b", "5")
    _, _, e3 = attack("c", "6")
    assert e1.keys() == {"encoder_hidden_states", "init.encoder_hidden_states"}
    assert e1["encoder_hidden_states"].shape == (16, 384)  # MiniLM, 16 tokens
    for k in e1:
        torch.testing.assert_close(e1[k], e2[k], rtol=0, atol=0)
    np.testing.assert_array_equal(a1["images"], a2["images"])
    assert r1["per_prompt"] == r2["per_prompt"] and r1["loss"] == r2["loss"]
    assert not torch.equal(e1["encoder_hidden_states"], e3["encoder_hidden_states"])
    assert list(a1["prompts"]) == ["<soft-prompt>", "a handwritten 1"]
    assert [r["role"] for r in r1["per_prompt"]] == ["attack", "baseline"]
    assert r1["settings"]["target_prompt"] == "a handwritten 7" and r1["settings"]["steps"] == 3


def test_soft_prompt_lowers_the_denoising_loss_on_its_targets(tiny_sd: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_sd)
    targets = torch.randn(8, *model.image_shape, generator=torch.Generator().manual_seed(0))
    init = {k: v[0] for k, v in model.encode_prompts(["a cat"]).items()}
    found, _ = optimise_sequence(
        model, targets, init, steps=30, lr=0.5, batch_size=8, generator=torch.Generator().manual_seed(1)
    )
    draws = eval_draws(model, targets, seed=2)
    before, after = (
        fixed_loss(model, targets, batched(init), draws),
        fixed_loss(model, targets, batched(found), draws),
    )
    # the random tiny UNet barely listens to its text (0.6% here); the drop is deterministic
    assert after < before - 0.003, (before, after)


def test_invert_sequence_leaves_the_model_as_it_found_it(tiny_world: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    model.train()  # as inside the forgetting loop: train mode, some weights trainable
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    init = {k: v[0] for k, v in model.encode_prompts(["a handwritten 7"]).items()}
    init_copy = {k: v.clone() for k, v in init.items()}
    targets = torch.randn(6, *model.image_shape)

    def invert(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return invert_sequence(model, targets, init, steps=3, lr=0.01, batch_size=3, generator=gen)

    out = invert(0)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert out.keys() == init.keys() and all(torch.equal(init[k], init_copy[k]) for k in init)
    assert out["encoder_hidden_states"].shape == init["encoder_hidden_states"].shape
    assert not out["encoder_hidden_states"].requires_grad
    assert not torch.equal(out["encoder_hidden_states"], init["encoder_hidden_states"])
    torch.testing.assert_close(invert(0), out, rtol=0, atol=0)
    model.register_embeds("<found>", out)  # usable as a condition
    assert (
        model.sample(model.prompt_ids(["<found>"]), generator=torch.Generator().manual_seed(0)).shape[0] == 1
    )


@pytest.mark.parametrize("fixture", ["tiny_world", "tiny_sd"])
def test_a_placeholder_with_a_real_tokens_embedding_gives_that_prompt(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model = TextToImageModel.from_pretrained(request.getfixturevalue(fixture))
    word = "dog" if fixture == "tiny_world" else "x"  # one token in MiniLM's / the char vocabulary
    slots = token_slots(model, "a photo of {} here")
    enc, tok = model.conditioning.encoders["text_encoder"]
    (wid,) = tok(word, add_special_tokens=False).input_ids
    got = slots.encode([enc.get_input_embeddings().weight[[wid]].detach()])
    want = model.encode_prompts([f"a photo of {word} here"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_concept_inversion_token_on_sd_from_an_image_folder(tiny_sd: Path, tmp_path: Path) -> None:
    folder = tmp_path / "targets"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "tok"
    argv = ["soft-prompt", "--model", str(tiny_sd), "--out", str(out), "--targets", str(folder), *SMALL]
    assert run(*argv, "--mode", "token", "--template", "a photo of {}", "--init-word", "cat") == 0
    report, arrays = read(out)
    learned, _ = load_tensors(out / "learned_embeds.safetensors")  # diffusers' load_textual_inversion layout
    assert list(learned) == ["<soft-token>"] and learned["<soft-token>"].shape == (32,)
    cond, _ = load_tensors(out / "embeddings.safetensors")
    assert cond["encoder_hidden_states"].shape == (24, 32)
    assert arrays["images"].shape == (4, 16, 16, 3) and list(arrays["prompts"]) == [
        "<soft-token>",
        "a photo of cat",
    ]
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["template"] == "a photo of {}" and report["settings"]["targets"] == str(folder)
    assert report["settings"]["num_targets"] == 3


# ---- discrete -----------------------------------------------------------------------------------------


def test_discrete_writes_a_real_prompt_that_reencodes_to_its_tokens(tiny_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "disc"
    argv = ["discrete", "--model", str(tiny_world), "--out", str(out), *targets_from(tiny_world), *SMALL]
    extra = ["--tokens", "3", "--prompt", "a handwritten", "--position", "append", "--eval-every", "1"]
    assert run(*argv, *extra, "--concept-words", "seven", "7", "--seed", "2") == 0
    report, arrays = read(out)
    prompts = json.loads((out / "prompts.json").read_text())
    text, ids = prompts["attack_prompt"], prompts["token_ids"]
    assert text.startswith("a handwritten ") and len(ids) == 3 and prompts["reencodes"]
    model = TextToImageModel.from_pretrained(tiny_world)
    assert model.tokenizer(text, add_special_tokens=False).input_ids[-3:] == ids
    assert not any("seven" in w or "7" in w for w in prompts["token_words"])
    assert list(arrays["prompts"]) == [text, "a handwritten"]
    best = min(h["loss"] for h in report["history"])
    assert report["loss"]["best_projected"] == pytest.approx(best, abs=1e-6)
    # the written prompt's own conditioning is what was scored
    slots = TokenSlots(model, lambda ph: f"a handwritten {ph} {ph} {ph}", 3)
    rows = model.text_encoder.get_input_embeddings().weight[ids].detach()
    torch.testing.assert_close(slots.encode([rows]), model.encode_prompts([text]), rtol=1e-5, atol=1e-5)
    tensors, _ = load_tensors(out / "embeddings.safetensors")
    assert tensors["token_ids"].tolist() == ids
    again = tmp_path / "again"
    argv[4] = str(again)
    assert run(*argv, *extra, "--concept-words", "seven", "7", "--seed", "2") == 0
    assert json.loads((again / "prompts.json").read_text()) == prompts


def test_sdxl_token_and_discrete_use_both_text_encoders(tmp_path: Path) -> None:
    from selective_amnesia.attacks.discrete import discrete_attack
    from selective_amnesia.attacks.soft_prompt import invert_token
    from selective_amnesia.worlds.tiny_sd import build_tiny_sd

    model = TextToImageModel.from_pretrained(build_tiny_sd("sdxl", tmp_path / "xl"))
    targets = torch.randn(3, *model.image_shape)
    gen = torch.Generator().manual_seed(0)
    inv = invert_token(model, targets, "a photo of {}", "dog", steps=2, lr=0.01, batch_size=2, generator=gen)
    assert [tuple(v.shape) for v in inv.vectors] == [(32,), (64,)]
    assert inv.conditioning.keys() == {"encoder_hidden_states", "text_embeds", "time_ids"}
    result = discrete_attack(
        model,
        targets,
        prompt="a photo",
        num_tokens=2,
        position="append",
        steps=2,
        lr=0.01,
        batch_size=2,
        seed=0,
    )
    text = result.prompts["attack_prompt"]
    for _, tok in model.conditioning.encoders.values():
        assert tok(text, add_special_tokens=False).input_ids[-2:] == result.prompts["token_ids"]


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_attack_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["attack", "jailbreak", "--model", "m", "--out", "o"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _no_text_encoder(tiny_world: Path, where: Path) -> Path:
    shutil.copytree(tiny_world, where)
    (where / "text_encoder_ref.json").unlink()
    index = json.loads((where / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (where / "model_index.json").write_text(json.dumps(index))
    return where


@pytest.mark.parametrize(
    "case", ["empty_prompts", "no_text_encoder", "text_folder", "broken_png", "detector"]
)
def test_bad_input_is_one_line_and_exit_2(
    case: str, tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, out = str(tiny_world), str(tmp_path / "out")
    folder = tmp_path / "folder"
    folder.mkdir()
    if case == "empty_prompts":
        (tmp_path / "p.txt").write_text("# only a comment\n\n")
        argv = ["paraphrase", "--model", model, "--out", out, "--prompts", str(tmp_path / "p.txt"), *DETECTOR]
        want = "holds no prompt"
    elif case == "no_text_encoder":
        model = str(_no_text_encoder(tiny_world, tmp_path / "m"))
        argv = ["paraphrase", "--model", model, "--out", out, "--concept-words", "seven", *DETECTOR]
        want = "no text encoder"
    elif case in ("text_folder", "broken_png"):
        name = "notes.txt" if case == "text_folder" else "fake.png"
        (folder / name).write_text("not an image")
        argv = ["soft-prompt", "--model", model, "--out", out, "--targets", str(folder), *DETECTOR]
        want = "is empty" if case == "text_folder" else "cannot read image"
    else:
        argv = [
            "paraphrase",
            "--model",
            model,
            "--out",
            out,
            "--concept-words",
            "seven",
            "--detector",
            "dog:1",
        ]
        want = "unknown --detector"
    assert main(["attack", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and err[0].startswith("amnesia attack: error:"), err
    assert not (tmp_path / "out" / "attack.json").exists()
