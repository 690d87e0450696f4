"""Shared fixtures: tiny models built in code and one tiny pipeline run reused by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selective_amnesia.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "mnist_cvae_tiny.yaml"


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
