"""``amnesia config show``: the resolved config, only the sections the model family uses, and a reference
of every key with its type, value and meaning (taken from the comments in ``config.py``)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

import yaml

# sections that belong to one family only; the others are hidden from a run that cannot use them
_ONLY_FOR = {
    "model.ddpm": {"ddpm"},
    "model.hidden_dims": {"cvae"},
    "model.latent_dim": {"cvae"},
    "t2i": {"text_to_image"},
    "esd": {"text_to_image"},
    "uce": {"text_to_image"},
}


def relevant(tree: dict[str, Any], family: str) -> dict[str, Any]:
    """``tree`` (a resolved config as a dict) without the keys its model family never reads."""
    import copy

    tree = copy.deepcopy(tree)
    for key, families in _ONLY_FOR.items():
        if family in families:
            continue
        *parents, last = key.split(".")
        node: Any = tree
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def relevant_yaml(cfg: Any) -> str:
    from selective_amnesia.config import to_dict

    return str(yaml.safe_dump(relevant(to_dict(cfg), cfg.model.family), sort_keys=False))


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source (inline, else the comment lines just above)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"\s+(\w+): [^=]+(?:=.*?)?(?:\s+#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "return", "_check")):
            inline = m.group(2)
            text = inline or " ".join(pending)
            if text:
                found[m.group(1)] = text
        pending = []
    return found


# keys whose field in config.py has no comment of its own
_MEANINGS = {
    "name": "the run's name (report title)",
    "seed": "one seed for every random draw of the run",
    "progress": "progress bars (--no-progress / -q turn them off)",
    "model.family": "cvae, ddpm or text_to_image",
    "model.hidden_dims": "cvae: widths of the hidden layers",
    "model.latent_dim": "cvae: latent dimension",
    "pretrain.model_path": "use this model directory as theta* instead of training one",
    "pretrain.steps": "training steps of the base model",
    "pretrain.batch_size": "images per training step",
    "pretrain.lr": "learning rate of the base model's training",
    "fisher.num_samples": "samples (x, c) from theta* that the Fisher averages over",
    "fisher.chunk_size": "VAE: samples per batched gradient",
    "forget.surrogate_label": "forget.surrogate=class: the class c_f becomes",
    "forget.surrogate_path": "forget.surrogate=folder: a directory of images",
    "classifier.epochs": "training epochs of each evaluation classifier",
    "classifier.batch_size": "classifier training batch",
    "classifier.lr": "classifier learning rate",
    "classifier.step_size": "epochs between learning-rate drops",
    "classifier.gamma": "learning-rate drop factor",
    "classifier.seeds": "one classifier per seed; metrics are their mean and spread",
}


def _type_name(tp: Any) -> str:
    text = str(tp).replace("typing.", "").replace("selective_amnesia.config.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text)


def key_reference(cfg: Any) -> list[tuple[str, str, str, str]]:
    """(key, type, value, meaning) for every leaf key of ``cfg`` the model family reads."""
    from selective_amnesia.config import to_dict

    shown = relevant(to_dict(cfg), cfg.model.family)
    rows: list[tuple[str, str, str, str]] = []

    def walk(obj: Any, prefix: str, tree: Any) -> None:
        hints = typing.get_type_hints(type(obj))
        notes = _comments(type(obj))
        for f in dataclasses.fields(obj):
            if not isinstance(tree, dict) or f.name not in tree:
                continue
            key = f"{prefix}{f.name}"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".", tree[f.name])
                continue
            meaning = notes.get(f.name, "") or _MEANINGS.get(key, "")
            rows.append(
                (
                    key,
                    _type_name(hints[f.name]),
                    # the plain form (a list of sections, t2i.concepts, is a list of dicts there)
                    yaml.safe_dump(tree[f.name], default_flow_style=True).strip().removesuffix("\n..."),
                    meaning,
                )
            )

    walk(cfg, "", shown)
    return rows


def format_reference(rows: list[tuple[str, str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    twidth = max(len(r[1]) for r in rows)
    lines = [f"{'key'.ljust(width)}  {'type'.ljust(twidth)}  value  # meaning"]
    for key, tp, value, meaning in rows:
        lines.append(
            f"{key.ljust(width)}  {tp.ljust(twidth)}  {value}" + (f"  # {meaning}" if meaning else "")
        )
    return "\n".join(lines) + "\n"
