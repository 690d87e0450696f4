"""Issue 16: no silent overwrite, one lock per run tree, every untrusted file ends in one line.

Each case runs the real ``amnesia`` entry point (``cli.main`` in process, or the installed script in a
subprocess where a signal is involved) and checks exit status 2 and one stderr line, with every file
that existed before byte-for-byte unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from selective_amnesia.cli import main
from selective_amnesia.core.fisher import Fisher, estimate_fisher
from selective_amnesia.io import runstate
from selective_amnesia.io.artifacts import read_json
from selective_amnesia.models import build_model
from tests.conftest import TINY_CONFIG


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def refused(argv: list[str], root: Path, match: str = "") -> str:
    """``amnesia argv`` exits 2 with one line (containing ``match``); nothing under ``root`` changed."""
    before = _snapshot(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue().strip()
    assert code == 2, (argv, code, text)
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert len(text) < 2100, len(text)
    assert match in text, (match, text)
    assert _snapshot(root) == before, argv
    return text


@pytest.fixture
def work(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("cvae", hidden_dims=[16], latent_dim=2)
    model.save_pretrained(tmp_path / "model")
    estimate_fisher(model, num_samples=8, labels=list(range(10)), progress=False).save(
        tmp_path / "fisher.safetensors"
    )
    return tmp_path


@pytest.fixture
def sd_copy(tmp_path: Path, tiny_sd: Path) -> Path:
    target = tmp_path / "sd"
    shutil.copytree(tiny_sd, target)
    return target


# ---- 1. outputs that would replace what the command reads ----------------------------------------


def test_outputs_inside_their_inputs_are_refused(work: Path) -> None:
    model, fisher = work / "model", work / "fisher.safetensors"
    no = "--no-progress"
    cases = [
        ["fisher", "--model", str(model), "--out", str(model / "model.safetensors"), no],
        ["evaluate", "--model", str(model), "--out", str(model / "config.json"), no],
        ["sample", "--model", str(model), "--labels", "1", "--out", str(model / "s.npz"), no],
        ["forget", "--model", str(model), "--fisher", str(fisher), "--out", str(model / "sub"), no],
        ["run", str(TINY_CONFIG), f"pretrain.model_path={model}", "--out", str(model / "r"), no],
        ["fisher", str(TINY_CONFIG), "--model", str(model), f"fisher.path={fisher}", "--out", str(fisher)],
    ]
    for argv in cases:
        refused(argv, work, "which this command reads")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_out_through_a_dangling_symlink_creates_nothing(
    work: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (work / "link").symlink_to(elsewhere / "a" / "b" / "out")
    refused(
        ["pretrain", str(TINY_CONFIG), "--out", str(work / "link"), "--no-progress"], work, "does not exist"
    )
    refused(["pretrain", str(TINY_CONFIG), "--out", str(work / "link" / "m"), "--no-progress"], work)
    (work / "f.npz").symlink_to(elsewhere / "x" / "f.npz")
    argv = ["sample", "--model", str(work / "model"), "--labels", "1", "--out", str(work / "f.npz")]
    refused(argv, work, "does not exist")
    assert list(elsewhere.iterdir()) == []  # neither the target nor its parents


def test_out_through_a_symlink_leading_elsewhere_is_refused(
    work: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "samples.npz").write_bytes(b"someone else's file")
    (work / "s.npz").symlink_to(elsewhere / "samples.npz")
    argv = ["sample", "--model", str(work / "model"), "--labels", "1", "--out", str(work / "s.npz")]
    refused(argv, work, "outside")
    assert (elsewhere / "samples.npz").read_bytes() == b"someone else's file"
    assert (work / "s.npz").is_symlink()


# ---- 2. one lock per run tree -----------------------------------------------------------------------


def test_a_writer_inside_a_locked_tree_is_refused(work: Path) -> None:
    run = work / "run"
    with runstate.output_lock(run):
        text = refused(["pretrain", str(TINY_CONFIG), "--out", str(run / "base"), "--no-progress"], work)
        assert f"is being written by amnesia (pid {os.getpid()})" in text and "lies inside it" in text
        assert not (run / "base").exists()
        argv = ["fisher", "--model", str(work / "model"), "--out", str(run / "f.safetensors")]
        refused([*argv, "--no-progress"], work, "is being written by")
    assert not any(p.name.endswith(".lock") for p in work.rglob(".*"))


def test_a_writer_of_a_tree_holding_a_locked_output_is_refused(work: Path) -> None:
    run = work / "run"
    with runstate.output_lock(run / "base"):
        text = refused(["run", str(TINY_CONFIG), "--out", str(run), "--no-progress"], work)
        assert "is being written by amnesia (pid" in text and "contains it" in text
    assert list(run.iterdir()) == []  # the lock of run/base was released; nothing else written


# ---- 3, 4. untrusted JSON and YAML --------------------------------------------------------------------

DEEP_JSON = "[" * 5000 + "]" * 5000
BIG_INT = "1" + "0" * 5000
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
)


def test_a_billion_laughs_config_fails_fast(work: Path) -> None:
    assert len(BOMB) < 1024
    config = work / "bomb.yaml"
    for text in (BOMB, BOMB + "model: {hidden_dims: *j}\n"):
        config.write_text(text)
        start = time.perf_counter()
        refused(["run", str(config), "--out", str(work / "r"), "--dry-run"], work, "expand to more than")
        assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "text, match",
    [
        ("model:\n  hidden_dims: " + "[" * 3000 + "]" * 3000 + "\n", "YAML"),  # libyaml's own limit
        ("".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n", "nested deeper"),
        (f"seed: {BIG_INT}\n", "seed is an integer of more than 40 digits"),
        ("- 1\n- 2\n", "must contain a mapping"),
        ("forget: {lr: " + "[" * 100 + "]" * 100 + "}\n", "nested deeper"),
    ],
)
def test_run_configs_past_the_limits_fail_in_one_line(work: Path, text: str, match: str) -> None:
    (work / "c.yaml").write_text(text)
    refused(["run", str(work / "c.yaml"), "--out", str(work / "r"), "--dry-run"], work, match)


@pytest.mark.parametrize("value", [BIG_INT, "[" * 2000 + "]" * 2000, "'" + "x" * 10000 + "'"])
def test_overrides_past_the_limits_fail_in_one_line(work: Path, value: str) -> None:
    refused(["run", "--out", str(work / "r"), "--dry-run", f"forget.lr={value}"], work)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: DEEP_JSON, "nested deeper"),
        (
            lambda m: json.dumps(m).replace('"latent_dim": 2', f'"latent_dim": {BIG_INT}'),
            "latent_dim is an integer",
        ),
        (lambda m: json.dumps({**m, "hidden_dims": "16"}), "hidden_dims must be a list of integers"),
        (lambda m: json.dumps({**m, "hidden_dims": [1000000]}), "holds"),  # 1.6e9 described, 1e4 stored
        (lambda m: json.dumps({**m, "hidden_dims": [10**9]}), "more than the 20,000,000,000"),
        (lambda m: json.dumps([m]), "has no 'family'"),
    ],
)
def test_bad_model_configs_fail_in_one_line(work: Path, change: object, match: str) -> None:
    config = work / "model" / "config.json"
    config.write_text(change(json.loads(config.read_text())))  # type: ignore[operator]
    argv = ["sample", "--model", str(work / "model"), "--labels", "1", "--out", str(work / "s.npz")]
    refused(argv, work, match)


def test_a_model_larger_than_free_memory_is_refused_with_the_numbers(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selective_amnesia.io.artifacts as sa_io

    monkeypatch.setattr(sa_io, "free_memory", lambda: 1000)
    argv = ["sample", "--model", str(work / "model"), "--labels", "1", "--out", str(work / "s.npz")]
    refused(argv, work, "describes a model of 26,324 parameters")
    refused(["pretrain", str(TINY_CONFIG), "--out", str(work / "m")], work, "of memory free")


def test_a_ddpm_with_absurd_timesteps_is_refused_before_allocation(work: Path) -> None:
    from tests.conftest import tiny_ddpm

    model = tiny_ddpm()
    model.save_pretrained(work / "ddpm")  # type: ignore[operator]
    config = work / "ddpm" / "config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "num_train_timesteps": 200_000_000}))
    argv = ["sample", "--model", str(work / "ddpm"), "--labels", "1", "--out", str(work / "s.npz")]
    refused(argv, work, "num_train_timesteps must be an integer in [1, 100000]")
    refused(
        [
            "run",
            "--out",
            str(work / "r"),
            "--dry-run",
            "model.family=ddpm",
            "model.ddpm.num_train_timesteps=200000000",
            "fisher.estimator=subsampled",
        ],
        work,
        "more than 100,000",
    )
    config.write_text(json.dumps({**meta, "block_out_channels": [8, 16, 1 << 20]}))
    refused(argv, work)


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("model_index.json", lambda d: [d], "must be a JSON object"),
        ("model_index.json", lambda d: {**d, "unet": []}, "unet must be a [library, class] pair"),
        ("model_index.json", lambda d: {**d, "vae": "diffusers"}, "vae must be a [library, class] pair"),
        ("model_index.json", lambda d: {**d, "../x": ["a", "b"]}, "not a component name"),
        ("model_index.json", lambda d: DEEP_JSON, "nested deeper"),
        (
            "model_index.json",
            lambda d: {**d, "_selective_amnesia": {"guidance_scale": "x"}},
            "guidance_scale",
        ),
        ("scheduler/scheduler_config.json", lambda d: [d], "must be a JSON object"),
        (
            "scheduler/scheduler_config.json",
            lambda d: {**d, "beta_end": "0.012"},
            "beta_end must be a finite",
        ),
        (
            "scheduler/scheduler_config.json",
            lambda d: {**d, "beta_end": [0.012]},
            "beta_end must be a finite",
        ),
        ("scheduler/scheduler_config.json", lambda d: {**d, "beta_schedule": "cubic"}, "beta_schedule must"),
        ("scheduler/scheduler_config.json", lambda d: {**d, "trained_betas": [0.1, "x"]}, "trained_betas"),
        ("scheduler/scheduler_config.json", lambda d: {**d, "trained_betas": [0.1, 1.5]}, "in (0, 1)"),
        ("scheduler/scheduler_config.json", lambda d: {**d, "trained_betas": []}, "in (0, 1)"),
        (
            "scheduler/scheduler_config.json",
            lambda d: {**d, "beta_end": 1.5},
            "0 < beta_start <= beta_end < 1",
        ),
        (
            "scheduler/scheduler_config.json",
            lambda d: {**d, "beta_start": 0.5, "beta_end": 0.1},
            "beta_start",
        ),
        ("scheduler/scheduler_config.json", lambda d: {**d, "num_train_timesteps": 2 * 10**8}, "100000"),
        ("scheduler/scheduler_config.json", lambda d: {**d, "num_train_timesteps": 10**60}, "40 digits"),
        ("unet/config.json", lambda d: {**d, "sample_size": "8"}, "sample_size must be an integer"),
        ("unet/config.json", lambda d: {**d, "block_out_channels": ["32", 64]}, "block_out_channels"),
    ],
)
def test_bad_pipeline_files_fail_in_one_line(sd_copy: Path, name: str, change: object, match: str) -> None:
    path = sd_copy / name
    new = change(json.loads(path.read_text()))  # type: ignore[operator]
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    argv = ["sample", "--model", str(sd_copy), "--prompt", "a cat", "--out", str(sd_copy.parent / "s.npz")]
    refused([*argv, "--no-progress"], sd_copy.parent, match)


def test_nan_betas_are_refused(sd_copy: Path) -> None:
    path = sd_copy / "scheduler" / "scheduler_config.json"
    path.write_text(path.read_text().replace('"beta_end": 0.012', '"beta_end": NaN'))
    argv = ["sample", "--model", str(sd_copy), "--prompt", "a cat", "--out", str(sd_copy.parent / "s.npz")]
    refused([*argv, "--no-progress"], sd_copy.parent, "beta_end must be a finite number")


# ---- 5. Fishers, sampling sizes --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32, torch.uint8, torch.bool])
def test_fishers_that_are_not_floating_point_are_refused(work: Path, dtype: torch.dtype) -> None:
    fisher = Fisher.load(work / "fisher.safetensors")
    bad = Fisher({k: v.to(dtype) for k, v in fisher.values.items()}, fisher.metadata)
    bad.save(work / "bad.safetensors")
    argv = ["forget", "--model", str(work / "model"), "--fisher", str(work / "bad.safetensors")]
    refused([*argv, "--out", str(work / "f"), "--no-progress"], work, "float16/bfloat16/float32/float64")


def test_fishers_with_hostile_metadata_are_refused(work: Path) -> None:
    from safetensors.torch import save_file

    fisher = Fisher.load(work / "fisher.safetensors")
    for value, match in ((DEEP_JSON, "nested deeper"), (BIG_INT, "integer of more than 40")):
        save_file(fisher.values, str(work / "bad.safetensors"), metadata={"seconds": value})
        argv = ["forget", "--model", str(work / "model"), "--fisher", str(work / "bad.safetensors")]
        refused([*argv, "--out", str(work / "f"), "--no-progress"], work, match)


def test_bfloat16_fishers_are_accepted(work: Path) -> None:
    from selective_amnesia.models import load_model

    fisher = Fisher.load(work / "fisher.safetensors")
    Fisher({k: v.bfloat16() for k, v in fisher.values.items()}, fisher.metadata).save(work / "b.safetensors")
    Fisher.load(work / "b.safetensors", load_model(work / "model"))


def test_absurd_sample_requests_need_force(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import selective_amnesia.cli.app as cli

    argv = ["sample", "--model", str(work / "model"), "--labels", "1", "--out", str(work / "s.npz")]
    refused([*argv, "--num-per-label", "2147483647"], work, "more than the")  # memory, --force or not
    refused([*argv, "--num-per-label", "2147483647", "--force"], work, "more than the")
    monkeypatch.setattr(cli, "MAX_SAMPLE_IMAGES", 10)
    refused([*argv, "--num-per-label", "11"], work, "pass --force")
    assert main([*argv, "--num-per-label", "11", "--force", "--no-progress"]) == 0


# ---- SIGTERM and file modes ------------------------------------------------------------------------


def test_sigterm_marks_the_run_failed_and_releases_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "m"
    amnesia = Path(sys.executable).parent / "amnesia"
    args = ["pretrain", str(TINY_CONFIG), "pretrain.steps=100000", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(
        [str(amnesia), *args], env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 60
        while not (out / runstate.STATE_FILE).is_file() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["amnesia pretrain: terminated; rerun the same command to resume"]
    state = read_json(out / runstate.STATE_FILE)
    assert state["status"] == "failed" and "SIGTERM" in state["error"]
    assert not runstate.lock_path(out).exists()


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    tiny = [str(TINY_CONFIG), "pretrain.steps=2", "--no-progress"]
    with _umask(0o022):
        assert main(["pretrain", *tiny, "--out", str(tmp_path / "m")]) == 0
        s = tmp_path / "s.npz"
        assert main(["sample", "--model", str(tmp_path / "m"), "--labels", "1", "--out", str(s)]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "m", *(tmp_path / "m").iterdir(), s]}
    assert modes == {
        "m": 0o755,
        "config.json": 0o644,
        "model.safetensors": 0o644,
        runstate.STATE_FILE: 0o644,
        "s.npz": 0o644,
    }
    with _umask(0o077):
        assert (
            main(["sample", "--model", str(tmp_path / "m"), "--labels", "1", "--out", str(s), "--force"]) == 0
        )
    assert stat.S_IMODE(s.stat().st_mode) == 0o600


@pytest.mark.parametrize("package", ["sys", "itertools", "os"])  # built-in and frozen: no folder of their own
def test_a_text_encoder_ref_naming_a_module_without_files_is_refused(
    tmp_path: Path, tiny_world: Path, package: str
) -> None:
    from selective_amnesia.models.text_to_image import TEXT_ENCODER_REF

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    (world / TEXT_ENCODER_REF).write_text(
        json.dumps({"package": package, "subdir": "", "class": "BertModel"})
    )
    argv = ["sample", "--model", str(world), "--prompt", "a 7", "--out", str(tmp_path / "s.npz")]
    refused([*argv, "--no-progress"], tmp_path, "not an installed package with files")
