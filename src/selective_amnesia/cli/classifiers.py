"""``amnesia classifiers``: the evaluation classifiers (judges) that ship with the package.

Without options it lists them (dataset, recipe hash, seed, test accuracy, whether the file's sha256 is the
manifest's). ``--retrain`` trains a config's judges again from their recipe, into a temporary folder (or
``--out DIR``, in the cache format), and compares each with the packaged one on the test set: the
accuracy of both and how often their argmax agrees.

Only argparse at import time: the parser of ``amnesia`` must not import torch (``cli/app.py``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_amnesia.errors import AmnesiaError

if TYPE_CHECKING:
    from torch import Tensor

    from selective_amnesia.data import ImageDataset
    from selective_amnesia.evaluate.classifier import ClassifierRecipe, MNISTClassifier


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the config's judges again from their recipe and compare them with the packaged ones "
        "(minutes per seed on a CPU)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="--retrain: the config whose classifier recipe and data to use (default: the MNIST CVAE "
        "pipeline's; a text-to-image config: the MNIST world's 16 px judges)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="--retrain: comma-separated seeds (default: the config's classifier.seeds)",
    )
    p.add_argument(
        "--out",
        dest="retrain_dir",
        default=None,
        metavar="DIR",
        help="--retrain: keep the retrained judges in this folder (default: a temporary one, removed after)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise AmnesiaError(f"--seeds must be comma-separated integers like 0,1, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise AmnesiaError(f"--seeds needs one or more seeds >= 0, got {text!r}")
    return seeds


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_classifiers(args: argparse.Namespace) -> int:
    if args.retrain:
        return _retrain(args)
    unused = [
        f for f, v in (("--config", args.config), ("--seeds", args.seeds), ("--out", args.retrain_dir)) if v
    ]
    if unused:
        raise AmnesiaError(
            f"{', '.join(unused)}: only with --retrain (without it the packaged judges are listed)"
        )
    return _list()


def _list() -> int:
    from selective_amnesia.evaluate import packaged
    from selective_amnesia.evaluate.cache import user_cache_dir

    judges = packaged.read_manifest()
    where = packaged.judges_dir()
    if not judges:
        raise AmnesiaError(
            f"no packaged judges in {where} (no {packaged.MANIFEST}): reinstall selective-amnesia"
        )
    rows, bad, shadowed = [], [], []
    cache = user_cache_dir()
    for j in judges:
        problem = packaged.verify(j)
        if problem is not None:
            bad.append(problem)
        if (cache / j.file).exists():
            shadowed.append(j.file)
        rows.append(
            [
                j.dataset,
                j.recipe_hash,
                str(j.seed),
                f"{j.test_accuracy:.4f}",
                "ok" if problem is None else "MISMATCH",
            ]
        )
    print(f"packaged judges ({where}):")
    print(_table(["dataset", "recipe", "seed", "test acc", "sha256"], rows))
    if shadowed:
        print(f"your cache {cache} has its own copy of {len(shadowed)} of them, which is used instead")
    print("other recipes and seeds are trained on first use and cached; --retrain compares with a retraining")
    if bad:
        raise AmnesiaError(f"{bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return 0


def _target(cfg: Any) -> tuple[str, int | None]:
    """(dataset, image size) of a config's judges. A text-to-image config judges the MNIST world's digits
    with the 16 px judges (``attacks.detectors.digit_judges``, ``benchmarks/t2i_mnist_result.py``)."""
    from selective_amnesia.families import get_family

    judges = get_family(cfg.model.family).judges
    return judges if judges is not None else (cfg.data.dataset, cfg.data.image_size)


def _retrain(args: argparse.Namespace) -> int:
    from selective_amnesia.config import load_config, to_dict
    from selective_amnesia.evaluate.classifier import (
        ClassifierRecipe,
        classifier_cache_path,
        judged_name,
        judged_split,
        train_and_save_classifier,
    )
    from selective_amnesia.progress import note

    cfg = load_config(args.config, [])
    c = to_dict(cfg.classifier)
    recipe = ClassifierRecipe(**{k: v for k, v in c.items() if k not in ("seeds", "cache_dir")})
    dataset, image_size = _target(cfg)
    name = judged_name(dataset, image_size)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else list(c["seeds"])
    out, holder = _retrain_dir(args.retrain_dir, recipe, seeds, name)
    quiet = bool(getattr(args, "quiet", False))
    progress = not (quiet or args.no_progress)
    test = judged_split(dataset, "test", cfg.data.root, image_size)
    rows = []
    try:
        for seed in seeds:
            note(f"retraining {name} judge, recipe {recipe.fingerprint()}, seed {seed} -> {out}")
            model, info = train_and_save_classifier(
                recipe,
                classifier_cache_path(out, recipe, seed, name),
                seed,
                dataset,
                cfg.data.root,
                progress,
                image_size,
            )
            new_pred = model.predict_proba(test.images).argmax(1)
            packaged_acc, agree, bitwise = _compare_with_packaged(name, recipe, seed, model, new_pred, test)
            retrained_acc, seconds = f"{info['test_accuracy']:.4f}", f"{info['train_seconds']:.0f}"
            rows.append(
                [name, recipe.fingerprint(), str(seed), packaged_acc, retrained_acc, agree, bitwise, seconds]
            )
    finally:
        if holder is not None:
            holder.cleanup()
    print(f"retrained from the recipe ({len(test)} test images{'' if holder else f'; kept in {out}'}):")
    header = [
        "dataset",
        "recipe",
        "seed",
        "packaged acc",
        "retrained acc",
        "argmax agree",
        "bitwise",
        "train s",
    ]
    print(_table(header, rows))
    return 0


def _retrain_dir(retrain_dir: str | None, recipe: Any, seeds: list[int], name: str) -> tuple[Path, Any]:
    """Where the retrained judges go: (folder, None) for --out DIR, refused where one of them would
    overwrite a file; else (a temporary folder, its holder, to be cleaned up)."""
    from selective_amnesia.evaluate.classifier import classifier_cache_path

    if retrain_dir is None:
        holder = tempfile.TemporaryDirectory(prefix="amnesia-judges-")
        return Path(holder.name), holder
    out = Path(retrain_dir)
    if out.exists() and not out.is_dir():
        raise AmnesiaError(f"--out {out} is a file: name a folder for the retrained judges")
    for seed in seeds:
        if (there := classifier_cache_path(out, recipe, seed, name)).exists():
            raise AmnesiaError(f"{there} exists: remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def _compare_with_packaged(
    name: str,
    recipe: ClassifierRecipe,
    seed: int,
    model: MNISTClassifier,
    new_pred: Tensor,
    test: ImageDataset,
) -> tuple[str, str, str]:
    """The packaged judge of this recipe and seed against the retrained one: (its test accuracy, how often
    their argmax agrees, whether the weights are bitwise equal); "-" where there is none to compare."""
    from selective_amnesia.evaluate import packaged
    from selective_amnesia.evaluate.classifier import classifier_accuracy, load_packaged_classifier
    from selective_amnesia.progress import note

    judge = packaged.find_packaged(name, recipe.fingerprint(), seed)
    if judge is None:
        return "not packaged", "-", "-"
    if (problem := packaged.verify(judge)) is not None:
        note(problem)
        return "sha256 MISMATCH", "-", "-"
    loaded = load_packaged_classifier(recipe, seed, name)
    if loaded is None:
        raise AmnesiaError(f"{judge.path} could not be loaded (see the warning above)")
    old = loaded[0]
    old_pred = old.predict_proba(test.images).argmax(1)
    accuracy = f"{classifier_accuracy(old, test):.4f}"
    agree = f"{float((old_pred == new_pred).double().mean()):.2%}"
    theirs = old.state_dict()
    same = all(torch_equal(theirs[k], v) for k, v in model.state_dict().items())
    return accuracy, agree, "yes" if same else "no"


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a, b))
