"""Each setting that carries a scale, pinned to a number computed by hand (docs/reference_settings.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selective_amnesia.config import load_config
from selective_amnesia.core.objective import EWCPenalty
from selective_amnesia.core.train import Trainer, make_optimizer
from selective_amnesia.core.trainable import select_trainable
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig
from selective_amnesia.models.diffusion import guide


def test_guidance_conventions_by_hand() -> None:
    eps_c, eps_null = torch.tensor([1.0]), torch.tensor([0.5])
    # reference: (1 + w) eps_c - w eps_null = 3 * 1 - 2 * 0.5 = 2.0; diffusers: 0.5 + 2 * (1 - 0.5) = 1.5
    assert guide(eps_c, eps_null, 2.0, "reference").item() == pytest.approx(2.0)
    assert guide(eps_c, eps_null, 2.0, "diffusers").item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="guidance_convention"):
        guide(eps_c, eps_null, 2.0, "other")


def _tiny_ddpm(**kw: object) -> ConditionalDDPM:
    cfg = DDPMConfig(
        image_size=8,
        channels=1,
        num_classes=3,
        block_out_channels=[8, 8],
        attention_levels=[False, False],
        layers_per_block=1,
        norm_num_groups=4,
        num_train_timesteps=20,
        num_inference_steps=4,
        **kw,  # type: ignore[arg-type]
    )
    torch.manual_seed(0)
    return ConditionalDDPM(cfg).eval()


def test_reference_guidance_w_is_diffusers_w_plus_one() -> None:
    ref = _tiny_ddpm(guidance_convention="reference", guidance_scale=1.0)
    ours = _tiny_ddpm(guidance_convention="diffusers", guidance_scale=2.0)
    cond = torch.tensor([0, 2])
    a = ref.sample(cond, generator=torch.Generator().manual_seed(1))
    b = ours.sample(cond, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-6)


def test_ddim_eta_adds_the_reference_noise() -> None:
    cond = torch.tensor([1])
    det = _tiny_ddpm()
    a = det.sample(cond, generator=torch.Generator().manual_seed(1))
    b = det.sample(cond, generator=torch.Generator().manual_seed(2))
    noisy = _tiny_ddpm(eta=1.0)
    c = noisy.sample(cond, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)  # eta = 1 draws fresh noise at every step
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="eta"):
        DDPMConfig(eta=1.5)


def test_ema_decay_is_constant_from_theta_star() -> None:
    # theta* = 1, one step to theta_1 = 1 - lr * sign(grad) = 0 (Adam's first step is lr * sign)
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    trainer = Trainer(
        model,
        lr=1.0,
        ema_decay=0.9,
        ema_warmup=False,
        grad_clip=None,
        generator=torch.Generator(),
        checkpoint_dir=None,
        checkpoint_every=0,
        key="",
    )
    trainer.step(model.weight.sum())
    assert model.weight.item() == pytest.approx(0.0, abs=1e-6)
    trainer.finish()
    # the reference's EMAHelper: 0.9 * theta* + 0.1 * theta_1 = 0.9 (diffusers' warm-up would give 0.0)
    assert model.weight.item() == pytest.approx(0.9, abs=1e-6)


def test_gradient_clipping_bounds_the_global_norm() -> None:
    model = nn.Linear(2, 1, bias=False)
    trainer = Trainer(
        model,
        lr=1.0,
        ema_decay=0.0,
        grad_clip=1.0,
        generator=torch.Generator(),
        checkpoint_dir=None,
        checkpoint_every=0,
        key="",
        optimizer="adam",
    )
    trainer.opt = torch.optim.SGD(trainer.params, lr=1.0)  # plain SGD: the step is the clipped gradient
    nn.init.zeros_(model.weight)
    # gradient of 3 w1 + 4 w2 is (3, 4), norm 5, clipped to norm 1: the step is -(0.6, 0.8)
    trainer.step((model.weight * torch.tensor([[3.0, 4.0]])).sum())
    assert torch.allclose(model.weight, torch.tensor([[-0.6, -0.8]]))


def test_ewc_value_and_direct_gradient_by_hand() -> None:
    theta = nn.Parameter(torch.tensor([1.0, 3.0]))
    penalty = EWCPenalty({"w": torch.tensor([2.0, 0.5])}, {"w": torch.tensor([0.0, 1.0])})
    value = penalty({"w": theta})
    # 2 * 1^2 + 0.5 * 2^2 = 4; gradient 2 F (theta - theta*) = (4, 2)
    assert value.item() == pytest.approx(4.0)
    (10 * value).backward()
    assert torch.allclose(theta.grad, torch.tensor([40.0, 20.0]))  # type: ignore[arg-type]


def test_ewc_anchor_in_bfloat16_rounds_only_storage() -> None:
    theta = nn.Parameter(torch.tensor([1.0]))
    penalty = EWCPenalty({"w": torch.tensor([1.0 / 3])}, {"w": torch.tensor([0.0])}, dtype=torch.bfloat16)
    assert penalty.fishers()[0].dtype == torch.bfloat16
    # F = 1/3 rounds to 0.333984375 in bfloat16; the sum is taken in float32
    assert penalty({"w": theta}).item() == pytest.approx(0.333984375)


def test_optimizers() -> None:
    w = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(w, "adam", 1e-3), torch.optim.Adam)
    adamw = make_optimizer(w, "adamw", 1e-3, 0.01, eps=1e-8 / 256)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01
    assert adamw.param_groups[0]["eps"] == 3.90625e-11
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(AmnesiaError, match="bitsandbytes"):
            make_optimizer(w, "adamw8bit", 1e-3)


def test_noxattn_freezes_what_the_reference_freezes() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    holder = nn.Module()
    holder.unet = unet
    chosen = set(select_trainable(holder, "non_cross_attention"))
    frozen = {n for n, _ in holder.named_parameters()} - chosen
    prefixes = {n.split(".")[1] for n in frozen}
    assert prefixes == {
        "time_embedding",
        "conv_norm_out",
        "conv_out",
        "down_blocks",
        "mid_block",
        "up_blocks",
    }
    blocks = ("down_blocks", "mid_block", "up_blocks")
    assert all(".attn2." in n for n in frozen if n.split(".")[1] in blocks)
    assert "unet.down_blocks.0.resnets.0.time_emb_proj.weight" in chosen  # LDM's emb_layers: trained


def test_paper_configs_carry_the_reference_settings() -> None:
    for name in ("ddpm_cifar10_paper", "ddpm_stl10_paper"):
        cfg = load_config(f"configs/{name}.yaml")
        d = cfg.model.ddpm
        assert (d.guidance_convention, d.guidance_scale, d.eta, d.num_inference_steps) == (
            "reference",
            2,
            1,
            1000,
        )
        f = cfg.forget
        assert (f.ema_decay, f.ema_warmup, f.grad_clip, f.optimizer, f.lr) == (
            0.9999,
            False,
            1.0,
            "adam",
            1e-4,
        )
        assert (f.ewc_lambda, f.reduction, cfg.model.ddpm.num_train_timesteps) == (10, "mean", 1000)
        assert f.adam_eps == 1e-8
    for name in ("sd_nudity", "sd_celebrity"):
        f = load_config(f"configs/{name}.yaml").forget
        assert (f.ewc_lambda, f.optimizer, f.weight_decay, f.grad_clip, f.reduction) == (
            50,
            "adamw",
            0.01,
            None,
            "mean",
        )
