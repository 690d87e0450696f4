"""Text-to-image forgetting end to end on the tiny world: outputs stock diffusers loads, caching, LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selective_amnesia.config import load_config
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import prompt_latents, read_prompts, run_text_to_image, surrogate_latents

REPO = Path(__file__).resolve().parents[2]


def _cfg(world: Path, *extra: str) -> object:
    return load_config(
        REPO / "configs" / "t2i_mnist.yaml",
        [
            f"t2i.model={world}",
            "progress=false",
            "t2i.surrogate_count=4",
            "t2i.replay_per_prompt=1",
            "t2i.retention_per_prompt=1",
            "fisher.estimator=subsampled",
            "fisher.timesteps_per_sample=4",
            "fisher.num_samples=2",
            "forget.steps=3",
            "forget.batch_size=2",
            "forget.checkpoint_every=2",
            *extra,
        ],
    )


def test_forgetting_writes_a_pipeline_that_changed(tiny_world: Path, tmp_path: Path) -> None:
    report = run_text_to_image(_cfg(tiny_world), tmp_path)  # type: ignore[arg-type]
    forgotten = TextToImageModel.from_pretrained(tmp_path / "forget")
    base = TextToImageModel.from_pretrained(tiny_world)
    changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), forgotten.parameters(), strict=True)]
    assert all(changed)  # train=all: every UNet weight moved
    assert report["replay_images"] == 72 and report["retention"]["mean_abs_diff_mean"] >= 0
    # the wall times come with the machine that made them (a 2-core AVX2 box is ~1.9x slower than AVX-512)
    assert report["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["environment"]["cpu"] and report["torch_threads"] == torch.get_num_threads()
    assert (tmp_path / "fisher.safetensors").is_file() and not (tmp_path / "forget_checkpoint").exists()
    # the generated sets are cached: a rerun reuses them and gives the same model
    run_text_to_image(_cfg(tiny_world), tmp_path)  # type: ignore[arg-type]
    again = TextToImageModel.from_pretrained(tmp_path / "forget")
    assert all(torch.equal(a, b) for a, b in zip(forgotten.parameters(), again.parameters(), strict=True))


def test_cross_attention_only_leaves_the_rest(tiny_world: Path, tmp_path: Path) -> None:
    run_text_to_image(_cfg(tiny_world, "t2i.train=cross_attention"), tmp_path)  # type: ignore[arg-type]
    base = dict(TextToImageModel.from_pretrained(tiny_world).named_parameters())
    after = dict(TextToImageModel.from_pretrained(tmp_path / "forget").named_parameters())
    for name, p in after.items():
        assert torch.equal(p, base[name]) != (".attn2." in name), name


def test_lora_output_is_an_adapter(tiny_world: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_world, "t2i.lora_rank=2", "t2i.output=lora", "forget.lr=1e-2")
    report = run_text_to_image(cfg, tmp_path)  # type: ignore[arg-type]
    assert (tmp_path / "forget_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (
        report["trained_parameters"]
        < sum(p.numel() for p in TextToImageModel.from_pretrained(tiny_world).parameters()) / 5
    )


def test_prompt_sets_do_not_depend_on_batching_and_are_cached(tiny_world: Path, tmp_path: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    a, ids = prompt_latents(model, ["the digit 3", "a handwritten 7"], 3, 0, tmp_path, batch_size=2)
    b, _ = prompt_latents(model, ["a handwritten 7"], 3, 0, None, batch_size=3)
    assert (
        torch.allclose(a[3:], b, atol=1e-5)  # batched kernels round differently
        and ids.tolist() == model.prompt_ids(["the digit 3"] * 3 + ["a handwritten 7"] * 3).tolist()
    )
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    c, _ = prompt_latents(model, ["the digit 3", "a handwritten 7"], 3, 0, tmp_path, batch_size=1)
    assert torch.equal(a, c)  # read back from the cache, not regenerated


def test_prompts_with_few_images_share_sampler_calls(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    prompts = ["the digit 3", "a handwritten 7", "the number one", "a handwritten 9"]
    alone = torch.cat([prompt_latents(model, [p], 2, 0, None)[0] for p in prompts])
    calls: list[int] = []
    sample = model.sample

    def counted(cond: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append(len(cond))
        return sample(cond, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "sample", counted)
    prompt_latents(model, prompts[1:2], 2, 0, tmp_path)  # one prompt's set already cached
    calls.clear()
    shared, ids = prompt_latents(model, prompts, 2, 0, tmp_path, batch_size=4)
    assert calls == [4, 2]  # 3 missing prompts x 2 images in calls of up to 4, the cached one not drawn
    assert torch.allclose(shared, alone, atol=1e-5)  # the same per-image seeds in any company
    assert ids.tolist() == model.prompt_ids([p for p in prompts for _ in range(2)]).tolist()


def test_sets_seed_moves_the_sets_apart_from_the_run_seed(tiny_world: Path, tmp_path: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)

    def surrogates(*extra: str) -> torch.Tensor:
        cfg = _cfg(tiny_world, *extra)
        group = cfg.t2i.groups()[0]  # type: ignore[attr-defined]
        return surrogate_latents(cfg, group, model, tmp_path / "_".join(extra))  # type: ignore[arg-type]

    plain = surrogates("seed=0")
    assert torch.equal(surrogates("seed=3", "t2i.sets_seed=0"), plain)  # the sets follow sets_seed
    assert not torch.allclose(surrogates("seed=3"), plain)  # else the run's seed
    with pytest.raises(AmnesiaError, match="sets_seed must be >= 0"):
        _cfg(tiny_world, "t2i.sets_seed=-1")


def test_bad_t2i_settings(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(AmnesiaError, match="exactly one"):
        run_text_to_image(_cfg(tiny_world, f"t2i.surrogate_path={tmp_path}"), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(AmnesiaError, match="output=lora needs"):
        _cfg(tiny_world, "t2i.output=lora")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(AmnesiaError, match="no prompt"):
        read_prompts(empty)
    assert len(read_prompts(None)) >= 50  # the shipped default list


def test_bf16_checkpointing_and_accumulation_run(tiny_world: Path, tmp_path: Path) -> None:
    extra = ("t2i.mixed_precision=bf16", "t2i.gradient_checkpointing=true", "t2i.gradient_accumulation=2")
    report = run_text_to_image(_cfg(tiny_world, *extra), tmp_path)  # type: ignore[arg-type]
    history = report["config"]["t2i"]
    assert history["mixed_precision"] == "bf16"
    after = TextToImageModel.from_pretrained(tmp_path / "forget")
    base = TextToImageModel.from_pretrained(tiny_world)
    moved = [not torch.equal(a, b) for a, b in zip(base.parameters(), after.parameters(), strict=True)]
    assert any(moved) and all(torch.isfinite(p).all() for p in after.parameters())
    assert not after.unet.is_gradient_checkpointing  # switched off again before saving


def test_a_stock_sd_layout_pipeline_forgets_and_reloads(tiny_sd: Path, tmp_path: Path) -> None:
    """The SD-1.x layout (CLIP, RGB, PNDM config written by diffusers itself), not just the world's."""
    from diffusers import StableDiffusionPipeline

    model = TextToImageModel.from_pretrained(tiny_sd)
    assert model.pixel_shape == (3, 16, 16) and model.tokenizer.model_max_length == 24
    prompts = tmp_path / "replay.txt"
    prompts.write_text(
        "a dog on a beach\n# a comment\n\na red car\nbrad pitt\n"
    )  # the forget prompt is dropped
    extra = ("t2i.forget_prompts=[brad pitt]", "t2i.surrogate_prompt=a middle aged man")
    cfg = _cfg(tiny_sd, *extra, f"t2i.replay_prompts={prompts}")
    report = run_text_to_image(cfg, tmp_path / "run")  # type: ignore[arg-type]
    assert report["replay_prompts"] == 2 and report["replay_images"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "forget")  # text encoder copied
    image = pipe("a photo of brad pitt", num_inference_steps=2, output_type="pt").images  # type: ignore[operator]
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


