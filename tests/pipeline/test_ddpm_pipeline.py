"""The diffusion pipeline end to end on a tiny UNet: outputs, resumption, replay, surrogates, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selective_amnesia.cli import main
from selective_amnesia.config import load_config
from selective_amnesia.core.sampling import cached_samples, sample_per_label
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models import load_model
from selective_amnesia.pipeline.classes import (
    run_pipeline,
    stage_base,
    stage_fisher,
    stage_forget,
    stage_replay,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "ddpm_mnist_tiny.yaml"


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddpm_run")
    cache = tmp_path_factory.mktemp("cache")
    code = main(["run", str(TINY), "--out", str(out), f"classifier.cache_dir={cache}"])
    assert code == 0
    return out


def test_run_writes_stock_diffusers_directories_and_a_report(ddpm_run: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    report = json.loads((ddpm_run / "report.json").read_text())
    for name in ("base", "forget"):
        assert UNet2DModel.from_pretrained(ddpm_run / name / "unet").config.num_class_embeds == 11
        assert DDPMScheduler.from_pretrained(ddpm_run / name / "scheduler").config.num_train_timesteps == 20
        assert not (ddpm_run / name / "checkpoint").exists()  # removed once the model is saved
        for key in ("p_forget", "entropy", "remembered_accuracy", "fid", "precision", "recall"):
            assert np.isfinite(report["metrics"][name][key])
    assert report["fisher"]["estimator"] == "all_timesteps"
    assert sorted(p.name for p in (ddpm_run / "replay").iterdir()) == [
        f"label_{c}.safetensors" for c in range(1, 10)
    ]
    assert set(report["timings"]) >= {"pretrain_s", "fisher_s", "replay_generation_s", "forget_s", "total_s"}
    for png in ("before_after.png", "samples_base.png", "samples_forget.png", "losses.png"):
        assert (ddpm_run / png).is_file()


def test_rerun_reuses_every_stage(ddpm_run: Path, tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"classifier.cache_dir={tmp_path}"])
    before = json.loads((ddpm_run / "report.json").read_text())
    report = run_pipeline(cfg, ddpm_run)
    assert report["base_model"].get("reused") is True
    assert report["metrics"]["forget"]["p_forget"] == before["metrics"]["forget"]["p_forget"]
    assert report["timings"]["forget_s"] < 5  # loaded, not retrained


def test_sample_cli_works_on_the_forgotten_model(ddpm_run: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    base = ["sample", "--model", str(ddpm_run / "forget"), "--labels", "0,3", "--num-per-label", "5"]
    assert main([*base, "--seed", "1", "--out", str(a), "--batch-size", "2", "--no-progress"]) == 0
    assert main([*base, "--seed", "1", "--out", str(b), "--batch-size", "5", "--no-progress"]) == 0
    xa, xb = np.load(a), np.load(b)
    assert xa["images"].shape == (10, 8, 8, 1) and xa["images"].dtype == np.uint8
    assert np.array_equal(xa["images"], xb["images"])  # per-image seeds: batching changes nothing
    assert (
        main([*base, "--seed", "1", "--out", str(b), "--steps", "2", "--guidance-scale", "0", "--force"]) == 0
    )
    assert not np.array_equal(xa["images"], np.load(b)["images"])
    assert main([*base, "--seed", "1", "--out", str(b), "--steps", "0", "--force"]) == 2


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make the training step raise after ``calls`` optimizer steps, like a killed process."""
    from selective_amnesia.core import train

    original = train.Trainer.update  # every loop's optimizer step goes through it
    count = {"n": 0}

    def update(self: train.Trainer, step: int = 0) -> None:
        if count["n"] == calls:
            raise KeyboardInterrupt
        count["n"] += 1
        original(self, step)

    monkeypatch.setattr(train.Trainer, "update", update)


