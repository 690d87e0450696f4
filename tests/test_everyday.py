"""The everyday path (issue 15): evaluate against the model's own settings, the user cache, image outputs,
help and start-up, --force, progress, the report, reruns. CLI tests run the real entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selective_amnesia.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "mnist_cvae_tiny.yaml"
DDPM_TINY = REPO / "configs" / "ddpm_mnist_tiny.yaml"


def _with_run_config(model: Path, dest: Path, **changes: object) -> Path:
    """A copy of a model directory whose stored run config has ``changes`` (dotted keys)."""
    shutil.copytree(model, dest)
    meta = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        node = meta["run_config"]
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (dest / "config.json").write_text(json.dumps(meta))
    return dest


# ---- evaluate reads the model's own config --------------------------------------------------------


def test_evaluate_cvae_uses_the_models_forget_label(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f3 = _with_run_config(tiny_run / "forget", tmp_path / "f3", **{"forget.forget_label": 3})
    out = tmp_path / "m3.json"
    # no config argument: the model's tiny classifier recipe and sample counts, its class 3
    assert main(["evaluate", "--model", str(f3), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["forget_label"] == 3 and result["config"]["forget"]["forget_label"] == 3
    assert result["config"]["classifier"]["max_train_images"] == 1000  # not the default recipe
    assert result["metrics"]["num_forget_samples"] == 100
    assert "forget.forget_label=3" in capsys.readouterr().out
    # a config file that does not name the label keeps the model's
    out2 = tmp_path / "m3b.json"
    assert main(["evaluate", "--model", str(f3), "--out", str(out2), str(TINY_CONFIG)]) == 0
    assert json.loads(out2.read_text())["forget_label"] == 3


def test_evaluate_refuses_a_config_naming_another_label(tiny_run: Path, tmp_path: Path) -> None:
    f3 = _with_run_config(tiny_run / "forget", tmp_path / "f3", **{"forget.forget_label": 3})
    out = tmp_path / "m.json"
    code = main(["evaluate", "--model", str(f3), "--out", str(out), "forget.forget_label=5"])
    assert code == 2 and not out.exists()


def test_evaluate_mismatch_message_names_both_values(tiny_run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    f3 = _with_run_config(tiny_run / "forget", tmp_path / "f3", **{"forget.forget_label": 3})
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "selective_amnesia.cli",
            "evaluate",
            "--model",
            str(f3),
            "--out",
            str(tmp_path / "m.json"),
            "forget.forget_label=5",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "forget.forget_label" in line and "5" in line and "3" in line and "\n" not in line


def test_evaluate_ddpm_uses_the_models_config(tmp_path: Path) -> None:
    from conftest import tiny_ddpm

    from selective_amnesia.config import load_config, to_dict

    model = tiny_ddpm(num_train_timesteps=10, num_classes=10)
    cfg = load_config(DDPM_TINY, ["forget.forget_label=2", "evaluate.num_forget_samples=4"])
    model.save_pretrained(tmp_path / "d", extra={"run_config": to_dict(cfg)})
    out = tmp_path / "d.json"
    assert main(["evaluate", "--model", str(tmp_path / "d"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["forget_label"] == 2 and result["config"]["data"]["image_size"] == 8
    assert result["metrics"]["num_forget_samples"] == 4
    bad = main(
        ["evaluate", "--model", str(tmp_path / "d"), "--out", str(tmp_path / "e.json"), "data.image_size=16"]
    )
    assert bad == 2 and not (tmp_path / "e.json").exists()


def test_evaluate_text_to_image_checks_the_models_concept(tiny_sd: Path, tmp_path: Path) -> None:
    from selective_amnesia.config import load_config, to_dict
    from selective_amnesia.evaluate.settings import evaluation_overrides

    model = tmp_path / "sd"
    shutil.copytree(tiny_sd, model)
    index = json.loads((model / "model_index.json").read_text())
    cfg = load_config(
        None, ["model.family=text_to_image", "fisher.estimator=subsampled", "t2i.forget_prompts=[a cat]"]
    )
    index["_selective_amnesia"] = {"run_config": to_dict(cfg)}
    (model / "model_index.json").write_text(json.dumps(index))
    overrides, taken = evaluation_overrides(model, None, [])
    assert taken["t2i.forget_prompts"] == ["a cat"]
    out = tmp_path / "n.json"
    code = main(["evaluate", "--model", str(model), "--out", str(out), "t2i.forget_prompts=[a dog]"])
    assert code == 2 and not out.exists()


# ---- the user cache -------------------------------------------------------------------------------


def test_classifier_cache_defaults_to_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from selective_amnesia.config import load_config
    from selective_amnesia.evaluate.cache import user_cache_dir

    monkeypatch.setenv("SELECTIVE_AMNESIA_CACHE", str(tmp_path / "c"))
    assert user_cache_dir() == tmp_path / "c"
    assert load_config(TINY_CONFIG).classifier.cache_dir == str(tmp_path / "c")
    # an explicit setting still wins
    assert load_config(TINY_CONFIG, ["classifier.cache_dir=elsewhere"]).classifier.cache_dir == "elsewhere"
    monkeypatch.delenv("SELECTIVE_AMNESIA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir().name == "selective-amnesia"


def test_a_run_from_another_directory_reuses_the_user_cache(
    user_cache: Path,
    tiny_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "e.json"
    assert main(["evaluate", "--model", str(tiny_run / "forget"), "--out", str(out)]) == 0
    classifiers = json.loads(out.read_text())["classifiers"]
    first = classifiers[0]
    assert Path(first["path"]).parent == user_cache and first["recipe_hash"] in first["path"]
    assert not (tmp_path / "runs").exists()  # nothing in the current directory
    # started elsewhere, the same classifier is found, not retrained
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert main(["evaluate", "--model", str(tiny_run / "forget"), "--out", str(tmp_path / "e2.json")]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["classifiers"][0]["cached"] is True
