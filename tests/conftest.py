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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny ``amnesia run`` (about a minute on 2 cores), shared by the CLI tests."""
    from selective_amnesia.cli import main

    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    code = main(["run", str(TINY_CONFIG), "--out", str(out), f"classifier.cache_dir={cache}"])
    assert code == 0
    return out