def test_interrupted_pretraining_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(TINY, ["pretrain.steps=12", "pretrain.checkpoint_every=5"])
    straight, _ = stage_base(cfg, tmp_path / "straight")
    with monkeypatch.context() as m:
        _interrupt_after(m, 8)
        with pytest.raises(KeyboardInterrupt):
            stage_base(cfg, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoint").is_dir()
    resumed, info = stage_base(cfg, tmp_path / "resumed")
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert info["seconds"] > 0


@pytest.mark.parametrize(
    "average", [[], ["forget.ema_decay=0", "forget.average_from=3"]], ids=["ema", "mean"]
)
def test_interrupted_forgetting_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, average: list[str]
) -> None:
    # the EMA (TINY's) or the running mean of steps 3..9 is checkpointed at step 4 and resumed with it
    cfg = load_config(TINY, ["pretrain.steps=5", "forget.steps=9", "forget.checkpoint_every=4", *average])
    base, _ = stage_base(cfg, tmp_path / "base")
    replay = stage_replay(cfg, base, tmp_path)
    assert replay is not None and replay[0].shape == (9 * 6, 1, 8, 8)
    fisher = stage_fisher(cfg, base, tmp_path)
    straight, _ = stage_forget(cfg, base, fisher, tmp_path / "a", replay)
    with monkeypatch.context() as m:
        _interrupt_after(m, 6)
        with pytest.raises(KeyboardInterrupt):
            stage_forget(cfg, base, fisher, tmp_path / "b", replay)
    resumed, _ = stage_forget(cfg, base, fisher, tmp_path / "b", replay)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_snapshots_survive_a_resume_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ["pretrain.steps=5", "forget.steps=9", "forget.checkpoint_every=4"]
    cfg = load_config(TINY, settings)
    base, _ = stage_base(cfg, tmp_path / "base")
    replay, fisher = stage_replay(cfg, base, tmp_path), stage_fisher(cfg, base, tmp_path)
    straight, _ = stage_forget(cfg, base, fisher, tmp_path / "a", replay)
    snapping = load_config(TINY, [*settings, "forget.snapshot_every=3"])
    with monkeypatch.context() as m:
        _interrupt_after(m, 6)  # after snapshot 3 and checkpoint 4: snapshot 6 comes from the resumed run
        with pytest.raises(KeyboardInterrupt):
            stage_forget(snapping, base, fisher, tmp_path / "b", replay)
    resumed, _ = stage_forget(snapping, base, fisher, tmp_path / "b", replay)
    snapshots = sorted(p.name for p in (tmp_path / "b" / "snapshots").iterdir())
    assert snapshots == ["step-00003", "step-00006", "step-00009"]
    last = load_model(tmp_path / "b" / "snapshots" / "step-00009").state_dict()
    done = resumed.state_dict()
    for name, p in straight.state_dict().items():
        assert torch.equal(p, done[name]) and torch.equal(p, last[name]), name  # EMA weights, as the result


