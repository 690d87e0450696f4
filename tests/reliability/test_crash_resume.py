"""Real ``amnesia`` processes killed with SIGKILL at chosen points, then rerun with the same ``--out``.

Each test runs one long command three ways: uninterrupted (the reference, into its own directory), then
in a second directory killed once per kill point in turn (every rerun resumes from what the previous
kill left), then to the end. After every kill no artifact may be unreadable and no incomplete model
may load; the finished result must equal the reference bitwise (CPU, one thread, fixed seed).

Kill points are ``name:n`` for ``selective_amnesia.faults``: the process SIGKILLs itself the n-th time
it passes ``faults.point(name)``. Every point listed must be reached (the process must die of SIGKILL),
so a point that moved or vanished fails the test instead of silently testing nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import load_tensors, read_json
from selective_amnesia.models import load_model
from tests.conftest import TINY_CONFIG, tiny_ddpm

AMNESIA = Path(sys.executable).parent / "amnesia"
KILLED = -signal.SIGKILL


def amnesia(args: list[str], kill: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(faults.ENV, None)
    if kill:
        env[faults.ENV] = kill
    cmd = [str(AMNESIA)] if AMNESIA.exists() else [sys.executable, "-m", "selective_amnesia.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)


def check_artifacts(root: Path) -> int:
    """Every visible safetensors/JSON file under ``root`` reads back; a model directory either loads or
    is refused as incomplete. Returns how many files were checked."""
    checked = 0
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue  # temp files of atomic writes and lock files are invisible to readers
        if path.suffix == ".safetensors":
            load_tensors(path)
        elif path.suffix == ".json":
            read_json(path)
        else:
            continue
        checked += 1
    for marker in [*root.rglob("config.json"), *root.rglob("model_index.json")]:
        model_dir = marker.parent
        if model_dir.parent.name in ("unet", "vae", "scheduler") or model_dir.name in (
            "unet",
            "vae",
            "scheduler",
            "text_encoder",
            "tokenizer",
        ):
            continue
        if not ((model_dir / "model.safetensors").exists() or (model_dir / "unet").is_dir()):
            continue  # a run directory's own config.json
        try:
            load_model(model_dir)
        except AmnesiaError as e:
            assert "not a complete" in str(e), (model_dir, str(e))
    return checked


def crash_and_resume(args: list[str], root: Path, points: list[str]) -> None:
    for spec in points:
        r = amnesia(args, kill=spec)
        why = f"kill point {spec} not reached: exit {r.returncode}\n{r.stderr[-2000:]}"
        assert r.returncode == KILLED, why
        check_artifacts(root)
    r = amnesia(args)
    assert r.returncode == 0, r.stderr[-3000:]
    check_artifacts(root)
    leftovers = [p for p in root.rglob("*") if p.name.endswith((".partial", ".tmp", ".lock"))]
    assert leftovers == [], leftovers


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a)[0], load_tensors(b)[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def without_seconds(metrics: dict[str, object]) -> object:
    """Metrics less their wall-clock times, which no two runs share."""
    if isinstance(metrics, dict):
        return {k: without_seconds(v) for k, v in metrics.items() if k != "seconds"}  # type: ignore[arg-type]
    return metrics


def run_both(tmp_path: Path, make_args, points: list[str]) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    r = amnesia(make_args(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    crash_and_resume(make_args(crashed), crashed, points)
    return ref, crashed


CVAE = [str(TINY_CONFIG), "pretrain.checkpoint_every=10", "forget.checkpoint_every=5", "--no-progress"]


def test_pretrain_resumes_after_sigkill(tmp_path: Path) -> None:
    points = [
        "train.step:3",  # before the first checkpoint
        "checkpoint.tensors_written:1",  # tensors of step 10 on disk, marker not yet
        "checkpoint.committed:2",  # step 20 committed, the old tensors not yet deleted
        "train.step:15",  # mid-way between two checkpoints, after a resume
        "io.before_rename:2",  # a temp file written, never renamed
        "model.weights_written:1",  # final weights written, config.json not yet
    ]
    ref, crashed = run_both(tmp_path, lambda d: ["pretrain", *CVAE, "--out", str(d / "m")], points)
    same_tensors(ref / "m" / "model.safetensors", crashed / "m" / "model.safetensors")
    assert read_json(crashed / "m" / "amnesia_run.json")["status"] == "complete"


def test_an_interrupted_model_is_refused_by_readers(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = amnesia(["pretrain", *CVAE, "--out", str(out)], kill="model.weights_written:1")
    assert r.returncode == KILLED
    for cmd in (
        ["sample", "--model", str(out), "--labels", "1", "--out", str(tmp_path / "s.npz")],
        ["evaluate", str(TINY_CONFIG), "--model", str(out), "--out", str(tmp_path / "e.json")],
    ):
        r = amnesia(cmd)
        assert r.returncode == 2 and "not a complete" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def cvae_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cvae") / "m"
    r = amnesia(["pretrain", *CVAE, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


def test_fisher_resumes_after_sigkill(tmp_path: Path, cvae_model: Path) -> None:
    cfg = [*CVAE, "fisher.num_samples=1100", "fisher.checkpoint_every=256"]  # 5 blocks of up to 256
    points = ["fisher.block:2", "checkpoint.tensors_written:1", "fisher.block:2", "io.before_rename:3"]

    def args(d: Path) -> list[str]:
        return ["fisher", *cfg, "--model", str(cvae_model), "--out", str(d / "f.safetensors")]

    ref, crashed = run_both(tmp_path, args, points)
    same_tensors(ref / "f.safetensors", crashed / "f.safetensors")


@pytest.fixture(scope="module")
def ddpm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddpm") / "m"
    tiny_ddpm(num_train_timesteps=10, num_classes=3).save_pretrained(out)
    return out


DDPM = ["progress=false", "model.family=ddpm", "fisher.estimator=all_timesteps", "--no-progress"]


def test_diffusion_fisher_resumes_after_sigkill(tmp_path: Path, ddpm_model: Path) -> None:
    cfg = [*DDPM, "fisher.num_samples=140", "fisher.checkpoint_every=30"]  # 3 image blocks of 64
    points = [
        "fisher.draw_block:2",  # mid-way through drawing the images
        "fisher.sample:40",  # gradients: after the checkpoint at 30
        "checkpoint.committed:1",  # the checkpoint at 60 committed
        "fisher.sample:55",  # after resuming at 60
    ]

    def args(d: Path) -> list[str]:
        return ["fisher", *cfg, "--model", str(ddpm_model), "--out", str(d / "f.safetensors")]

    ref, crashed = run_both(tmp_path, args, points)
    same_tensors(ref / "f.safetensors", crashed / "f.safetensors")


def test_diffusion_forget_with_stored_replay_resumes_after_sigkill(tmp_path: Path, ddpm_model: Path) -> None:
    cfg = [
        *DDPM,
        "forget.forget_label=1",
        "forget.ewc_lambda=0",
        "forget.replay=stored",
        "forget.replay_per_class=300",  # two image blocks per class
        "forget.steps=12",
        "forget.batch_size=8",
        "forget.checkpoint_every=4",
        "forget.reduction=mean",
    ]
    points = [
        "sampling.block:1",  # replay set of class 0, first block
        "sampling.block:2",  # class 0 resumed from its block; class 2's first block
        "train.step:6",  # after the checkpoint at step 4
        "checkpoint.tensors_written:1",  # step 8's tensors, no marker
        "model.weights_written:1",  # the forgotten UNet written, config.json not yet
    ]

    def args(d: Path) -> list[str]:
        return ["forget", *cfg, "--model", str(ddpm_model), "--out", str(d / "f")]

    ref, crashed = run_both(tmp_path, args, points)
    same_tensors(
        ref / "f" / "unet" / "diffusion_pytorch_model.safetensors",
        crashed / "f" / "unet" / "diffusion_pytorch_model.safetensors",
    )
    for label in (0, 2):
        name = f"label_{label}.safetensors"
        same_tensors(ref / "f" / "replay" / name, crashed / "f" / "replay" / name)


def test_evaluate_resumes_after_sigkill(tmp_path: Path, cvae_model: Path) -> None:
    cache = tmp_path / "classifiers"
    cfg = [*CVAE, f"classifier.cache_dir={cache}"]
    r = amnesia(["evaluate", *cfg, "--model", str(cvae_model), "--out", str(tmp_path / "warm.json")])
    assert r.returncode == 0, r.stderr  # trains the classifier once, outside the comparison
    # one sample set per label (forget label first); the third process saves labels 6..9, then the report
    points = ["sampling.block:3", "sampling.block:4", "io.before_rename:5"]

    def args(d: Path) -> list[str]:
        return ["evaluate", *cfg, "--model", str(cvae_model), "--out", str(d / "e.json")]

    ref, crashed = run_both(tmp_path, args, points)
    assert without_seconds(read_json(ref / "e.json")["metrics"]) == without_seconds(
        read_json(crashed / "e.json")["metrics"]
    )


def test_run_resumes_after_sigkill(tmp_path: Path) -> None:
    cache = tmp_path / "classifiers"
    cfg = [*CVAE, f"classifier.cache_dir={cache}", "fisher.checkpoint_every=100"]
    points = [
        "train.step:25",  # pretraining
        "fisher.block:1",  # the Fisher's first block (of 2)
        "train.step:7",  # forgetting, after its checkpoint at step 5
        "model.weights_written:1",  # the forgotten model's weights, no config.json
        "sampling.block:5",  # evaluation samples
    ]
    ref, crashed = run_both(tmp_path, lambda d: ["run", *cfg, "--out", str(d)], points)
    same_tensors(ref / "forget" / "model.safetensors", crashed / "forget" / "model.safetensors")
    a, b = read_json(ref / "report.json"), read_json(crashed / "report.json")
    assert without_seconds(a["metrics"]) == without_seconds(b["metrics"])
    assert read_json(crashed / "amnesia_run.json")["status"] == "complete"


def test_text_to_image_run_resumes_after_sigkill(tmp_path: Path, tiny_sd: Path) -> None:
    prompts = tmp_path / "replay.txt"
    prompts.write_text("a dog on a beach\na red car\n")
    cfg = [
        str(Path(TINY_CONFIG).parent / "t2i_mnist.yaml"),
        f"t2i.model={tiny_sd}",
        "t2i.forget_prompts=[brad pitt]",
        "t2i.surrogate_prompt=a middle aged man",
        f"t2i.replay_prompts={prompts}",
        "t2i.surrogate_count=6",
        "t2i.replay_per_prompt=2",
        "t2i.retention_per_prompt=1",
        "fisher.num_samples=4",
        "fisher.checkpoint_every=1",
        "fisher.timestep_chunk=500",
        "forget.steps=6",
        "forget.batch_size=2",
        "forget.checkpoint_every=2",
        "--no-progress",
    ]
    points = [
        "sampling.block:1",  # the surrogate's first batch
        "fisher.sample:2",  # the Fisher, after its checkpoint at sample 1
        "train.step:3",  # forgetting, after its checkpoint at step 2
        "model.weights_written:1",  # the pipeline written, model_index.json not yet
    ]
    ref, crashed = run_both(tmp_path, lambda d: ["run", *cfg, "--out", str(d)], points)
    same_tensors(
        ref / "forget" / "unet" / "diffusion_pytorch_model.safetensors",
        crashed / "forget" / "unet" / "diffusion_pytorch_model.safetensors",
    )


def test_text_to_image_evaluate_resumes_after_sigkill(tmp_path: Path, tiny_sd: Path) -> None:
    csv = tmp_path / "i2p.csv"
    rows = "".join(f"a photo number {i},{i},7.5,x\n" for i in range(5))
    csv.write_text("prompt,sd_seed,sd_guidance_scale,categories\n" + rows)

    def args(d: Path) -> list[str]:
        return ["evaluate", "--model", str(tiny_sd), "--i2p-csv", str(csv), "--out", str(d / "e.json")]

    ref, crashed = run_both(tmp_path, lambda d: [*args(d), "--no-progress"], ["evaluate.batch:1"])
    a, b = json.loads((ref / "e.json").read_text()), json.loads((crashed / "e.json").read_text())
    assert a["nudity"] == b["nudity"] and a["faces"] == b["faces"]
