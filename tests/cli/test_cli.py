"""CLI smoke tests on one tiny pipeline run, and the one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selective_amnesia.cli import main

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist_cvae_tiny.yaml"


def test_run_writes_models_report_and_pictures(tiny_run: Path) -> None:
    for name in (
        "base/config.json",
        "base/model.safetensors",
        "forget/config.json",
        "forget/model.safetensors",
        "fisher.safetensors",
        "report.json",
        "report.html",
        "samples_base.png",
        "samples_forget.png",
        "losses.png",
        "before_after.png",
        "config.json",
    ):
        assert (tiny_run / name).is_file(), name
    report = json.loads((tiny_run / "report.json").read_text())
    for model in ("base", "forget"):
        m = report["metrics"][model]
        assert 0 <= m["p_forget"] <= 1 and 0 <= m["entropy"] <= np.log(10) + 1e-9
        assert m["fid"] >= 0 and m["num_forget_samples"] == 100
    assert report["config"]["name"] == "mnist_cvae_tiny"
    assert report["environment"]["torch"].startswith("2.13")
    assert set(report["loss_history"]["terms"]) == {"total", "forget", "replay", "ewc"}
    assert {"pretrain_s", "fisher_s", "forget_s", "evaluate_s", "total_s"} <= set(report["timings"])
    saved = json.loads((tiny_run / "forget" / "config.json").read_text())
    assert saved["run_config"]["forget"]["forget_label"] == 0  # the resolved config travels with the model


def _sample(model: Path, labels: str, out: Path, *extra: str) -> int:
    args = [
        *extra,
        "--model",
        str(model),
        "--labels",
        labels,
        "--num-per-label",
        "5",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    return main(["sample", *args])


def test_sample_writes_the_interchange_format(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    assert _sample(tiny_run / "forget", "0,3", out) == 0
    with np.load(out) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (10, 28, 28, 1)
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0] * 5 + [3] * 5
        first = z["images"].copy()
    # per-label seeding: label 3's images do not depend on what else was sampled
    assert _sample(tiny_run / "forget", "3", out) == 2  # an existing output is kept without --force
    assert _sample(tiny_run / "forget", "3", out, "--force") == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(z["images"], first[5:])


def test_dry_run_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(TINY_CONFIG), "--out", "unused", "--dry-run", "forget.ewc_lambda=7"]) == 0
    assert "ewc_lambda: 7.0" in capsys.readouterr().out


def test_fisher_forget_and_evaluate_commands(tiny_run: Path, tmp_path: Path) -> None:
    cache = json.loads((tiny_run / "report.json").read_text())["config"]["classifier"]["cache_dir"]
    base = str(tiny_run / "base")
    common = [str(TINY_CONFIG)]
    assert main(["fisher", "--model", base, "--out", str(tmp_path / "f.safetensors"), *common]) == 0
    assert (
        main(
            [
                "forget",
                "--model",
                base,
                "--fisher",
                str(tmp_path / "f.safetensors"),
                "--out",
                str(tmp_path / "fg"),
                *common,
                "forget.steps=3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "fg"),
                "--out",
                str(tmp_path / "e.json"),
                *common,
                f"classifier.cache_dir={cache}",
            ]
        )
        == 0
    )
    assert "p_forget" in json.loads((tmp_path / "e.json").read_text())["metrics"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selective_amnesia.cli", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--model", "{run}/forget", "--labels", "12", "--out", "{tmp}/x.npz"], "unknown label"),
        (["sample", "--model", "{run}/forget", "--labels", "a,b", "--out", "{tmp}/x.npz"], "comma-separated"),
        (["sample", "--model", "{tmp}/nope", "--labels", "1", "--out", "{tmp}/x.npz"], "not found"),
        (["sample", "--model", "{run}/forget", "--labels", "1", "--out", "{tmp}/x.txt"], ".npz"),
        (["run", "{tmp}/missing.yaml", "--out", "{tmp}/r"], "config file"),
        (["run", "--out", "{tmp}/r", "forget.ewc_lambda=-3"], "ewc_lambda"),
        (
            ["forget", "--model", "{run}/base", "--fisher", "{tmp}/corrupt.safetensors", "--out", "{tmp}/o"],
            "safetensors",
        ),
        (
            [
                "forget",
                "--model",
                "{run}/base",
                "--fisher",
                "{tmp}/other.safetensors",
                "--out",
                "{tmp}/o",
                str(TINY_CONFIG),
            ],
            "does not match",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    tiny_run: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    from selective_amnesia.core.fisher import estimate_fisher
    from selective_amnesia.models import build_model

    other = build_model("cvae", hidden_dims=[8], latent_dim=2)
    estimate_fisher(other, num_samples=4, labels=list(range(10)), progress=False).save(
        tmp_path / "other.safetensors"
    )
    result = _cli(*[a.format(run=tiny_run, tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0]
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "o").exists()
