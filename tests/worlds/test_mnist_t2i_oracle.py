"""The retrained oracle: a world whose UNet never sees the excluded digits, sharing another world's VAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import load_tensors, read_json
from selective_amnesia.worlds import mnist_t2i
from selective_amnesia.worlds.mnist_t2i import WorldConfig, build_world


def test_an_oracle_world_never_trains_on_its_excluded_digits(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    train_unet = mnist_t2i._train_unet

    def spy(model: Any, latents: torch.Tensor, labels: torch.Tensor, *args: Any, **kw: Any) -> Any:
        seen["labels"], seen["n"] = labels.clone(), len(latents)
        return train_unet(model, latents, labels, *args, **kw)

    monkeypatch.setattr(mnist_t2i, "_train_unet", spy)
    out = tmp_path / "no7"
    build_world(out, WorldConfig.tiny(), progress=False, exclude_digits=[7], vae_from=tiny_world)
    assert seen["n"] == len(seen["labels"]) > 0 and 7 not in seen["labels"].tolist()
    written = read_json(out / "world.json")
    assert written["exclude_digits"] == [7] and written["vae_from"] == str(tiny_world)
    vae = "vae/diffusion_pytorch_model.safetensors"
    ours, theirs = load_tensors(out / vae)[0], load_tensors(tiny_world / vae)[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the same VAE, not a retrained one
    scale = "scaling_factor"
    assert read_json(out / "vae/config.json")[scale] == read_json(tiny_world / "vae/config.json")[scale]
    seen.clear()  # the same directory asked for the default world: the oracle is not reused as it
    build_world(out, WorldConfig.tiny(), progress=False)
    assert "exclude_digits" not in read_json(out / "world.json") and 7 in seen["labels"].tolist()


def test_a_bad_exclusion_or_vae_source_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="exclude_digits"):
        build_world(tmp_path / "w", WorldConfig.tiny(), progress=False, exclude_digits=[12])
    with pytest.raises(AmnesiaError, match="exclude_digits"):
        build_world(tmp_path / "w", WorldConfig.tiny(), progress=False, exclude_digits=list(range(10)))
    with pytest.raises(AmnesiaError, match="no vae/config.json"):
        build_world(tmp_path / "w", WorldConfig.tiny(), progress=False, vae_from=tmp_path)
    assert mnist_t2i.main(["--out", str(tmp_path / "w"), "--tiny", "--exclude-digits", "12"]) == 2
