"""The ESD and UCE baselines (``method: esd | uce``): settings, what they train, their equations, and
``amnesia run`` writing a stock pipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_amnesia.baselines.esd import (
    esd_loss,
    esd_target,
    sample_until,
    timestep_interval,
    train_esd,
)
from selective_amnesia.baselines.uce import closed_form_edit, edit_rows, keep_rows, uce_edit
from selective_amnesia.config import EsdConfig, UceConfig, load_config
from selective_amnesia.core.trainable import NOXATTN_FROZEN
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.conditioning import HIDDEN, unet_kwargs
from selective_amnesia.models.text_to_image import TextToImageModel

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten 7", "the number seven"]


def _changed(before: TextToImageModel, after: TextToImageModel) -> set[str]:
    b = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, b[n])}


# ---- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=lora", "method must be one of"),
        ("esd.variant=xu", "esd.variant must be x or u"),
        ("esd.lr=0", "esd.lr must be > 0"),
        ("esd.ddim_steps=1", "esd.ddim_steps must be >= 2"),
        ("esd.negative_guidance=-1", "esd.negative_guidance"),
        ("uce.tokens=all", "uce.tokens must be tail or last"),
        ("uce.lamb=-0.1", "uce.lamb must be >= 0"),
        ("uce.preserve_scale=-1", "uce.preserve_scale"),
    ],
)
def test_bad_baseline_settings(override: str, message: str) -> None:
    with pytest.raises(AmnesiaError, match=message):
        load_config(REPO / "configs" / "t2i_mnist.yaml", [override])


def test_baselines_need_a_text_to_image_model() -> None:
    with pytest.raises(AmnesiaError, match="method=esd .* needs model.family: text_to_image"):
        load_config(None, ["method=esd"])
    assert load_config(None).method == "sa"
    cfg = load_config(REPO / "configs" / "t2i_mnist_esd_u.yaml")
    assert (cfg.method, cfg.esd.variant) == ("esd", "u")
    assert load_config(REPO / "configs" / "t2i_mnist_uce.yaml").method == "uce"
    paper = EsdConfig()  # the paper's settings are the defaults
    assert (paper.lr, paper.iterations, paper.batch_size, paper.negative_guidance) == (1e-5, 1000, 1, 1.0)
    assert (paper.start_guidance, paper.ddim_steps) == (3.0, 50)
    assert (UceConfig().lamb, UceConfig().erase_scale, UceConfig().tokens) == (0.5, 1.0, "tail")


# ---- ESD -----------------------------------------------------------------------------------------


def _esd(world: Path, variant: str) -> tuple[TextToImageModel, TextToImageModel, list[float]]:
    base = TextToImageModel.from_pretrained(world)
    model = copy.deepcopy(base)
    cfg = EsdConfig(variant=variant, iterations=2, lr=1e-3, ddim_steps=3, batch_size=2, log_every=1)
    history = train_esd(model, base, PROMPTS, cfg, seed=1)
    return base, model, history.loss


@pytest.mark.parametrize("variant", ["x", "u"])
def test_esd_trains_only_its_weights(tiny_world: Path, variant: str) -> None:
    base, model, losses = _esd(tiny_world, variant)
    changed = _changed(base, model)
    names = {n for n, _ in base.named_parameters()}
    if variant == "x":  # ESD-x: every cross-attention weight, nothing else
        assert changed == {n for n in names if ".attn2." in n}
    else:  # ESD-u: the reference's noxattn set, no cross-attention weight
        assert changed == {n for n in names if NOXATTN_FROZEN.search(n) is None}
        assert not any(".attn2." in n or "time_embedding" in n for n in changed)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not any(p.requires_grad for p in model.parameters())
    # the frozen theta* did not move, and a rerun with the same seed gives the same weights
    assert not _changed(TextToImageModel.from_pretrained(tiny_world), base)
    _, again, _ = _esd(tiny_world, variant)
    assert not _changed(model, again)


def test_esd_loss_is_the_papers_equation(tiny_world: Path) -> None:
    frozen = TextToImageModel.from_pretrained(tiny_world)
    model = copy.deepcopy(frozen)
    with torch.no_grad():  # a model that differs from theta*, as during training
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn((3, *model.image_shape), generator=gen)
    t, eta = 437, 1.7
    concept = model.encode_prompts(["a handwritten 7"])
    loss = esd_loss(model, frozen, x_t, t, concept, eta)

    def out(m: TextToImageModel, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = unet_kwargs({k: v.expand(3, *v.shape[1:]) for k, v in embeds.items()})
        return m.unet(x_t, torch.full((3,), t), **kwargs).sample.detach()

    e_null, e_c = out(frozen, frozen.null_embeds), out(frozen, concept)
    target = e_null - eta * (e_c - e_null)  # Eq. 2, by hand
    expected = ((out(model, concept) - target) ** 2).mean()  # Eq. 3
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(esd_target(e_null, e_c, eta), target)
    loss.backward()  # the gradient reaches the trained model only
    assert all(p.grad is None for p in frozen.parameters())


def test_esd_sampling_and_timesteps(tiny_world: Path) -> None:
    model = TextToImageModel.from_pretrained(tiny_world)
    noise = torch.randn((2, *model.image_shape), generator=torch.Generator().manual_seed(0))
    concept = model.encode_prompts(["a handwritten 7"])
    assert torch.equal(sample_until(model, concept, 0, 4, 3.0, noise), noise)  # no step: pure noise
    # all steps: what the model's own DDIM sampler gives for the same noise (one image: sample() draws
    # it from a per-image generator)
    model.set_sampler("ddim", 4, 3.0)
    one = torch.randn((1, *model.image_shape), generator=torch.Generator().manual_seed(5))
    ours = sample_until(model, concept, 4, 4, 3.0, one)
    ids = model.prompt_ids(["a handwritten 7"])
    assert torch.allclose(ours, model.sample(ids, generator=[torch.Generator().manual_seed(5)]), atol=1e-5)
    # the DDIM steps' DDPM intervals tile [0, T) as the authors' t_enc_ddpm does
    bins = [timestep_interval(k, 50, 1000) for k in range(50)]
    assert bins[0] == (0, 20) and bins[-1] == (980, 1000)
    assert all(a[1] == b[0] for a, b in zip(bins, bins[1:], strict=False))


# ---- UCE -----------------------------------------------------------------------------------------


def test_uce_closed_form_is_the_least_squares_solution() -> None:
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, n, m = 12, 7, 3, 4
    w_old = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    c_e = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    c_t = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    c_p = torch.randn(m, d_in, generator=gen, dtype=torch.float64)
    v_e = c_t @ w_old.T  # v*_i = W* c*_i
    lamb, s_e, s_p = 0.3, 1.0, 0.5
    w = closed_form_edit(w_old, c_e, v_e, c_p, lamb=lamb, erase_scale=s_e, preserve_scale=s_p)
    # the objective lam ||W - W*||^2 + s_e sum ||W c_i - v*_i||^2 + s_p sum ||W c_j - W* c_j||^2 as one
    # stacked least-squares problem, solved directly
    a = torch.cat([lamb**0.5 * torch.eye(d_in, dtype=torch.float64), s_e**0.5 * c_e, s_p**0.5 * c_p])
    b = torch.cat([lamb**0.5 * w_old.T, s_e**0.5 * v_e, s_p**0.5 * c_p @ w_old.T])
    direct = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(w, direct, atol=1e-10)
    # with a vanishing regulariser and fewer constraints than dimensions both maps hold exactly
    w = closed_form_edit(w_old, c_e, v_e, c_p, lamb=1e-9, erase_scale=1.0, preserve_scale=1.0)
    assert torch.allclose(c_e @ w.T, c_t @ w_old.T, atol=1e-6)  # W c_i = W* c_target
    assert torch.allclose(c_p @ w.T, c_p @ w_old.T, atol=1e-6)  # W c_j = W* c_j
    with pytest.raises(AmnesiaError, match="singular"):
        closed_form_edit(w_old, c_e, v_e, c_p, lamb=0.0, erase_scale=1.0, preserve_scale=1.0)


def test_uce_edits_only_cross_attention_keys_and_values(tiny_world: Path) -> None:
    base = TextToImageModel.from_pretrained(tiny_world)
    model = copy.deepcopy(base)
    kept = ["a handwritten 3", "the number five"]
    c_e, c_t = edit_rows(model, "a handwritten 7", "a handwritten 1", "tail")
    assert c_e.shape == c_t.shape and c_e.shape[0] >= 2  # the last word and what follows it
    result = uce_edit(model, ["a handwritten 7"], "a handwritten 1", kept, UceConfig(lamb=1e-4))
    changed = _changed(base, model)
    assert changed == {n for n, _ in base.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert result.kept_rows == 3 * base.tokenizer.model_max_length  # "", and the two kept prompts
    c_p = keep_rows(base, ["", *kept], "tail")
    edited = dict(model.unet.named_modules())
    for name, module in base.unet.named_modules():
        if name.endswith("attn2.to_v"):
            w_old, w_new = module.weight.double(), edited[name].weight.double()
            moved = (c_e @ w_new.T - c_t @ w_old.T).norm() / (c_e @ w_old.T - c_t @ w_old.T).norm()
            assert moved < 0.1  # the concept's tokens now give the target's values
            assert (c_p @ w_new.T - c_p @ w_old.T).norm() / (c_p @ w_old.T).norm() < 0.1
    assert result.concept_residual < 0.1 and result.kept_residual < 0.1
    only_last = copy.deepcopy(base)
    uce_edit(only_last, ["a handwritten 7"], "", kept, UceConfig(tokens="last", edit_keys=False))
    assert all(".attn2.to_v." in n for n in _changed(base, only_last))
    assert model.encode_prompts(["x"])[HIDDEN].dtype == torch.float32


# ---- amnesia run ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("t2i_mnist_esd_x.yaml", ["esd.iterations=2", "esd.ddim_steps=3"]),
        ("t2i_mnist_uce.yaml", []),
    ],
)
def test_amnesia_run_writes_a_stock_pipeline(
    tiny_sd: Path, tmp_path: Path, config: str, extra: list[str]
) -> None:
    from diffusers import StableDiffusionPipeline

    from selective_amnesia.cli import main

    replay = tmp_path / "replay.txt"
    replay.write_text("a handwritten 3\na handwritten 7\nthe number five\n")  # the concept's line is dropped
    out = tmp_path / "run"
    argv = ["run", str(REPO / "configs" / config), "--out", str(out), "--no-progress"]
    code = main(
        [
            *argv,
            f"t2i.model={tiny_sd}",
            f"t2i.replay_prompts={replay}",
            "t2i.retention_per_prompt=1",
            "t2i.num_inference_steps=2",
            *extra,
        ]
    )
    assert code == 0
    report = (out / "report.json").read_text()
    assert '"retention"' in report and '"total_s"' in report
    pipe = StableDiffusionPipeline.from_pretrained(out / "forget")
    image = pipe("a handwritten 7", num_inference_steps=2, output_type="pt").images  # type: ignore[operator]
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    assert (
        main(
            [
                "sample",
                "--model",
                str(out / "forget"),
                "--prompt",
                "a handwritten 7",
                "--num-per-label",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "s.npz"),
                "--no-progress",
            ]
        )
        == 0
    )
    base, after = TextToImageModel.from_pretrained(tiny_sd), TextToImageModel.from_pretrained(out / "forget")
    changed = _changed(base, after)
    assert changed and all(".attn2." in n for n in changed)


def test_run_without_a_surrogate_and_refused_settings(tiny_world: Path, tmp_path: Path) -> None:
    from selective_amnesia.pipeline.t2i import run_text_to_image

    replay = tmp_path / "replay.txt"
    replay.write_text("a handwritten 3\nthe number five\n")
    base = [
        f"t2i.model={tiny_world}",
        "progress=false",
        "t2i.retention_per_prompt=1",
        f"t2i.replay_prompts={replay}",
    ]
    esd = [*base, "t2i.surrogate_prompt=null", "esd.iterations=2", "esd.ddim_steps=2"]
    cfg = load_config(REPO / "configs" / "t2i_mnist_esd_u.yaml", esd)
    report = run_text_to_image(cfg, tmp_path / "esd")  # ESD remaps to nothing: no surrogate needed
    assert report["method"] == "esd-u" and report["replay_prompts"] == 2
    assert len(report["history"]["loss"]) == 2 and report["timings"]["esd_s"] > 0
    assert report["environment"]["cpu"] and report["torch_threads"] >= 1
    assert (tmp_path / "esd" / "forget" / "model_index.json").is_file()
    uce = load_config(REPO / "configs" / "t2i_mnist_uce.yaml", [*base, "t2i.surrogate_prompt=null"])
    report = run_text_to_image(uce, tmp_path / "uce")  # target "": the authors' default for objects
    assert report["settings"]["target"] == "" and report["edit"]["kept_rows"] == 3 * 16  # "", 2 prompts
    for extra, message in [
        (["t2i.lora_rank=4", "t2i.output=lora"], "writes a full pipeline"),
        (["t2i.surrogate_prompt=null", f"t2i.surrogate_path={tmp_path}"], "maps the concept to a prompt"),
    ]:
        with pytest.raises(AmnesiaError, match=message):
            run_text_to_image(load_config(REPO / "configs" / "t2i_mnist_uce.yaml", [*base, *extra]), tmp_path)
