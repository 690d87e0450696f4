"""Attacks on a text-to-image model's forgetting (``amnesia attack``; docs/attacks.md).

- ``paraphrase``: prompts from a file and templates filled with the concept's words;
- ``soft_prompt``: white-box optimisation of a conditioning (``invert_sequence``, the whole sequence)
  or of one new token (``invert_token``, concept inversion, Pham et al. 2023);
- ``discrete``: k real prompt tokens by projected gradient steps (UnlearnDiffAtk, Zhang et al. 2023);
- ``detectors``: ``Detector.found(images) -> bool``: the MNIST world's digit judges, NudeNet, or an
  identity plug-in.

Every attack is judged the same way: the attack success rate (ASR) is the share of the images sampled
with what it found in which the detector finds the concept.

Importing this package imports nothing heavy (the CLI's parser imports it); the names below load their
modules (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

ATTACKS = ("paraphrase", "soft-prompt", "discrete")
DETECTOR_HELP = "digit:D (the MNIST world's judges), nudity (NudeNet) or identity:package.module:attr"

_LAZY = {
    "Detector": "detectors",
    "make_detector": "detectors",
    "invert_sequence": "soft_prompt",
    "invert_token": "soft_prompt",
}

__all__ = ["ATTACKS", "DETECTOR_HELP", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
