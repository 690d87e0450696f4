"""Every concept after every step in the MNIST text-to-image world (``worlds.mnist_t2i``).

The world's concepts are digits, so its images can be judged: each ``t2i.concepts`` group names a digit
(by its name or one of its ``concept_words``: "seven" or "7"), and every other digit is kept. For each
model theta_0 .. theta_K, ``evaluate.num_per_class`` images of each concept are drawn, spread evenly over
its prompts (a group: its forget prompts, the ones used while forgetting; a kept digit: the world's
eight training captions of it), seeded per (seed, prompt, index) as ``amnesia sample --seed`` and the
benchmarks do. The MNIST judges (trained on the 28 -> 16 -> 28 px round trip, their probabilities
averaged, as ``benchmarks/t2i_robust.py`` and the ``digit:D`` detector) give each image a digit; "as
itself" is the fraction whose digit is the concept's. For a group forgotten by step k that is how often
it is still (or again: rebound) drawn; for a kept digit it is its accuracy (a fall is drift).

The result has the shape of the class families' ``sequence`` section (``evaluate.concepts``), keyed by
group names and kept digits ("0".."9"); there is no FID here (``kept_fid`` is None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from selective_amnesia.config import ConceptGroup, RunConfig

if TYPE_CHECKING:
    from selective_amnesia.models.text_to_image import TextToImageModel

JUDGE = (
    "fraction of a concept's images (a group: its forget prompts; a kept digit: the world's captions of "
    "it) whose digit, by the MNIST judges' averaged probabilities (argmax), is the concept's"
)


def is_mnist_world(model_dir: str | Path) -> bool:
    """A pipeline built by ``python -m selective_amnesia.worlds.mnist_t2i`` (it writes world.json)."""
    return (Path(model_dir) / "world.json").is_file()


def group_digit(group: ConceptGroup) -> int | None:
    """The digit a group names: its name or a concept word, as a word ("seven") or a numeral ("7")."""
    from selective_amnesia.worlds.mnist_t2i import WORDS

    for word in [group.name, *group.concept_words]:
        w = word.strip().lower()
        if w in WORDS:
            return WORDS.index(w)
        if len(w) == 1 and w.isdigit():
            return int(w)
    return None


def world_digits(model_dir: str | Path, groups: Sequence[ConceptGroup]) -> tuple[dict[str, int] | None, str]:
    """Each group's digit when the run's model is the MNIST world and every group names a different
    digit; else None and why the concepts cannot be judged."""
    if not is_mnist_world(model_dir):
        return None, "t2i.model is not the MNIST text-to-image world (no world.json): no judge of its images"
    digits = {g.name: group_digit(g) for g in groups}
    unnamed = [n for n, d in digits.items() if d is None]
    if unnamed:
        return None, f"group {unnamed[0]!r} names no digit (by its name or concept_words)"
    values = list(digits.values())
    if len(set(values)) < len(values):
        return None, "two groups name the same digit"
    return {n: int(d) for n, d in digits.items() if d is not None}, ""


def load_judges(cfg: RunConfig, image_size: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """The run's classifier recipe and seeds on MNIST at the world's image size (the 16 px round trip):
    from the cache, packaged with the project, or trained on first use."""
    from selective_amnesia.config import to_dict
    from selective_amnesia.evaluate.cache import resolve_cache_dir
    from selective_amnesia.evaluate.classifier import ClassifierRecipe, load_or_train_classifier

    c = cfg.classifier
    recipe = ClassifierRecipe(**{k: v for k, v in to_dict(c).items() if k not in ("seeds", "cache_dir")})
    cache = resolve_cache_dir(c.cache_dir)
    found = [
        load_or_train_classifier(recipe, cache, s, "mnist", progress=cfg.progress, image_size=image_size)
        for s in c.seeds
    ]
    return [m for m, _ in found], [i for _, i in found]


@torch.no_grad()
def judge_prompts(
    model: TextToImageModel,
    judges: list[Any],
    digit: int,
    prompts: list[str],
    n: int,
    seed: int,
    cache_dir: Path | None,
) -> dict[str, float]:
    """At least ``n`` images spread evenly over ``prompts``: fraction judged ``digit`` and mean P(digit)."""
    from selective_amnesia.evaluate.assess import for_classifier
    from selective_amnesia.pipeline.t2i import prompt_latents

    per = -(-n // len(prompts))
    z, _ = prompt_latents(model, prompts, per, seed, cache_dir)
    images = model.to_uint8(z)
    probs = torch.stack([j.predict_proba(for_classifier(images, j)) for j in judges]).mean(0)
    return {
        "as_itself": float((probs.argmax(1) == digit).double().mean()),
        "p_itself": float(probs[:, digit].double().mean()),
    }


def concepts_table(
    models: Sequence[Callable[[], Any]],
    steps: list[list[str]],
    groups: Sequence[ConceptGroup],
    digits: dict[str, int],
    judges: list[Any],
    *,
    num_per_class: int,
    seed: int,
    cache_root: Path | None = None,
) -> dict[str, Any]:
    """The concept x step table: ``models[k]()`` loads theta_k (0 the base), ``steps[k-1]`` the groups
    step k forgot (one step for a run that forgets its groups at once)."""
    from selective_amnesia.worlds.mnist_t2i import captions

    kept = [d for d in range(10) if d not in digits.values()]
    rows: dict[str, tuple[int, list[str]]] = {
        g.name: (digits[g.name], list(g.forget_prompts)) for g in groups
    }
    rows |= {str(d): (d, captions(d)) for d in kept}
    kept_keys = [str(d) for d in kept]
    columns = []
    for k, load in enumerate(models):
        model = load()
        cache = cache_root / str(k) if cache_root is not None else None
        measured = {
            key: judge_prompts(model, judges, digit, prompts, num_per_class, seed, cache)
            for key, (digit, prompts) in rows.items()
        }
        del model
        forgotten = [n for s in steps[:k] for n in s]
        rate = {key: m["as_itself"] for key, m in measured.items()}
        columns.append(
            {
                "step": k,
                "forgotten_so_far": forgotten,
                "as_itself": rate,
                "p_itself": {key: m["p_itself"] for key, m in measured.items()},
                "forgotten_max_as_itself": max((rate[n] for n in forgotten), default=None),
                "kept_accuracy": sum(rate[key] for key in kept_keys) / len(kept_keys) if kept_keys else None,
                "kept_fid": None,
            }
        )
    return {
        "classes": list(rows),
        "kept": kept_keys,
        "forgotten_at_step": {n: k for k, s in enumerate(steps, start=1) for n in s},
        "digits": {key: digit for key, (digit, _) in rows.items()},
        "prompts": {key: prompts for key, (_, prompts) in rows.items()},
        "num_per_class": num_per_class,
        "seed": seed,
        "judge": JUDGE,
        "columns": columns,
    }
