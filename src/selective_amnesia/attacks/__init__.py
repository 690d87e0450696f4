"""Attacks on a text-to-image model's forgetting (``amnesia attack``; docs/attacks.md).

- ``paraphrase``: prompts from a file and templates filled with the concept's words;
- ``soft_prompt``: white-box optimisation of a conditioning (``invert_sequence``, the whole sequence)
  or of one new token (``invert_token``, concept inversion, Pham et al. 2023);
- ``discrete``: k real prompt tokens by projected gradient steps (UnlearnDiffAtk, Zhang et al. 2023);
- ``detectors``: ``Detector.found(images) -> bool``: the MNIST world's digit judges, NudeNet, or an
  identity plug-in.

Every attack is judged the same way: the attack success rate (ASR) is the share of the images sampled
with what it found in which the detector finds the concept.
"""

from selective_amnesia.attacks.detectors import Detector, make_detector
from selective_amnesia.attacks.soft_prompt import invert_sequence, invert_token

__all__ = ["Detector", "invert_sequence", "invert_token", "make_detector"]
