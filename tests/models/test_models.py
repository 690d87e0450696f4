import json
from pathlib import Path

import pytest
import torch

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models import ConditionalGenerativeModel, build_model, load_model


def test_cvae_satisfies_the_contract(tiny_cvae: torch.nn.Module) -> None:
    assert isinstance(tiny_cvae, ConditionalGenerativeModel)
    x, c = torch.rand(5, 1, 28, 28), torch.arange(5)
    nelbo = tiny_cvae.nelbo(x, c)
    assert nelbo.shape == (5,) and bool((nelbo > 0).all())
    noise = tiny_cvae.draw_noise(x, torch.Generator().manual_seed(1))
    assert torch.equal(tiny_cvae.nelbo(x, c, noise=noise), tiny_cvae.nelbo(x, c, noise=noise))
    s = tiny_cvae.sample(c, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, 28, 28) and 0 <= float(s.min()) and float(s.max()) <= 1


def test_sample_is_reproducible_with_a_generator(tiny_cvae: torch.nn.Module) -> None:
    c = torch.tensor([1, 2, 3])
    a = tiny_cvae.sample(c, generator=torch.Generator().manual_seed(7))
    b = tiny_cvae.sample(c, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_labels_are_rejected(tiny_cvae: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        tiny_cvae.sample(torch.tensor([10]))


def test_save_and_load_round_trip(tiny_cvae: torch.nn.Module, tmp_path: Path) -> None:
    tiny_cvae.save_pretrained(tmp_path / "m", extra={"note": "x"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m")
    for (n, a), (_, b) in zip(tiny_cvae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_broken_model_directories_raise_clear_errors(tiny_cvae: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="not found"):
        load_model(tmp_path / "nothing")
    d = tmp_path / "m"
    tiny_cvae.save_pretrained(d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(AmnesiaError, match="safetensors"):
        load_model(d)
    tiny_cvae.save_pretrained(d)
    meta = json.loads((d / "config.json").read_text())
    meta["latent_dim"] = 7
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(AmnesiaError, match="do not match"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(AmnesiaError, match="not valid JSON"):
        load_model(d)


def test_unknown_family_and_settings() -> None:
    with pytest.raises(AmnesiaError, match="unknown model family"):
        build_model("gan")
    with pytest.raises(AmnesiaError, match="unknown cvae model settings"):
        build_model("cvae", width=3)
