"""Judges (evaluation classifiers) shipped with the package: found, verified by sha256, refused when
edited, behind the user cache; the manifest matches the files; `amnesia classifiers` lists and retrains.

Every judge trained here is a one-epoch CNN on 256 random images (milliseconds): the tests check where
weights come from, not how good they are.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import selective_amnesia.evaluate.classifier as classifier_module
from selective_amnesia.cli import main
from selective_amnesia.cli.classifiers import _target
from selective_amnesia.config import load_config, to_dict
from selective_amnesia.data import ImageDataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate import packaged
from selective_amnesia.evaluate.classifier import (
    ClassifierRecipe,
    classifier_cache_path,
    judged_name,
    load_or_train_classifier,
    load_packaged_classifier,
    train_and_save_classifier,
)
from selective_amnesia.io.artifacts import load_tensors

REPO = Path(__file__).resolve().parents[2]
RECIPE = ClassifierRecipe(epochs=1, batch_size=64, lr=1e-3, max_train_images=256)


@pytest.fixture
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random 'MNIST' (256 train, 64 test images) in place of the real one."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> ImageDataset:
        images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        return ImageDataset(images, torch.randint(0, 10, (n,), generator=g))

    train, test = make(256), make(64)
    monkeypatch.setattr(
        classifier_module, "load_dataset", lambda name, split, root=None: train if split == "train" else test
    )


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_data: None) -> Path:
    """A packaged-judges folder with seeds 0 and 1 of RECIPE, in place of the real one."""
    folder = tmp_path / "judges"
    folder.mkdir()
    for seed in (0, 1):
        train_and_save_classifier(
            RECIPE, classifier_cache_path(folder, RECIPE, seed, "mnist"), seed, progress=False
        )
    packaged.write_manifest(folder)
    monkeypatch.setattr(packaged, "PACKAGE_DIR", folder)
    return folder


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a judge was trained")

    monkeypatch.setattr(classifier_module, "train_classifier", refuse)


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: still a valid safetensors file
    path.write_bytes(bytes(data))


def test_a_packaged_judge_is_found_verified_and_used_without_training(
    shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    cache = tmp_path / "cache"
    model, info = load_or_train_classifier(RECIPE, cache, 1, progress=False)
    path = shipped / classifier_cache_path(shipped, RECIPE, 1, "mnist").name
    assert info["source"] == "packaged" and info["cached"] is True and Path(info["path"]) == path
    assert info["sha256"] == packaged.sha256_of(path) and info["recipe_hash"] == RECIPE.fingerprint()
    assert not cache.exists()  # nothing copied into the user cache
    stored, _ = load_tensors(path)
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    assert not model.training
    # only an exact match of dataset name, recipe hash and seed
    assert packaged.find_packaged("mnist", RECIPE.fingerprint(), 1) is not None
    assert packaged.find_packaged("mnist", RECIPE.fingerprint(), 2) is None
    assert packaged.find_packaged("mnist-via16px", RECIPE.fingerprint(), 1) is None
    assert packaged.find_packaged("mnist", ClassifierRecipe(epochs=2).fingerprint(), 1) is None


def test_an_edited_packaged_judge_is_refused_and_the_judge_trained_instead(
    shipped: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = classifier_cache_path(shipped, RECIPE, 0, "mnist")
    _tamper(path)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger=classifier_module.__name__):
        _, info = load_or_train_classifier(RECIPE, cache, 0, progress=False)
    assert info["source"] == "trained" and info["cached"] is False
    assert Path(info["path"]) == classifier_cache_path(cache, RECIPE, 0, "mnist")
    assert f"packaged judge {path} has sha256" in caplog.text and "not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=classifier_module.__name__):
        _, again = load_or_train_classifier(RECIPE, cache, 0, progress=False)
    assert again["source"] == "cache" and caplog.text == ""  # said once: the cache holds it now
    path.unlink()
    assert "missing" in str(packaged.verify(packaged.find_packaged("mnist", RECIPE.fingerprint(), 0)))  # type: ignore[arg-type]


def test_the_user_cache_wins_over_the_packaged_judge(
    shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _no_training(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = classifier_cache_path(cache, RECIPE, 1, "mnist")
    shutil.copy(classifier_cache_path(shipped, RECIPE, 1, "mnist"), mine)
    _tamper(classifier_cache_path(shipped, RECIPE, 1, "mnist"))  # not even looked at
    with caplog.at_level(logging.WARNING, logger=classifier_module.__name__):
        _, info = load_or_train_classifier(RECIPE, cache, 1, progress=False)
    assert info["source"] == "cache" and Path(info["path"]) == mine and caplog.text == ""


def test_a_broken_manifest_is_an_error(tmp_path: Path) -> None:
    assert packaged.read_manifest(tmp_path) == []  # no manifest: nothing packaged
    where = tmp_path / packaged.MANIFEST
    for text in ("{not json", '{"format": "other", "judges": []}', "[]"):
        where.write_text(text)
        with pytest.raises(AmnesiaError, match="manifest|JSON"):
            packaged.read_manifest(tmp_path)
    entry = {"file": "../x.safetensors", "dataset": "mnist", "recipe_hash": "x", "seed": 0, "recipe": {}}
    entry |= {"cache_version": 2, "sha256": "0", "test_accuracy": 0.5}
    where.write_text(json.dumps({"format": packaged.FORMAT, "judges": [entry]}))
    with pytest.raises(AmnesiaError, match="not a .safetensors file beside it"):
        packaged.read_manifest(tmp_path)
    del entry["sha256"]
    entry["file"] = "x.safetensors"
    where.write_text(json.dumps({"format": packaged.FORMAT, "judges": [entry]}))
    with pytest.raises(AmnesiaError, match="invalid entry"):
        packaged.read_manifest(tmp_path)


# ---- the judges that ship ---------------------------------------------------------------------------


def test_the_manifest_matches_the_packaged_files() -> None:
    folder = packaged.judges_dir()
    raw = json.loads((folder / packaged.MANIFEST).read_text())["judges"]
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert sorted(e["file"] for e in raw) == files and len(files) == len(set(files)) > 0
    for entry in raw:  # sha256, size, recipe hash of the current code, metadata: all as the files say
        assert packaged.manifest_entry(folder / entry["file"]) == entry, entry["file"]
    assert all(packaged.verify(j) is None for j in packaged.read_manifest())


@pytest.mark.parametrize(
    "config", [None, "configs/mnist_cvae.yaml", "configs/ddpm_mnist.yaml", "configs/t2i_mnist.yaml"]
)
def test_the_committed_configs_judges_ship_with_the_package(config: str | None) -> None:
    """A recipe change (or a cache-version bump) must come with new packaged judges: retrain them with
    `amnesia classifiers --retrain --out DIR`, copy them to evaluate/judges/, rewrite the manifest."""
    cfg = load_config(REPO / config if config else None, [])
    c = to_dict(cfg.classifier)
    recipe = ClassifierRecipe(**{k: v for k, v in c.items() if k not in ("seeds", "cache_dir")})
    name = judged_name(*_target(cfg))
    for seed in c["seeds"]:
        assert packaged.find_packaged(name, recipe.fingerprint(), seed) is not None, (name, seed)
    loaded = load_packaged_classifier(recipe, c["seeds"][0], name)
    assert loaded is not None and loaded[1]["source"] == "packaged" and loaded[1]["test_accuracy"] > 0.96
    assert loaded[0].predict_proba(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


# ---- amnesia classifiers ----------------------------------------------------------------------------


def test_classifiers_lists_the_packaged_judges_and_flags_an_edited_one(
    shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["classifiers"]) == 0
    out = capsys.readouterr().out
    assert str(shipped) in out and RECIPE.fingerprint() in out and out.count(" ok") == 2
    _tamper(classifier_cache_path(shipped, RECIPE, 1, "mnist"))
    assert main(["classifiers"]) == 2
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and captured.out.count(" ok") == 1
    err = captured.err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("amnesia classifiers: error: packaged judge")
        and "sha256" in err[0]
    )
    assert main(["classifiers", "--seeds", "1"]) == 2
    assert "only with --retrain" in capsys.readouterr().err


def test_classifiers_retrain_compares_with_the_packaged_judges(
    shipped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "judges.yaml"
    recipe = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "max_train_images": 256, "seeds": [0, 1]}
    config.write_text(json.dumps({"classifier": recipe}))  # JSON is YAML
    kept = tmp_path / "kept"
    args = ["classifiers", "--retrain", "--config", str(config), "--seeds", "1,2", "--out", str(kept), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[2]: line.split() for line in out.splitlines() if line.startswith("mnist ")}
    # seed 1: the same recipe, data and code retrain it bit for bit; seed 2 is not packaged
    assert rows["1"][5:7] == ["100.00%", "yes"] and rows["1"][3] == rows["1"][4]
    assert "not packaged" in out and rows["2"][3:5] == ["not", "packaged"]
    assert classifier_cache_path(kept, RECIPE, 1, "mnist").is_file()
    assert main(args) == 2  # never overwrites a judge
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err
    assert main(["classifiers", "--retrain", "--seeds", "x"]) == 2
    assert "--seeds must be" in capsys.readouterr().err
