"""The text-to-image adapter against stock diffusers: loss, sampling, pipeline and LoRA round trips."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_amnesia.core.objective import LoraEWCPenalty
from selective_amnesia.core.trainable import (
    add_lora,
    lora_target_modules,
    merge_lora,
    save_lora,
    select_trainable,
)
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import read_json
from selective_amnesia.models import load_model
from selective_amnesia.models.text_to_image import TEXT_ENCODER_REF, TextToImageModel, text_encoder_from_ref


def _stock_pipeline(path: Path) -> object:
    from diffusers import StableDiffusionPipeline

    text_encoder = text_encoder_from_ref(read_json(path / TEXT_ENCODER_REF))
    return StableDiffusionPipeline.from_pretrained(path, text_encoder=text_encoder)


def _stock_images(pipe: object, prompt: str, seed: int, steps: int = 2, w: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=w, generator=gen, output_type="pt")  # type: ignore[operator]
    return out.images


def test_samples_equal_the_stock_pipeline(tiny_world: Path) -> None:
    model = load_model(tiny_world)
    assert isinstance(model, TextToImageModel)
    ids = model.prompt_ids(["a handwritten 7"])
    ours = model.decode(model.sample(ids, generator=[torch.Generator().manual_seed(3)], guidance_scale=2.0))
    stock = _stock_images(_stock_pipeline(tiny_world), "a handwritten 7", 3)
    assert torch.allclose((ours + 1) / 2, stock, atol=1e-5)


def test_loss_is_diffusers_latent_eps_mse(tiny_world: Path) -> None:
    from diffusers import DDPMScheduler

    model = TextToImageModel.from_pretrained(tiny_world)
    ids = model.prompt_ids(["a handwritten 3", "the number one"])
    x, t, eps = torch.randn(2, *model.image_shape), torch.tensor([5, 900]), torch.randn(2, *model.image_shape)
    ours = model.nelbo(x, ids, noise=(t, eps))
    sched = DDPMScheduler.from_pretrained(tiny_world / "scheduler")
    noisy = sched.add_noise(x, eps, t)
    text = model.encode_prompts(["a handwritten 3", "the number one"])["encoder_hidden_states"]
    pred = model.unet(noisy, t, encoder_hidden_states=text).sample
    # per-sample mean over latent entries, as the reference's p_losses (.mean([1, 2, 3]))
    assert torch.allclose(ours, (pred - eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5)
    assert ours.shape == (2,) and not torch.allclose(ours[0], ours[1])
    # the frozen parts are outside the parameters: only the UNet trains, and theta* copies share them
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"unet"}


def test_train_choices_select_the_right_weights(tiny_world: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    cross = select_trainable(model, "cross_attention")
    assert cross and all(".attn2." in n for n in cross)
    rest = select_trainable(model, "non_cross_attention")
    assert rest and not any(".attn2." in n for n in rest)
    # the reference's noxattn also keeps the time embedding and the output layers frozen
    others = [n for n, _ in model.named_parameters() if n not in cross and n not in rest]
    assert others and all(re.search(r"\.(conv_norm_out|conv_out|time_embedding)\.", n) for n in others)
    assert select_trainable(model, "regex", [r"\.to_k\."]) == [
        n for n, _ in model.named_parameters() if ".to_k." in n
    ]
    with pytest.raises(AmnesiaError, match="selects no parameter"):
        select_trainable(model, "regex", ["no_such_layer"])
    with pytest.raises(AmnesiaError, match="not a regular expression"):
        select_trainable(model, "regex", ["("])


def test_lora_ewc_merge_and_stock_loading(tiny_world: Path, tmp_path: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    ids = model.prompt_ids(["a handwritten 7"])
    modules = lora_target_modules(model, "all", [], ["to_q", "to_k", "to_v", "to_out.0"])
    layers = add_lora(model, modules, rank=2, alpha=4.0)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)  # peft starts B at zero: move it so that the adapter changes something
    params = dict(model.named_parameters())
    fisher = {k: torch.rand(params[k.replace(".weight", ".base_layer.weight")].shape) for k in layers}
    penalty = LoraEWCPenalty(fisher, layers)(params)
    brute = torch.stack(
        [(fisher[k] * (s * (params[b] @ params[a])).pow(2)).sum() for k, (a, b, s) in layers.items()]
    ).sum()
    assert penalty > 0 and torch.allclose(penalty, brute)

    gen = [torch.Generator().manual_seed(1)]
    adapted = model.decode(model.sample(ids, generator=gen, guidance_scale=2.0))
    save_lora(model, tmp_path / "lora")
    pipe = _stock_pipeline(tiny_world)
    plain = _stock_images(pipe, "a handwritten 7", 1)
    pipe.load_lora_weights(tmp_path / "lora")  # type: ignore[attr-defined]
    stock = _stock_images(pipe, "a handwritten 7", 1)
    assert not torch.allclose(plain, stock, atol=1e-3)  # the adapter matters...
    assert torch.allclose((adapted + 1) / 2, stock, atol=1e-5)  # ...and stock diffusers applies it as we do
    x, t, eps = torch.randn(2, *model.image_shape), torch.tensor([3, 700]), torch.randn(2, *model.image_shape)
    cond = ids.expand(2)
    before = model.eps_loss(x, cond, t, eps)
    merge_lora(model)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(model.eps_loss(x, cond, t, eps), before, rtol=1e-4)  # W* + s B A folded in


def test_bad_pipeline_directories_give_clear_errors(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="model_index.json not found"):
        TextToImageModel.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((tiny_world / "model_index.json").read_text())
    with pytest.raises(AmnesiaError, match="cannot load"):
        TextToImageModel.from_pretrained(broken)
    model = TextToImageModel.from_pretrained(tiny_world)
    with pytest.raises(AmnesiaError, match="resize"):
        model.encode(torch.zeros(1, 1, 28, 28))


def test_cli_sample_prompts(tiny_world: Path, tmp_path: Path) -> None:
    from selective_amnesia.cli import main

    out = tmp_path / "s.npz"
    args = ["sample", "--model", str(tiny_world), "--prompt", "a handwritten 7", "--prompt", "the digit 3"]
    assert main([*args, "--num-per-label", "3", "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    a = np.load(out)
    assert a["images"].shape == (6, 16, 16, 1) and a["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert a["prompts"].tolist() == ["a handwritten 7", "the digit 3"]
    # batch size does not change the images; the seed does
    out2 = tmp_path / "s2.npz"
    assert main([*args, "--num-per-label", "3", "--seed", "1", "--batch-size", "2", "--out", str(out2)]) == 0
    assert np.array_equal(np.load(out2)["images"], a["images"])
    assert main(["sample", "--model", str(tiny_world), "--labels", "7", "--out", str(out2)]) == 2
    assert main(["sample", "--model", str(tiny_world), "--out", str(out2)]) == 2


def test_cli_evaluate_i2p_csv(tiny_world: Path, tmp_path: Path) -> None:
    from selective_amnesia.cli import main

    csv = tmp_path / "i2p.csv"
    csv.write_text(
        "prompt,sd_seed,sd_guidance_scale,categories\na handwritten 7,3,2.0,x\nthe digit 1,4,7.5,y\n"
    )
    out = tmp_path / "eval.json"
    evaluate = ["evaluate", "--model", str(tiny_world), "--out", str(out), "--no-progress"]
    assert main([*evaluate, "--i2p-csv", str(csv)]) == 0
    report = read_json(out)
    assert report["nudity"]["num_images"] == 2 and report["nudity"]["threshold"] == 0.6
    assert set(report["faces"]["classes"]) == {"FACE_FEMALE", "FACE_MALE"}
    assert main(evaluate) == 2  # no prompts given
    assert main([*evaluate, "--i2p-csv", str(tmp_path / "nope.csv")]) == 2
