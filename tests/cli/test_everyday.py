"""The everyday path (issue 15): evaluate against the model's own settings, the user cache, image outputs,
help and start-up, --force, progress, the report, reruns. CLI tests run the real entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selective_amnesia.cli import main

REPO = Path(__file__).resolve().parents[2]
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
    from selective_amnesia.config import load_config, to_dict
    from tests.conftest import tiny_ddpm

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


# ---- sample: folders of PNGs, grids, one layout ---------------------------------------------------


def test_sample_writes_a_png_folder_and_a_grid(tiny_run: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    model = str(tiny_run / "forget")
    common = ["sample", "--model", model, "--labels", "0,3", "--num_images_per_prompt", "3", "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "s.npz")]) == 0
    assert main([*common, "--out", str(tmp_path / "pngs") + "/"]) == 0
    labels = json.loads((tmp_path / "pngs" / "labels.json").read_text())
    assert labels == {f"{c}_{i:05d}.png": c for c in (0, 3) for i in range(3)}
    with np.load(tmp_path / "s.npz") as z:  # the folder holds exactly the .npz's images
        for k, name in enumerate(sorted(labels, key=lambda n: (labels[n], n))):
            png = np.asarray(Image.open(tmp_path / "pngs" / name))
            np.testing.assert_array_equal(png, z["images"][k][:, :, 0])
    assert main([*common, "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height >= 2 * 28 and grid.width > 3 * 28  # two labelled rows of three
    # an existing output is refused without --force, and says how
    assert main([*common, "--out", str(tmp_path / "grid.png")]) == 2
    assert main([*common, "--out", str(tmp_path / "grid.png"), "--force"]) == 0


def test_python_api_and_cli_agree_on_the_layout(tiny_run: Path, tmp_path: Path) -> None:
    import numpy as np

    from selective_amnesia.core.sampling import sample_per_label
    from selective_amnesia.io.images import as_uint8_nhwc
    from selective_amnesia.models import load_model

    model = load_model(tiny_run / "forget")
    x, _ = sample_per_label(model, [3], 2, seed=4, progress=False)
    out = tmp_path / "s.npz"
    args = ["--labels", "3", "--num-per-label", "2", "--seed", "4"]
    assert main(["sample", "--model", str(tiny_run / "forget"), *args, "--out", str(out)]) == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(as_uint8_nhwc(model, x), z["images"])


def test_sample_checks_arguments_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import tiny_ddpm

    tiny_ddpm().save_pretrained(tmp_path / "d")

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("selective_amnesia.models.load_model", no_load)
    out = str(tmp_path / "s.npz")
    assert main(["sample", "--model", str(tmp_path / "d"), "--out", out]) == 2  # no --labels
    assert main(["sample", "--model", str(tmp_path / "d"), "--labels", "x", "--out", out]) == 2
    assert (
        main(["sample", "--model", str(tmp_path / "d"), "--labels", "1", "--out", str(tmp_path / "s.gif")])
        == 2
    )


# ---- help, version, config show, -v/-q, --device ----------------------------------------------------


def _amnesia(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "amnesia"  # the console script itself
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_help_has_examples_and_no_none_defaults() -> None:
    from selective_amnesia.cli.app import EXAMPLES, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        text = p.format_help()
        assert "(default: None)" not in text, name
        if name in EXAMPLES:
            assert "examples:" in text, name
        for action in p._actions:
            assert (action.help or "").count("default") <= 1, (name, action.dest)
    assert "--num_inference_steps" in sub.choices["sample"].format_help()  # type: ignore[union-attr]


def test_version_bare_and_fast_help() -> None:
    import time

    r = _amnesia("--version")
    assert r.returncode == 0 and "0.1" in r.stdout
    bare = _amnesia()
    assert bare.returncode == 0 and "first five minutes" in bare.stdout and "COMMAND" in bare.stdout
    # --help imports neither torch nor diffusers
    code = "import sys; from selective_amnesia.cli.app import build_parser; build_parser(''); "
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout
    start = time.perf_counter()
    assert _amnesia("--help").returncode == 0
    assert time.perf_counter() - start < 5  # 0.1 s here; a loose bound for a loaded CI machine


def test_config_show_needs_no_out_and_hides_other_families(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert "forget.ewc_lambda" in text and "float" in text and "ddpm:" not in text and "t2i:" not in text
    assert main(["config", "show", str(DDPM_TINY), "forget.forget_label=3", "--keys"]) == 0
    text = capsys.readouterr().out
    assert "model.ddpm.num_train_timesteps" in text and "model.hidden_dims" not in text
    assert main(["run", "--dry-run", str(TINY_CONFIG)]) == 0  # no --out needed to look
    assert "t2i:" not in capsys.readouterr().out


def test_verbosity_and_device_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "-q", "--keys"]) == 0
    assert main(["-v", "run", "--dry-run", "-q", "--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().out
    from selective_amnesia.cli.app import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("run", "pretrain", "fisher", "forget", "sample", "evaluate"):
        text = sub.choices[name].format_help()  # type: ignore[union-attr]
        assert "--device" in text and "--force" in text and "-q" in text, name


# ---- stage headers and reruns ---------------------------------------------------------------------


def test_run_prints_stage_headers_and_a_rerun_says_what_is_reused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "r")
    assert main(["run", str(TINY_CONFIG), "--out", out]) == 0
    err = capfd.readouterr().err
    assert "[1/5] evaluation classifiers" in err and "[3/5] Fisher (300 samples)" in err
    assert "[5/5] evaluation" in err
    assert main(["run", str(TINY_CONFIG), "--out", out]) == 0  # the same settings: reused, no question
    capfd.readouterr()
    changed = ["run", str(TINY_CONFIG), "--out", out, "forget.steps=5"]
    assert main(changed) == 2  # a finished run with other settings is not replaced silently
    err = capfd.readouterr().err
    assert "forget.steps: 20 -> 5" in err and "reused: base model, Fisher" in err and "--force" in err
    assert main([*changed, "--force", "-q"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["forget"]["steps"] == 5
    assert main(["-q", "run", str(TINY_CONFIG), "--out", out, "forget.steps=5"]) == 0
    assert "[1/5]" not in capfd.readouterr().err  # -q: no headers


# ---- the report -----------------------------------------------------------------------------------


def test_report_is_self_contained_with_metrics_apart_from_metadata(tiny_run: Path) -> None:
    text = (tiny_run / "report.html").read_text()
    assert "data:image/png;base64," in text and 'src="samples_base.png"' not in text
    assert "How the metrics were measured" in text and "Evaluation classifiers used" in text
    other = text.split("<h3>Other metrics</h3>")[1].split("<h3>")[0] if "Other metrics" in text else ""
    assert "num_forget_samples" not in other and "feature_extractor" not in other
    report = json.loads((tiny_run / "report.json").read_text())
    t = report["timings"]
    assert t["wall_with_waits_s"] >= t["wall_s"]
    assert report["classifiers"][0]["recipe_hash"] in text


def test_loss_plot_is_linear_with_a_moving_average(tmp_path: Path) -> None:
    import numpy as np

    from selective_amnesia.evaluate.report import plot_losses, smoothed

    values = np.array([1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0] * 3)
    s = smoothed(values, 3)
    assert s.shape == values.shape and np.all(np.abs(s[1:-1] - 5 / 3) < 0.7)
    plot_losses({"total": values.tolist()}, list(range(values.size)), tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 0


# ---- Hub ids from the user's Hugging Face cache -------------------------------------------------------


def test_a_hub_id_is_resolved_offline_from_the_hf_cache(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from selective_amnesia.cli.app import resolve_model

    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--tiny-sd"
    shutil.copytree(tiny_sd, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model("tiny-org/tiny-sd")) == repo / "snapshots" / "0123abcd"
    out = tmp_path / "s.npz"
    argv = [
        "sample",
        "--model",
        "tiny-org/tiny-sd",
        "--prompt",
        "a cat",
        "--num-per-label",
        "1",
        "--out",
        str(out),
    ]
    assert main([*argv, "--num_inference_steps", "2", "-q"]) == 0
    with np.load(out) as z:
        assert z["images"].shape[0] == 1
    # t2i.model takes one too; an id that is not cached says what to do
    assert main(["config", "show", "--keys", "t2i.model=tiny-org/tiny-sd"]) == 0
    assert (
        main(["sample", "--model", "nobody/nothing", "--prompt", "a", "--out", str(tmp_path / "n.npz")]) == 2
    )


# ---- finished models and text-to-image runs are not replaced silently ------------------------------


def test_pretrain_over_a_finished_model_with_other_settings_needs_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "base")
    args = ["pretrain", str(TINY_CONFIG), "--out", out, "pretrain.steps=5"]
    assert main(args) == 0
    assert main(args) == 0  # the same settings: fine (resumes, or redoes the same thing)
    capsys.readouterr()
    assert main([*args[:-1], "pretrain.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "other settings (sections: pretrain)" in err and "--force" in err
    assert main([*args[:-1], "pretrain.steps=6", "--force"]) == 0
    # a model written before a config key existed (here: pretrain.exclude_labels, at its default) is
    # still made with the same settings
    meta_path = Path(out) / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["run_config"]["pretrain"]["exclude_labels"]
    meta_path.write_text(json.dumps(meta))
    assert main([*args[:-1], "pretrain.steps=6"]) == 0


def test_a_finished_text_to_image_run_with_other_settings_needs_force(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "run")
    fast = [
        f"t2i.model={tiny_world}", "progress=false", "t2i.surrogate_count=2", "t2i.replay_per_prompt=1",
        "t2i.retention_per_prompt=0", "fisher.estimator=subsampled", "fisher.timesteps_per_sample=2",
        "fisher.num_samples=1", "forget.batch_size=2",
    ]  # fmt: skip
    config = str(REPO / "configs" / "t2i_mnist.yaml")
    assert main(["run", config, "--out", out, *fast, "forget.steps=1"]) == 0
    capsys.readouterr()
    assert main(["run", config, "--out", out, *fast, "forget.steps=2"]) == 2
    assert "sections: forget" in capsys.readouterr().err
    assert main(["run", config, "--out", out, *fast, "forget.steps=2", "--force"]) == 0