def test_forgetting_switches_label_dropout_off_and_shares_timesteps(tmp_path: Path) -> None:
    from selective_amnesia.models.ddpm import ConditionalDDPM

    cfg = load_config(TINY, ["pretrain.steps=2", "forget.steps=2", "forget.ewc_lambda=0"])
    base, _ = stage_base(cfg, tmp_path / "base")
    seen: list[tuple[bool, torch.Tensor]] = []
    original = ConditionalDDPM.nelbo

    def spy(self: ConditionalDDPM, x: torch.Tensor, cond: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append((self._dropout_active(), kw["noise"].timesteps))  # type: ignore[attr-defined]
        return original(self, x, cond, **kw)  # type: ignore[arg-type]

    ConditionalDDPM.nelbo = spy  # type: ignore[method-assign]
    try:
        stage_forget(cfg, base, None, tmp_path, stage_replay(cfg, base, tmp_path))
    finally:
        ConditionalDDPM.nelbo = original  # type: ignore[method-assign]
    assert seen and not any(active for active, _ in seen)
    forget_t, replay_t = seen[0][1], seen[1][1]
    assert torch.equal(forget_t, replay_t)  # one draw of timesteps for both terms
    t = forget_t.tolist()
    half = len(t) // 2 + 1
    assert all(t[half + i] == 19 - t[i] for i in range(len(t) - half))  # antithetic pairs (T = 20)
    assert base.class_dropout  # restored on the model object


def test_cached_samples_are_reused_only_for_the_same_weights(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["pretrain.steps=2"])
    model, _ = stage_base(cfg, tmp_path / "m")
    a, la = cached_samples(model, [1, 2], 3, 0, tmp_path / "c")
    b, _ = cached_samples(model, [1, 2], 3, 0, tmp_path / "c")
    assert a.dtype == torch.uint8 and la.tolist() == [1, 1, 1, 2, 2, 2]
    assert torch.equal(a, b)
    x, _ = sample_per_label(model, [1, 2], 3, 0, batch_size=2)
    assert torch.equal(model.to_uint8(x), a)  # the cache holds exactly what sampling gives
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    c, _ = cached_samples(model, [1, 2], 3, 0, tmp_path / "c")
    assert not torch.equal(a, c)


def test_class_and_folder_surrogates(tmp_path: Path) -> None:
    cfg = load_config(
        TINY,
        [
            "pretrain.steps=2",
            "forget.steps=2",
            "forget.ewc_lambda=0",
            "forget.replay=fresh",
            "forget.surrogate=class",
            "forget.surrogate_label=3",
        ],
    )
    base, _ = stage_base(cfg, tmp_path / "base")
    model, history = stage_forget(cfg, base, None, tmp_path / "cls", None)
    assert (tmp_path / "cls" / "surrogate" / "label_3.safetensors").is_file()
    assert np.isfinite(history["terms"]["forget"]).all()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = load_config(
        TINY,
        [
            "pretrain.steps=2",
            "forget.steps=2",
            "forget.ewc_lambda=0",
            "forget.replay=fresh",
            "forget.surrogate=folder",
            f"forget.surrogate_path={folder}",
        ],
    )
    _, history = stage_forget(cfg, base, None, tmp_path / "fold", None)
    assert np.isfinite(history["terms"]["forget"]).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fisher.estimator=batched"], "does not apply to model.family ddpm"),
        (["forget.surrogate=class"], "surrogate_label"),
        (["forget.surrogate=folder"], "surrogate_path"),
        (["model.ddpm.block_out_channels=[8, 10]"], "divisible by norm_num_groups"),
        (["device=tpu"], "device must be"),
    ],
)
def test_bad_diffusion_configs_fail_clearly(overrides: list[str], message: str) -> None:
    with pytest.raises(AmnesiaError, match=message):
        load_config(TINY, overrides)


def test_data_and_model_sizes_must_agree(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["data.image_size=12"])
    with pytest.raises(AmnesiaError, match="make them agree"):
        stage_base(cfg, tmp_path / "m")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["device=cuda"])
    with pytest.raises(AmnesiaError, match="no CUDA"):
        stage_base(cfg, tmp_path / "m")


def test_loaded_model_matches_saved(ddpm_run: Path) -> None:
    model = load_model(ddpm_run / "forget")
    assert model.family == "ddpm" and not model.training


def test_fisher_and_forget_commands_on_a_diffusion_model(ddpm_run: Path, tmp_path: Path) -> None:
    fisher = tmp_path / "f.safetensors"
    args = [str(TINY), "fisher.estimator=subsampled", "fisher.timesteps_per_sample=4"]
    assert main(["fisher", "--model", str(ddpm_run / "base"), "--out", str(fisher), *args]) == 0
    out = tmp_path / "forgotten"
    forget_args = ["--model", str(ddpm_run / "base"), "--fisher", str(fisher), "--out", str(out)]
    assert main(["forget", *forget_args, str(TINY), "forget.steps=3"]) == 0
    assert len(list((out / "replay").glob("label_*.safetensors"))) == 9
    assert load_model(out).family == "ddpm"


def test_cached_samples_follow_the_models_sampler_defaults(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["pretrain.steps=2"])
    model, _ = stage_base(cfg, tmp_path / "m")
    a, _ = cached_samples(model, [1], 3, 0, tmp_path / "c")
    model.config.guidance_scale = 0.5  # what a changed config does to a reused base
    b, _ = cached_samples(model, [1], 3, 0, tmp_path / "c")
    assert not torch.equal(a, b)
