"""``amnesia classifiers``: the evaluation classifiers (judges) that ship with the package.

Without options it lists them (dataset, recipe hash, seed, test accuracy, whether the file's sha256 is the
manifest's). ``--retrain`` trains a config's judges again from their recipe, into a temporary folder (or
``--out DIR``, in the cache format), and compares each with the packaged one on the test set: the
accuracy of both and how often their argmax agrees.

Only argparse at import time: the parser of ``amnesia`` must not import torch (``cli.py``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from selective_amnesia.errors import AmnesiaError


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
    from selective_amnesia.evaluate import packaged
    from selective_amnesia.evaluate.classifier import (
        ClassifierRecipe,
        classifier_accuracy,
        classifier_cache_path,
        judged_name,
        judged_split,
        load_packaged_classifier,
        train_and_save_classifier,
    )
    from selective_amnesia.progress import note

    cfg = load_config(args.config, [])
    c = to_dict(cfg.classifier)
    recipe = ClassifierRecipe(**{k: v for k, v in c.items() if k not in ("seeds", "cache_dir")})
    dataset, image_size = _target(cfg)
    name = judged_name(dataset, image_size)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else list(c["seeds"])
    if args.retrain_dir is not None:
        out = Path(args.retrain_dir)
        if out.exists() and not out.is_dir():
            raise AmnesiaError(f"--out {out} is a file: name a folder for the retrained judges")
        for seed in seeds:
            if (there := classifier_cache_path(out, recipe, seed, name)).exists():
                raise AmnesiaError(f"{there} exists: remove it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        holder: Any = None
    else:
        holder = tempfile.TemporaryDirectory(prefix="amnesia-judges-")
        out = Path(holder.name)
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
            row = [name, recipe.fingerprint(), str(seed), "-", f"{info['test_accuracy']:.4f}", "-", "-"]
            judge = packaged.find_packaged(name, recipe.fingerprint(), seed)
            if judge is None:
                row[3] = "not packaged"
            elif (problem := packaged.verify(judge)) is not None:
                row[3] = "sha256 MISMATCH"
                note(problem)
            else:
                loaded = load_packaged_classifier(recipe, seed, name)
                if loaded is None:
                    raise AmnesiaError(f"{judge.path} could not be loaded (see the warning above)")
                old = loaded[0]
                old_pred = old.predict_proba(test.images).argmax(1)
                row[3] = f"{classifier_accuracy(old, test):.4f}"
                row[5] = f"{float((old_pred == new_pred).double().mean()):.2%}"
                theirs = old.state_dict()
                same = all(torch_equal(theirs[k], v) for k, v in model.state_dict().items())
                row[6] = "yes" if same else "no"
            row.append(f"{info['train_seconds']:.0f}")
            rows.append(row)
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


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a, b))
