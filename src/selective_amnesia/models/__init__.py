"""Model families behind one contract; ``load_model`` reads any model directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io import load_tensors, read_json
from selective_amnesia.models.base import ConditionalDiffusionModel, ConditionalGenerativeModel
from selective_amnesia.models.cvae import ConditionalVAE, CVAEConfig
from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig
from selective_amnesia.runstate import check_complete

if TYPE_CHECKING:
    from selective_amnesia.models.text_to_image import TextToImageModel

    def _families_satisfy_the_contract(
        vae: ConditionalVAE, ddpm: ConditionalDDPM, t2i: TextToImageModel
    ) -> tuple[ConditionalGenerativeModel, ConditionalDiffusionModel, ConditionalDiffusionModel]:
        """Never run: mypy checks here that each family satisfies its protocol structurally."""
        return vae, ddpm, t2i


_FAMILIES: dict[str, tuple[type, type]] = {
    "cvae": (ConditionalVAE, CVAEConfig),
    "ddpm": (ConditionalDDPM, DDPMConfig),
}


def build_model(family: str, **kwargs: Any) -> Any:
    """Build a freshly initialised model of ``family`` from its config fields."""
    if family not in _FAMILIES:
        raise AmnesiaError(f"unknown model family {family!r}: choose one of {sorted(_FAMILIES)}")
    model_cls, config_cls = _FAMILIES[family]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise AmnesiaError(f"unknown {family} model settings {sorted(unknown)}; known: {sorted(names)}")
    try:
        return model_cls(config_cls(**kwargs))
    except (TypeError, ValueError) as e:
        raise AmnesiaError(f"bad {family} model settings: {e}") from None


def build_model_from_config(model_cfg: Any) -> Any:
    """A fresh model from a run config's ``model`` section (``ModelConfig``)."""
    if model_cfg.family == "ddpm":
        return build_model("ddpm", **dataclasses.asdict(model_cfg.ddpm))
    return build_model(model_cfg.family, hidden_dims=model_cfg.hidden_dims, latent_dim=model_cfg.latent_dim)


def load_model(path: str | Path, *, check_state: bool = True) -> Any:
    """Load a model directory written by ``save_pretrained``; bad directories raise ``AmnesiaError``.

    ``check_state=False`` skips the ``amnesia_run.json`` check, for the command that is itself writing
    the directory and reuses a finished model it matched by settings hash."""
    path = Path(path)
    if not path.is_dir():
        raise AmnesiaError(f"model directory {path} not found")
    if check_state:
        check_complete(path)
    if not any((path / marker).is_file() for marker in ("config.json", "model_index.json")):
        interrupted = (path / "checkpoint").is_dir()  # a training run wrote here and did not finish
        raise AmnesiaError(
            f"{path} is not a complete model directory (no config.json or model_index.json)"
            + (": the command writing it was interrupted; rerun it to finish" if interrupted else "")
        )
    if (
        (path / "model_index.json").is_file()
        or (path / "unet" / "config.json").is_file()
        and not (path / "config.json").is_file()
    ):
        from selective_amnesia.models.text_to_image import TextToImageModel

        # a diffusers pipeline directory: from_pretrained picks SD 1.x/2.x or SDXL conditioning by
        # model_index.json's _class_name (there, so that pipeline_t2i's direct call gets it too)
        return TextToImageModel.from_pretrained(path)
    meta = read_json(path / "config.json")
    if not isinstance(meta, dict) or "family" not in meta:
        raise AmnesiaError(f"{path}/config.json has no 'family': not a selective-amnesia model directory")
    family = meta["family"]
    if not isinstance(family, str) or family not in _FAMILIES:
        raise AmnesiaError(f"{path}: unknown model family {family!r}")
    model_cls = _FAMILIES[family][0]
    if hasattr(model_cls, "from_pretrained"):  # families with their own directory layout (ddpm: unet/)
        model: Any = model_cls.from_pretrained(path)
        return model
    config_cls = _FAMILIES[family][1]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    model = build_model(family, **{k: v for k, v in meta.items() if k in fields})
    state, _ = load_tensors(path / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise AmnesiaError(f"{path}: weights do not match config.json ({first})") from None
    model.eval()
    return model


__all__ = [
    "ConditionalDDPM",
    "ConditionalDiffusionModel",
    "ConditionalGenerativeModel",
    "ConditionalVAE",
    "CVAEConfig",
    "DDPMConfig",
    "build_model",
    "build_model_from_config",
    "load_model",
]
