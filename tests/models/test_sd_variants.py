"""SD 1.x, SD 2.x (v-prediction) and SDXL pipelines against stock diffusers: loss, sampling, saving, and
``configs/smoke_sd.yaml`` end to end (full pipeline and LoRA outputs loaded by the stock classes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selective_amnesia.cli import main
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import read_json, write_json
from selective_amnesia.models import load_model
from selective_amnesia.models.conditioning import ClipConditioning, DualClipConditioning
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.worlds.tiny_sd import VARIANTS, build_tiny_sd

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke_sd.yaml"
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny pipeline of a variant, built once per module on first use."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_tiny_sd(variant, tmp_path_factory.mktemp("tiny") / variant)
        return built[variant]

    return get


def _stock(path: Path, variant: str) -> Any:
    """The stock pipeline of ``path`` with the DDIM scheduler our sampler uses by default."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if variant == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _ours(model: TextToImageModel, prompts: list[str], seeds: tuple[int, ...], **kw: Any) -> torch.Tensor:
    latents = model.sample(model.prompt_ids(prompts), generator=_gens(*seeds), **kw)
    return (model.decode(latents) + 1) / 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_samples_equal_the_stock_pipeline(tiny: Callable[[str], Path], variant: str) -> None:
    model = load_model(tiny(variant))
    assert isinstance(model, TextToImageModel)
    conditioning = DualClipConditioning if variant == "sdxl" else ClipConditioning
    assert type(model.conditioning) is conditioning
    assert model.prediction_type == ("v_prediction" if variant == "sd2-v" else "epsilon")
    ours = _ours(model, PROMPTS, (3, 4), guidance_scale=2.0, num_inference_steps=3)
    stock = _stock(tiny(variant), variant)(
        PROMPTS, num_inference_steps=3, guidance_scale=2.0, generator=_gens(3, 4), output_type="pt"
    ).images
    assert torch.allclose(ours, stock, atol=1e-5)


def test_sdxl_guides_with_zeros_as_the_stock_pipeline(tiny: Callable[[str], Path]) -> None:
    """force_zeros_for_empty_prompt: the unconditional half is zeros, not the embedding of ""."""
    model = load_model(tiny("sdxl"))
    assert all(not v.any() for k, v in model.null_embeds.items() if k != "time_ids")
    zeros = _ours(model, PROMPTS[:1], (5,), guidance_scale=3.0, num_inference_steps=2)
    model.null_embeds = model.conditioning.encode([""])  # what force_zeros_for_empty_prompt=false gives
    empty = _ours(model, PROMPTS[:1], (5,), guidance_scale=3.0, num_inference_steps=2)
    assert not torch.allclose(zeros, empty, atol=1e-4)  # the equality test above would see the difference


def test_v_prediction_loss_targets_the_velocity(tiny: Callable[[str], Path]) -> None:
    from diffusers import DDPMScheduler

    path = tiny("sd2-v")
    model = TextToImageModel.from_pretrained(path)
    ids = model.prompt_ids(PROMPTS)
    x, eps = torch.randn(2, *model.image_shape), torch.randn(2, *model.image_shape)
    t = torch.tensor([5, 900])
    ours = model.nelbo(x, ids, noise=(t, eps))
    sched = DDPMScheduler.from_pretrained(path / "scheduler")
    assert sched.config.prediction_type == "v_prediction"
    text = model.encode_prompts(PROMPTS)["encoder_hidden_states"]
    pred = model.unet(sched.add_noise(x, eps, t), t, encoder_hidden_states=text).sample
    target = sched.get_velocity(x, eps, t)
    assert torch.allclose(ours, (pred - target).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5)
    # eps is not the target: the same prediction scored against eps differs
    assert not torch.allclose(ours, (pred - eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-3)


def test_sdxl_loss_is_the_stock_unet_call(tiny: Callable[[str], Path]) -> None:
    """Our loss against one built by hand from stock encode_prompt and _get_add_time_ids."""
    from diffusers import DDPMScheduler

    path = tiny("sdxl")
    model = TextToImageModel.from_pretrained(path)
    ids = model.prompt_ids(PROMPTS)
    x, eps = torch.randn(2, *model.image_shape), torch.randn(2, *model.image_shape)
    t = torch.tensor([17, 640])
    ours = model.nelbo(x, ids, noise=(t, eps))

    pipe = _stock(path, "sdxl")
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    time_ids = pipe._get_add_time_ids(
        size,
        (0, 0),
        size,
        embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    ).repeat(2, 1)
    noisy = DDPMScheduler.from_pretrained(path / "scheduler").add_noise(x, eps, t)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    pred = pipe.unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    assert torch.allclose(ours, (pred - eps).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5)
    assert ours.shape == (2,) and not torch.allclose(ours[0], ours[1])
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"unet"}  # encoders stay frozen outside


