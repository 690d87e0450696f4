"""Shared fixtures: tiny models built in code and one tiny pipeline run reused by the CLI tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from selective_amnesia.models import build_model

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one core per worker, no oversubscription
    torch.set_num_threads(1)
TINY_CONFIG = REPO / "configs" / "mnist_cvae_tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The user cache (classifiers) of every test and every process it starts: never the real one."""
    cache = tmp_path_factory.mktemp("user-cache")
    previous = os.environ.get("SELECTIVE_AMNESIA_CACHE")
    os.environ["SELECTIVE_AMNESIA_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SELECTIVE_AMNESIA_CACHE", None)
    else:
        os.environ["SELECTIVE_AMNESIA_CACHE"] = previous


@pytest.fixture
def tiny_cvae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cvae", hidden_dims=[32, 16], latent_dim=3)


def tiny_ddpm(num_train_timesteps: int = 10, num_classes: int = 3) -> torch.nn.Module:
    """A ~10k-parameter class-conditional DDPM on 8x8 grayscale images, seeded."""
    from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig

    torch.manual_seed(0)
    config = DDPMConfig(
        image_size=8,
        channels=1,
        num_classes=num_classes,
        block_out_channels=[8, 16],
        attention_levels=[False, False],
        layers_per_block=1,
        norm_num_groups=4,
        num_train_timesteps=num_train_timesteps,
        num_inference_steps=2,
        dropout=0.0,
    )
    return ConditionalDDPM(config)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny ``amnesia run`` (about a minute on 2 cores), shared by the CLI tests."""
    from selective_amnesia.cli import main

    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    code = main(["run", str(TINY_CONFIG), "--out", str(out), f"classifier.cache_dir={cache}"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seconds-long MNIST text-to-image world (diffusers pipeline directory, MiniLM referenced)."""
    from selective_amnesia.worlds.mnist_t2i import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig.tiny(), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-1.x-layout pipeline written by the stock ``StableDiffusionPipeline``: CLIP text
    encoder and tokenizer (a character-level vocabulary made here), RGB VAE, PNDM scheduler; random
    weights, seconds to build. Checks that nothing depends on the MNIST world's choices."""
    import json

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 "
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars.strip():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=24)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=24,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = root / "pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    return out
