"""What ``amnesia evaluate`` measures a model against: the model directory's own run config.

A model written by ``amnesia run``/``forget``/``pretrain`` carries the resolved config it was made with
(``run_config`` in ``config.json``, or under ``_selective_amnesia`` in a pipeline's ``model_index.json``).
Its forget concept, data set, classifier recipe and evaluation settings are the defaults of its
evaluation; a config file or ``key=value`` overrides given on the command line come on top, and one that
names a different concept or data set than the model was made with is refused with both values, because
the numbers would then measure the wrong class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selective_amnesia.errors import AmnesiaError

# settings that must agree between the model and a given config: they decide what is measured
IDENTITY_KEYS = (
    "forget.forget_label",
    "data.dataset",
    "data.image_size",
    "model.family",
    "t2i.forget_prompts",
)
# settings taken from the model when the command line does not give them (classifier.cache_dir is the
# evaluating user's, not the training run's)
INHERITED_KEYS = (
    "seed",
    "data.dataset",
    "data.root",
    "data.image_size",
    "forget.forget_label",
    "classifier.epochs",
    "classifier.batch_size",
    "classifier.lr",
    "classifier.step_size",
    "classifier.gamma",
    "classifier.seeds",
    "classifier.max_train_images",
    "evaluate.*",
    "t2i.forget_prompts",
)


def model_run_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The resolved run config stored in a model directory, or None (a converted or foreign model)."""
    from selective_amnesia.io.artifacts import read_json

    path = Path(model_dir)
    for name in ("config.json", "model_index.json"):
        if (path / name).is_file():
            try:
                meta = read_json(path / name)
            except AmnesiaError:
                return None  # load_model reports a damaged directory with its own message
            if name == "model_index.json" and isinstance(meta, dict):
                meta = meta.get("_selective_amnesia")  # where a pipeline keeps our metadata
            cfg = meta.get("run_config") if isinstance(meta, dict) else None
            return cfg if isinstance(cfg, dict) else None
    return None


def _get(tree: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def given_settings(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    """The nested settings the command line names explicitly (the file, then the overrides)."""
    from selective_amnesia.config import load_config

    # load_config validates the file and overrides; the raw tree says which keys were actually given
    load_config(config_path, overrides)
    from selective_amnesia.config import _parse_override
    from selective_amnesia.io.artifacts import parse_yaml, read_bytes_limited

    tree: dict[str, Any] = {}
    if config_path is not None:
        loaded = parse_yaml(read_bytes_limited(Path(config_path)).decode("utf-8"), str(config_path))
        tree = loaded if isinstance(loaded, dict) else {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def _inherited(stored: dict[str, Any]) -> list[tuple[str, Any]]:
    import dataclasses

    from selective_amnesia.config import RunConfig

    pairs: list[tuple[str, Any]] = []
    for key in INHERITED_KEYS:
        if key.endswith(".*"):
            name = key[:-2]
            section = stored.get(name)
            known = {f.name for f in dataclasses.fields(getattr(RunConfig(), name))}
            if isinstance(section, dict):  # a key of an older version is dropped, not an error
                pairs += [(f"{name}.{k}", v) for k, v in section.items() if k in known]
            continue
        found, value = _get(stored, key)
        if found:
            pairs.append((key, value))
    return pairs


def evaluation_overrides(
    model_dir: str | Path, config_path: str | None, overrides: list[str]
) -> tuple[list[str], dict[str, Any]]:
    """Overrides that make the evaluation config the model's own, then the command line's.

    Returns (overrides for ``load_config(config_path, ...)``, {key: value} taken from the model). Raises
    ``AmnesiaError`` when the command line names a different concept or data set than the model's.
    """
    stored = model_run_config(model_dir)
    if stored is None:
        return list(overrides), {}
    given = given_settings(config_path, overrides)
    for key in IDENTITY_KEYS:
        has_model, model_value = _get(stored, key)
        has_given, given_value = _get(given, key)
        if has_model and has_given and given_value != model_value:
            raise AmnesiaError(
                f"{key} is {given_value!r} on the command line but {model_value!r} in {model_dir} (the model "
                f"was made with it): drop {key} from the config/overrides, or evaluate another model"
            )
    taken = {k: v for k, v in _inherited(stored) if not _get(given, k)[0]}
    # JSON is YAML, so each value reads back as the same type; the command line's overrides come last
    inherited = [f"{k}={json.dumps(v)}" for k, v in taken.items()]
    return inherited + list(overrides), taken