@pytest.mark.parametrize("variant", ["sdxl"])  # SD 2.x's directory: the smoke test loads it in stock
def test_save_writes_a_stock_directory_that_reloads(
    tiny: Callable[[str], Path], tmp_path: Path, variant: str
) -> None:
    model = TextToImageModel.from_pretrained(tiny(variant))
    model.set_sampler(num_inference_steps=2, guidance_scale=2.0)
    model.save_pretrained(tmp_path / "saved")
    index = read_json(tmp_path / "saved" / "model_index.json")
    stock = read_json(tiny(variant) / "model_index.json")
    assert index["_class_name"] == stock["_class_name"]
    assert {k for k, v in stock.items() if isinstance(v, list)} <= set(index)  # every stock component
    sched = read_json(tmp_path / "saved" / "scheduler" / "scheduler_config.json")
    assert sched["prediction_type"] == model.prediction_type
    again = load_model(tmp_path / "saved", check_state=False)
    assert type(again.conditioning) is type(model.conditioning)
    assert again.config.num_inference_steps == 2 and again.prediction_type == model.prediction_type
    ours = _ours(again, PROMPTS[:1], (7,))  # the saved sampler defaults: 2 steps, guidance 2
    stock_images = _stock(tmp_path / "saved", variant)(
        PROMPTS[0], num_inference_steps=2, guidance_scale=2.0, generator=_gens(7), output_type="pt"
    ).images
    assert torch.allclose(ours, stock_images, atol=1e-5)


def test_unsupported_pipelines_are_refused(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny("sd1"), bad)
    index = read_json(bad / "model_index.json")
    write_json(bad / "model_index.json", index | {"_class_name": "FluxPipeline"})
    with pytest.raises(AmnesiaError, match="'FluxPipeline' is not supported"):
        load_model(bad, check_state=False)
    # an SDXL UNet (added conditioning) named as a plain StableDiffusionPipeline
    shutil.rmtree(bad / "unet")
    shutil.copytree(tiny("sdxl") / "unet", bad / "unet")
    write_json(bad / "model_index.json", index)
    with pytest.raises(AmnesiaError, match="added conditioning"):
        load_model(bad, check_state=False)
    sched = read_json(bad / "scheduler" / "scheduler_config.json")
    write_json(bad / "scheduler" / "scheduler_config.json", sched | {"prediction_type": "sample"})
    shutil.rmtree(bad / "unet")
    shutil.copytree(tiny("sd1") / "unet", bad / "unet")
    with pytest.raises(AmnesiaError, match="prediction_type is 'sample'"):
        load_model(bad, check_state=False)


def test_sdxl_lora_applies_in_the_stock_pipeline_as_in_ours(
    tiny: Callable[[str], Path], tmp_path: Path
) -> None:
    from selective_amnesia.core.trainable import add_lora, lora_target_modules, save_lora

    model = TextToImageModel.from_pretrained(tiny("sdxl"))
    add_lora(model, lora_target_modules(model, "all", [], ["to_q", "to_k", "to_v", "to_out.0"]), 2, 4.0)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)  # peft starts B at zero: move it so that the adapter changes something
    ours = _ours(model, PROMPTS[:1], (1,), guidance_scale=2.0, num_inference_steps=2)
    save_lora(model, tmp_path / "lora")
    pipe = _stock(tiny("sdxl"), "sdxl")
    pipe.load_lora_weights(tmp_path / "lora")
    stock = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=2.0, generator=_gens(1), output_type="pt")
    assert torch.allclose(ours, stock.images, atol=1e-5)


def _smoke(world: Path, out: Path, *extra: str) -> None:
    assert main(["run", str(SMOKE), "--out", str(out), f"t2i.model={world}", *extra]) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_config_writes_a_pipeline_the_stock_class_loads(
    tiny: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    monkeypatch.chdir(REPO)  # the config names its prompt file relative to the repository
    _smoke(tiny(variant), tmp_path / "run")
    report = read_json(tmp_path / "run" / "report.json")
    assert report["replay_images"] == 3 and report["retention"]["prompts"] == 3
    pipe = _stock(tmp_path / "run" / "forget", variant)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if variant == "sd2-v" else "epsilon")
    image = pipe("a photo of brad pitt", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    forgotten = load_model(tmp_path / "run" / "forget")
    base = load_model(tiny(variant))
    moved = [not torch.equal(a, b) for a, b in zip(base.parameters(), forgotten.parameters(), strict=True)]
    assert any(moved)
    npz = tmp_path / "s.npz"
    args = ["sample", "--model", str(tmp_path / "run" / "forget"), "--prompt", "brad pitt", "--out", str(npz)]
    assert main([*args, "--num-per-label", "2", "--no-progress"]) == 0
    assert np.load(npz)["images"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])  # SD 2.x loads LoRA through SD 1.x's stock class
def test_smoke_lora_loads_in_the_stock_pipeline(
    tiny: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)
    _smoke(tiny(variant), tmp_path / "run", "t2i.output=lora", "t2i.lora_rank=4", "forget.lr=1e-2")
    lora = tmp_path / "run" / "forget_lora"
    pipe = _stock(tiny(variant), variant)
    plain = pipe("brad pitt", num_inference_steps=2, generator=_gens(1), output_type="pt").images
    pipe.load_lora_weights(lora)
    # every adapted layer of the file was loaded, none dropped
    saved = {k for k in load_file(lora / "pytorch_lora_weights.safetensors") if ".lora.down." in k}
    loaded = [n for n, _ in pipe.unet.named_parameters() if ".lora_A." in n]
    assert saved and len(loaded) == len(saved)
    adapted = pipe("brad pitt", num_inference_steps=2, generator=_gens(1), output_type="pt").images
    assert torch.isfinite(adapted).all() and not torch.equal(plain, adapted)
