"""Model families behind one contract; ``load_model`` reads any model directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.families import FAMILIES, declared_family, get_family, marked_family, markers
from selective_amnesia.io.artifacts import load_tensors, read_json
from selective_amnesia.io.runstate import check_complete
from selective_amnesia.models.base import ConditionalDiffusionModel, ConditionalGenerativeModel
from selective_amnesia.models.cvae import ConditionalVAE, CVAEConfig
from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig

if TYPE_CHECKING:
    from selective_amnesia.config import ModelConfig
    from selective_amnesia.models.text_to_image import TextToImageModel

    def _families_satisfy_the_contract(
        vae: ConditionalVAE, ddpm: ConditionalDDPM, t2i: TextToImageModel
    ) -> tuple[ConditionalGenerativeModel, ConditionalDiffusionModel, ConditionalDiffusionModel]:
        """Never run: mypy checks here that each family satisfies its protocol structurally."""
        return vae, ddpm, t2i


def build_model(family: str, **kwargs: Any) -> ConditionalGenerativeModel:
    """Build a freshly initialised model of ``family`` from its config fields."""
    entry = FAMILIES.get(family) if isinstance(family, str) else None
    if entry is None or entry.classes is None:
        buildable = sorted(name for name, f in FAMILIES.items() if f.classes is not None)
        raise AmnesiaError(f"unknown model family {family!r}: choose one of {buildable}")
    model_cls, config_cls = entry.classes()
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise AmnesiaError(f"unknown {family} model settings {sorted(unknown)}; known: {sorted(names)}")
    try:
        model: ConditionalGenerativeModel = model_cls(config_cls(**kwargs))  # ``classes``: bare types
    except (TypeError, ValueError) as e:
        raise AmnesiaError(f"bad {family} model settings: {e}") from None
    return model


def build_model_from_config(model_cfg: ModelConfig) -> ConditionalGenerativeModel:
    """A fresh model from a run config's ``model`` section (``ModelConfig``)."""
    entry = get_family(model_cfg.family)
    return build_model(entry.name, **(entry.settings(model_cfg) if entry.settings is not None else {}))


def load_model(path: str | Path, *, check_state: bool = True) -> ConditionalGenerativeModel:
    """Load a model directory written by ``save_pretrained``; bad directories raise ``AmnesiaError``.

    ``check_state=False`` skips the ``amnesia_run.json`` check, for the command that is itself writing
    the directory and reuses a finished model it matched by settings hash."""
    path = Path(path)
    if not path.is_dir():
        raise AmnesiaError(f"model directory {path} not found")
    if check_state:
        check_complete(path)
    names = ["config.json", *markers()]
    if not any((path / name).is_file() for name in names):
        interrupted = (path / "checkpoint").is_dir()  # a training run wrote here and did not finish
        raise AmnesiaError(
            f"{path} is not a complete model directory (no {' or '.join(names)})"
            + (": the command writing it was interrupted; rerun it to finish" if interrupted else "")
        )
    entry = marked_family(path)  # a diffusers pipeline directory (model_index.json)
    if entry is None:
        meta = read_json(path / "config.json")
        if not isinstance(meta, dict) or "family" not in meta:
            raise AmnesiaError(f"{path}/config.json has no 'family': not a selective-amnesia model directory")
        family = meta["family"]
        entry = declared_family(family)
        if entry is None:
            raise AmnesiaError(f"{path}: unknown model family {family!r}")
    return entry.load(path)


def load_weights_directory(path: Path, family: str) -> ConditionalGenerativeModel:
    """A model of ``family`` from a directory of ``config.json`` (its config class's fields) and
    ``model.safetensors`` (its state dict): the layout of families without their own ``from_pretrained``."""
    meta = read_json(path / "config.json")
    entry = get_family(family)
    assert entry.classes is not None, f"{family} is not built from its config"
    fields = {f.name for f in dataclasses.fields(entry.classes()[1])}
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
    "load_weights_directory",
]
