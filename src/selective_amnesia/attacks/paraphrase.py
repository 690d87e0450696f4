"""The paraphrase attack: ask for the concept in words the forgetting never saw.

Prompts come from a file (one a line) and from the package's generic templates (``data/prompts/
concept_templates.txt``, lines with ``{}``) filled with each of the concept's words. Every prompt gets
N images; the report gives, per prompt, how often the detector finds the concept, and the overall ASR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selective_amnesia.attacks.common import AttackOutput
from selective_amnesia.errors import AmnesiaError


def expand_templates(words: list[str], templates: str | Path | None = None) -> list[str]:
    """Every template line (one ``{}`` each) filled with every word: the forgetting defences' expansion
    (``defences.template_prompts``), so an attack asks in exactly the words a defended run trained on."""
    from selective_amnesia.core.defences import read_templates, template_prompts

    words = [w.strip() for w in words]
    if any(not w for w in words):
        raise AmnesiaError("--concept-words must not be empty")
    return template_prompts(read_templates(templates), words)


def paraphrase_prompts(prompts_file: str | None, words: list[str], templates: str | None = None) -> list[str]:
    """The file's prompts, then the template expansion of ``words``; duplicates dropped."""
    from selective_amnesia.pipeline.t2i import read_prompts

    prompts = read_prompts(prompts_file) if prompts_file else []
    if words:
        prompts += expand_templates(words, templates)
    elif templates:
        raise AmnesiaError("--templates needs --concept-words: the words to fill the templates with")
    if not prompts:
        raise AmnesiaError("no prompts: pass --prompts FILE and/or --concept-words WORD ...")
    return list(dict.fromkeys(prompts))


def paraphrase_attack(prompts: list[str], settings: dict[str, Any]) -> AttackOutput:
    """Nothing to optimise: every prompt is a condition of the attack."""
    return AttackOutput(
        attack="paraphrase",
        conditions=list(prompts),
        roles=["attack"] * len(prompts),
        settings=settings,
    )
