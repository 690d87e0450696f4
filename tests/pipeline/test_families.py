"""The family registry (selective_amnesia.families): every family registered, lookups, and a family added
by one registry entry reaching the config, build, load and Fisher paths without any other change."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from selective_amnesia import families
from selective_amnesia.config import FisherConfig, ModelConfig, RunConfig, load_config
from selective_amnesia.core.fisher import ESTIMATORS
from selective_amnesia.core.fisher_diffusion import DIFFUSION_ESTIMATORS
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.families import (
    FAMILIES,
    Family,
    all_fisher_estimators,
    declared_family,
    family_names,
    get_family,
    marked_family,
)
from selective_amnesia.models import build_model, build_model_from_config, load_model
from selective_amnesia.models.cvae import ConditionalVAE
from selective_amnesia.models.ddpm import ConditionalDDPM

SRC = Path(__file__).resolve().parents[2] / "src" / "selective_amnesia"


def test_every_family_is_registered_under_its_own_name() -> None:
    assert family_names() == ("cvae", "ddpm", "text_to_image")
    assert all(f.name == name for name, f in FAMILIES.items())
    assert ConditionalVAE.family == "cvae" and ConditionalDDPM.family == "ddpm"
    for name in family_names():
        assert ModelConfig(family=name).family == name  # the config accepts every registered family
    assert [n for n, f in FAMILIES.items() if f.trainable] == ["cvae", "ddpm"]
    assert [n for n, f in FAMILIES.items() if f.prompted] == ["text_to_image"]
    assert [n for n, f in FAMILIES.items() if f.diffusion] == ["ddpm", "text_to_image"]


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(AmnesiaError) as e:
        get_family("gan")
    assert str(e.value) == "unknown model family 'gan': choose one of ['cvae', 'ddpm', 'text_to_image']"
    with pytest.raises(AmnesiaError) as e:
        ModelConfig(family="gan")
    assert str(e.value) == "model.family must be one of ('cvae', 'ddpm', 'text_to_image'), got 'gan'"


def test_fisher_estimators_come_from_the_estimators_modules() -> None:
    assert get_family("cvae").fisher_estimators() == ESTIMATORS
    assert get_family("ddpm").fisher_estimators() == DIFFUSION_ESTIMATORS
    assert get_family("text_to_image").fisher_estimators() == DIFFUSION_ESTIMATORS
    assert all_fisher_estimators() == ESTIMATORS + DIFFUSION_ESTIMATORS
    assert FisherConfig().checkpoint_interval("cvae") == 0
    assert FisherConfig().checkpoint_interval("ddpm") == 10
    assert FisherConfig(checkpoint_every=3).checkpoint_interval("cvae") == 3


def test_directories_name_their_family(tmp_path: Path) -> None:
    assert marked_family(tmp_path) is None
    (tmp_path / "model_index.json").write_text("{}")
    assert marked_family(tmp_path) is get_family("text_to_image")
    assert declared_family("cvae") is get_family("cvae")
    # a diffusers directory is named by its model_index.json, never by a config.json "family"
    assert declared_family("text_to_image") is None
    assert declared_family(["cvae"]) is None and declared_family(None) is None


def test_the_registry_imports_nothing_heavy() -> None:
    code = "import sys, selective_amnesia.families as f; f.get_family('ddpm'); "
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_no_family_name_comparison_outside_the_registry() -> None:
    """The issue's "done when" (its grep for `family ==`/`family !=`): behaviour that differs by family
    reads the registry."""
    pattern = re.compile(r"\bfamily\s*[!=]=")
    found = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "families.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


# ---- a family added by one registry entry ------------------------------------------------------


@dataclasses.dataclass
class FakeConfig:
    width: int = 3
    num_classes: int = 10


class FakeModel(torch.nn.Module):
    family = "fake"

    def __init__(self, config: FakeConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = torch.nn.Linear(config.width, 1)


def _load_fake(path: Path) -> FakeModel:
    meta = json.loads((path / "config.json").read_text())
    return FakeModel(FakeConfig(width=meta["width"]))


def _fake_fisher(cfg: RunConfig, model: Any, checkpoint_dir: Path | None) -> Any:
    return ("fake fisher", cfg.fisher.estimator, cfg.fisher.checkpoint_interval(model.family))


@pytest.fixture
def fake_family(monkeypatch: pytest.MonkeyPatch) -> Family:
    fake = Family(
        name="fake",
        title="fake",
        load=_load_fake,
        fisher_estimators=lambda: ("exact",),
        fisher=_fake_fisher,
        fisher_checkpoint_every=7,
        classes=lambda: (FakeModel, FakeConfig),
        settings=lambda model: {"width": model.latent_dim},
        settings_key="model.latent_dim",
    )
    monkeypatch.setitem(FAMILIES, "fake", fake)
    return fake


def test_a_registered_family_reaches_config_build_load_and_fisher(
    fake_family: Family, tmp_path: Path
) -> None:
    cfg = load_config(None, ["model.family=fake", "model.latent_dim=5", "fisher.estimator=exact"])
    assert cfg.model.family == "fake"
    with pytest.raises(AmnesiaError, match="fisher.estimator 'batched' does not apply to model.family fake"):
        load_config(None, ["model.family=fake"])

    model = build_model_from_config(cfg.model)
    assert isinstance(model, FakeModel) and model.config.width == 5
    assert isinstance(build_model("fake", width=2), FakeModel)

    (tmp_path / "config.json").write_text(json.dumps({"family": "fake", "width": 4}))
    loaded = load_model(tmp_path)
    assert isinstance(loaded, FakeModel) and loaded.config.width == 4

    from selective_amnesia.pipeline.classes import fisher_from_config

    assert fisher_from_config(cfg, model) == ("fake fisher", "exact", 7)


def test_an_unregistered_family_is_refused_everywhere(tmp_path: Path) -> None:
    assert "fake" not in FAMILIES
    with pytest.raises(AmnesiaError, match="unknown model family 'fake': choose one of \\['cvae', 'ddpm'\\]"):
        build_model("fake")
    (tmp_path / "config.json").write_text(json.dumps({"family": "fake", "width": 4}))
    with pytest.raises(AmnesiaError, match="unknown model family 'fake'"):
        load_model(tmp_path)
    assert families.get_family("cvae").judges is None
