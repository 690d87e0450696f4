"""``amnesia convert --to single-file / --to diffusers``: SD pipelines out to and back from the original
(CompVis/LDM) single-file layout, read by diffusers' own ``from_single_file``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from selective_amnesia.cli import main
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.convert import convert_single_file_to_diffusers, export_single_file
from selective_amnesia.worlds.tiny_sd import build_tiny_sd

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# names every reader of the original layout (A1111, ComfyUI, diffusers) looks for
LDM_NAMES = {
    "sd1": [
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ],
    "sd2-v": [
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
        "cond_stage_model.model.positional_embedding",
    ],
    "sdxl": [
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.text_projection",
    ],
}


def _pipe(path: Path, variant: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(path, local_files_only=True)


def _image(pipe: Any) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np", generator=gen).images


def _assert_same_weights(a: Any, b: Any, parts: tuple[str, ...] = COMPONENTS) -> None:
    for part in parts:
        if getattr(a, part, None) is None:
            continue
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "sdxl"])
def test_round_trip_through_the_single_file_is_exact(tmp_path: Path, variant: str) -> None:
    src = build_tiny_sd(variant, tmp_path / "src", seed=1)
    # --config has the same architecture but other weights: what comes back must be the file's
    config = build_tiny_sd(variant, tmp_path / "config", seed=2)
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(src), "--to", "single-file", "--out", str(single)]) == 0
    names = load_file(str(single)).keys()
    assert set(LDM_NAMES[variant]) <= names
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in names)
    back = tmp_path / "back"
    argv = ["convert", str(single), "--to", "diffusers", "--config", str(config), "--out", str(back)]
    assert main(argv) == 0
    original, restored = _pipe(src, variant), _pipe(back, variant)
    _assert_same_weights(original, restored)
    assert np.array_equal(_image(original), _image(restored))
    assert type(restored.scheduler) is type(original.scheduler)
    assert restored.scheduler.config.prediction_type == original.scheduler.config.prediction_type
    assert (back / "tokenizer" / "vocab.json").is_file()  # the stock tokenizer files are kept


def test_ckpt_is_read_weights_only_and_converts(tmp_path: Path) -> None:
    src = build_tiny_sd("sd1", tmp_path / "src", seed=1)
    export_single_file(src, tmp_path / "m.safetensors")
    state = load_file(str(tmp_path / "m.safetensors"))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, ckpt)  # the CompVis layout
    done = convert_single_file_to_diffusers(ckpt, tmp_path / "back", config=src)
    assert done.key == "state_dict" and "taken from --config" not in done.kind
    _assert_same_weights(_pipe(src, "sd1"), _pipe(tmp_path / "back", "sd1"))

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"state_dict": state, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(AmnesiaError, match="refusing"):
        convert_single_file_to_diffusers(tmp_path / "evil.ckpt", tmp_path / "evil", config=src)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "evil").exists()


def test_unet_only_file_takes_the_rest_from_config(tmp_path: Path) -> None:
    src = build_tiny_sd("sd1", tmp_path / "src", seed=1)
    config = build_tiny_sd("sd1", tmp_path / "config", seed=2)
    export_single_file(src, tmp_path / "m.safetensors")
    unet_only = {
        k: v for k, v in load_file(str(tmp_path / "m.safetensors")).items() if k.startswith("model.")
    }
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    done = convert_single_file_to_diffusers(tmp_path / "unet.safetensors", tmp_path / "back", config=config)
    assert "vae, text_encoder taken from --config" in done.kind
    back = _pipe(tmp_path / "back", "sd1")
    _assert_same_weights(_pipe(src, "sd1"), back, ("unet",))
    _assert_same_weights(_pipe(config, "sd1"), back, ("vae", "text_encoder"))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd1 = build_tiny_sd("sd1", tmp_path / "sd1", seed=1)
    xl = build_tiny_sd("sdxl", tmp_path / "xl", seed=1)
    single = tmp_path / "sd1.safetensors"
    export_single_file(sd1, single)

    capsys.readouterr()

    def fails(argv: list[str], message: str) -> None:
        assert main(["convert", *argv]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' progress bars, if any
        assert last.startswith("amnesia convert: error:") and message in last, last

    fails([str(single), "--to", "diffusers", "--out", str(tmp_path / "o")], "needs --config")
    fails(
        [str(single), "--to", "diffusers", "--config", str(xl), "--out", str(tmp_path / "o")], "does not fit"
    )
    fails(
        [str(single), "--to", "diffusers", "--config", str(tmp_path), "--out", str(tmp_path / "o")],
        "no model_index",
    )
    assert not (tmp_path / "o").exists()
    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    fails(
        [
            str(tmp_path / "other.safetensors"),
            "--to",
            "diffusers",
            "--config",
            str(sd1),
            "--out",
            str(tmp_path / "o"),
        ],
        "holds no model.diffusion_model",
    )
    fails([str(sd1), "--to", "single-file", "--out", str(single)], "exists: pass --force")
    fails(
        [str(single), "--to", "single-file", "--out", str(tmp_path / "x.safetensors")], "is not a directory"
    )
    fails(
        [str(sd1), "--to", "single-file", "--out", str(tmp_path / "x.safetensors"), "--config", str(xl)],
        "--config only applies",
    )
    assert main(["convert", str(sd1), "--to", "single-file", "--out", str(single), "--force"]) == 0


def test_real_sd1_block_structure_gets_the_names_of_real_checkpoints() -> None:
    # SD 1.x's four UNet and VAE levels (narrow): diffusers' detector must call the export "v1"
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from selective_amnesia.io.convert import SDComponents, check_single_file, pipeline_to_ldm
    from selective_amnesia.worlds.tiny_sd import clip_text_encoder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    parts = SDComponents(
        "StableDiffusionPipeline", unet, vae, [clip_text_encoder(hidden=32, act="quick_gelu", pad_id=49407)]
    )
    ckpt = pipeline_to_ldm(parts)
    check_single_file(ckpt, parts)
    assert infer_diffusers_model_type(ckpt) == "v1"
    real = [
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    ]
    assert all(k in ckpt for k in real)