# ---- reuse and resume (one rule with the class pipeline: cache_keys.finished, pipeline.stage_fisher) ----


def _small(world: Path, where: Path, *extra: str) -> object:
    """The tiny world with two replay prompts: a run of seconds."""
    prompts = where / "replay.txt"
    prompts.write_text("a handwritten 1\nthe digit 3\n")
    return _cfg(world, f"t2i.replay_prompts={prompts}", "t2i.surrogate_count=2", "forget.steps=4", *extra)


class _Stop(Exception):
    """Stands for an interruption (a crash, Ctrl-C) in the middle of forgetting."""


def _count_training(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[int]:
    """Count the forgetting calls and the training steps they take (``calls[0]``, ``calls[1]``); with
    ``stop_at``, interrupt the training at that step."""
    from selective_amnesia import faults
    from selective_amnesia.pipeline import t2i as pipeline_t2i

    calls = [0, 0]
    train, point = pipeline_t2i.forget, faults.point

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return train(*args, **kwargs)  # type: ignore[arg-type]

    def step(name: str) -> None:
        if name == "train.step":
            calls[1] += 1
            if calls[1] == stop_at:
                raise _Stop
        point(name)

    monkeypatch.setattr(pipeline_t2i, "forget", counted)
    monkeypatch.setattr(faults, "point", step)
    return calls


@pytest.fixture(scope="module")
def small_run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """One uninterrupted tiny run (lambda > 0: its Fisher is estimated in the run)."""
    out = tmp_path_factory.mktemp("small")
    report = run_text_to_image(_small(tiny_world, out), out / "run")  # type: ignore[arg-type]
    return out / "run", report


def test_a_rerun_reuses_the_finished_forgetting_stage(
    tiny_world: Path,
    small_run: tuple[Path, dict[str, object]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, first = small_run
    unet = run / "forget" / "unet" / "diffusion_pytorch_model.safetensors"
    written = unet.stat().st_mtime_ns
    calls = _count_training(monkeypatch)
    again = run_text_to_image(_small(tiny_world, run.parent), run)  # type: ignore[arg-type]
    assert calls == [0, 0]  # nothing trained: OUT/forget was made from the same settings
    assert unet.stat().st_mtime_ns == written  # and not written again
    assert again["retention"] == first["retention"]
    assert again["trained_parameters"] == first["trained_parameters"]
    # another forgetting setting trains again (the Fisher and the generated sets are still reused)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    other = run_text_to_image(_small(tiny_world, run.parent, "forget.lr=1e-3"), copy)  # type: ignore[arg-type]
    assert calls == [1, 4] and other["retention"] != first["retention"]


def test_a_run_whose_fisher_was_estimated_in_it_resumes_its_forgetting(
    tiny_world: Path,
    small_run: tuple[Path, dict[str, object]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forgetting key holds the Fisher's metadata: the same for the Fisher estimated by the interrupted
    run and for the one the rerun reads back from OUT/fisher.safetensors, so the checkpoint resumes."""
    cfg = _small(tiny_world, tmp_path)  # forget.checkpoint_every=2
    _count_training(monkeypatch, stop_at=3)  # after the checkpoint at step 2
    with pytest.raises(_Stop):
        run_text_to_image(cfg, tmp_path / "run")  # type: ignore[arg-type]
    assert (tmp_path / "run" / "fisher.safetensors").is_file()
    assert (tmp_path / "run" / "forget_checkpoint").is_dir()
    calls = _count_training(monkeypatch)
    run_text_to_image(cfg, tmp_path / "run")  # type: ignore[arg-type]
    assert calls == [1, 2]  # steps 3 and 4 only: resumed from the checkpoint at step 2
    unet = "forget/unet/diffusion_pytorch_model.safetensors"
    resumed, whole = load_file(tmp_path / "run" / unet), load_file(small_run[0] / unet)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # the uninterrupted run's weights


def test_lora_runs_start_from_the_same_adapter_and_a_rerun_reuses_it(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("t2i.lora_rank=2", "t2i.output=lora", "forget.lr=1e-2")
    first = run_text_to_image(_small(tiny_world, tmp_path, *extra), tmp_path / "a")  # type: ignore[arg-type]
    torch.rand(3)  # the global generator moves on between the runs, as it does in a longer process
    run_text_to_image(_small(tiny_world, tmp_path, *extra), tmp_path / "b")  # type: ignore[arg-type]
    adapter = "forget_lora/pytorch_lora_weights.safetensors"
    a, b = load_file(tmp_path / "a" / adapter), load_file(tmp_path / "b" / adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the seed alone decides
    calls = _count_training(monkeypatch)
    again = run_text_to_image(_small(tiny_world, tmp_path, *extra), tmp_path / "a")  # type: ignore[arg-type]
    assert calls == [0, 0]  # the finished adapter is reused, loaded into the same peft layers
    assert (
        again["retention"] == first["retention"]
        and again["trained_parameters"] == first["trained_parameters"]
    )


def test_snapshots_are_the_model_at_their_steps_and_change_nothing(tiny_world: Path, tmp_path: Path) -> None:
    # an adapter merged into a pipeline output (the snapshot merges a copy) and an EMA (swapped in and out)
    extra = ("t2i.lora_rank=2", "forget.lr=1e-2", "forget.ema_decay=0.5")
    run_text_to_image(_small(tiny_world, tmp_path, *extra), tmp_path / "a")  # type: ignore[arg-type]
    cfg = _small(tiny_world, tmp_path, *extra, "forget.snapshot_every=2")
    run_text_to_image(cfg, tmp_path / "b")  # type: ignore[arg-type]
    plain, final = (TextToImageModel.from_pretrained(tmp_path / r / "forget").unet for r in "ab")
    snaps = {
        s: TextToImageModel.from_pretrained(tmp_path / "b" / "snapshots" / f"step-0000{s}").unet
        for s in (2, 4)
    }

    def same(x: torch.nn.Module, y: torch.nn.Module) -> bool:
        return all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters(), strict=True))

    assert same(plain, final)  # snapshots change nothing in the training
    assert same(snaps[4], final) and not same(snaps[2], final)
    assert not (tmp_path / "a" / "snapshots").exists()
