"""The diffusion core (models/diffusion.py) on a toy adapter, and the model contract (models/base.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from selective_amnesia.models import ConditionalDiffusionModel, ConditionalGenerativeModel
from selective_amnesia.models.ddpm import ConditionalDDPM
from selective_amnesia.models.diffusion import DDPMNoise, DiffusionModel, check_sampler_settings, guide
from selective_amnesia.models.text_to_image import TextToImageModel
from tests.conftest import tiny_ddpm

T = 10
SCHEDULE = {"num_train_timesteps": T, "beta_start": 1e-3, "beta_end": 0.2, "beta_schedule": "linear"}


class Toy(DiffusionModel):
    """The smallest adapter: a 1x1 conv plus a per-class offset, on 1x4x4 images; class 3 is null."""

    family = "toy"

    def __init__(self, prediction_type: str = "epsilon", loss_entries: str = "sum") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(
            num_classes=3, num_train_timesteps=T, sampler="ddim", num_inference_steps=4, guidance_scale=2.0
        )
        self.unet = nn.Conv2d(1, 1, 1)
        self.offset = nn.Embedding(4, 1)
        self.loss_entries = loss_entries
        self._set_schedule({**SCHEDULE, "prediction_type": prediction_type, "clip_sample": False})

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 4, 4)

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        t = timesteps.float().expand(x_t.shape[0]).view(-1, 1, 1, 1)
        return self.unet(x_t) * (1 + t / T) + self.offset(cond).view(-1, 1, 1, 1)

    def _guided_pair(self, cond: Tensor, device: torch.device, dtype: torch.dtype) -> object:
        both = torch.cat([cond, torch.full_like(cond, 3)])

        def pair(x2: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            out_c, out_null = self.predict(x2, t, both).chunk(2)
            return out_c, out_null

        return pair

    @staticmethod
    def _check_cond(cond: Tensor) -> None:
        if cond.dtype != torch.int64 or cond.dim() != 1:
            raise ValueError("cond must be int64 (B,)")

    def check_labels(self, cond: Tensor) -> None:
        self._check_cond(cond)
        if cond.numel() and int(cond.max()) >= 3:
            raise ValueError("no such class")


def _batch(b: int = 4) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 1, 4, 4, generator=torch.Generator().manual_seed(3)), torch.arange(b) % 3


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("loss_entries", ["sum", "mean"])
def test_loss_is_the_schedulers_noising_and_target(prediction_type: str, loss_entries: str) -> None:
    model = Toy(prediction_type, loss_entries)
    x, c = _batch()
    t, eps = torch.tensor([0, 3, 7, 9]), torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    x_t = model.scheduler.add_noise(x, eps, t)
    target = eps if prediction_type == "epsilon" else model.scheduler.get_velocity(x, eps, t)
    err = (model.predict(x_t, t, c) - target).pow(2).flatten(1)
    want = err.sum(1) if loss_entries == "sum" else err.mean(1)
    torch.testing.assert_close(model.eps_loss(x, c, t, eps), want)
    # nelbo with explicit noise is exactly eps_loss; without, it draws that noise from the generator
    assert torch.equal(model.nelbo(x, c, noise=DDPMNoise(t, eps)), model.eps_loss(x, c, t, eps))
    assert torch.equal(model.nelbo(x, c, noise=(t, eps)), model.eps_loss(x, c, t, eps))
    drawn = model.draw_noise(x, torch.Generator().manual_seed(5))
    assert torch.equal(
        model.nelbo(x, c, generator=torch.Generator().manual_seed(5)), model.nelbo(x, c, noise=drawn)
    )
    # the abar buffers follow the module but are not in the state dict
    assert {n for n, _ in model.named_buffers()} == {"sqrt_abar", "sqrt_one_minus_abar"}
    assert not any("abar" in k for k in model.state_dict())


def test_noise_draws_timesteps_then_eps() -> None:
    model = Toy()
    x, _ = _batch()
    noise = model.draw_noise(x, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(noise.timesteps, torch.randint(0, T, (4,), generator=g))
    assert torch.equal(noise.eps, torch.randn(x.shape, generator=g))
    assert noise.drop is None  # only the DDPM draws a label-dropout value
    t = model.antithetic_timesteps(5, torch.Generator().manual_seed(2))
    assert t.shape == (5,) and torch.equal(t[3:], T - 1 - t[:2])
    f, r = model.paired_noise(x, x[:3], torch.Generator().manual_seed(2))
    assert r is not None and torch.equal(f.timesteps[:3], r.timesteps)
    assert not torch.equal(f.eps[:3], r.eps)
    alone, none = model.paired_noise(x, None, torch.Generator().manual_seed(2))
    assert none is None and torch.equal(alone.eps, f.eps)


def test_all_timestep_elbo_is_the_sum_over_t_whatever_the_chunk() -> None:
    model = Toy()
    x, c = _batch(2)
    eps = torch.randn(T, *x.shape, generator=torch.Generator().manual_seed(6))
    by_t = sum(model.eps_loss(x, c, torch.full((2,), t), eps[t]) for t in range(T))
    for chunk in (1, 3, T):
        torch.testing.assert_close(model.nelbo_all_timesteps(x, c, eps=eps, chunk=chunk), by_t)
    a = model.nelbo_all_timesteps(x, c, generator=torch.Generator().manual_seed(7), chunk=4)
    b = model.nelbo_all_timesteps(x, c, generator=torch.Generator().manual_seed(7), chunk=T)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="eps must have shape"):
        model.nelbo_all_timesteps(x, c, eps=eps[:3])
    with pytest.raises(ValueError, match="expected images"):
        model.nelbo(x[:, :, :2], c)


def test_guided_sampling_per_image_seeds_and_the_null_half() -> None:
    model = Toy().eval()
    c = torch.tensor([0, 2])
    both = model.sample(c, generator=_gens(1, 2))
    assert both.shape == (2, 1, 4, 4) and float(both.abs().max()) <= 1  # clamped to data_range
    torch.testing.assert_close(model.sample(c[1:], generator=_gens(2))[0], both[1])  # batch-independent
    # w = 0 is the unconditional output alone: the class does not matter; w > 0 it does
    g0 = model.sample(torch.tensor([0]), generator=_gens(3), guidance_scale=0.0)
    assert torch.equal(g0, model.sample(torch.tensor([2]), generator=_gens(3), guidance_scale=0.0))
    assert not torch.equal(model.sample(torch.tensor([0]), generator=_gens(3)), g0)
    model.clamp_samples = False
    assert float(model.sample(c, generator=_gens(1, 2), guidance_scale=30.0).abs().max()) > 1
    with pytest.raises(ValueError, match="num_inference_steps"):
        model.sample(c, num_inference_steps=T + 1)
    with pytest.raises(ValueError, match="no such class"):
        model.sample(torch.tensor([3]))


def test_sampling_schedulers_share_the_training_schedule() -> None:
    model = Toy()
    for name, cls in (("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler")):
        s = model.sampling_scheduler(name)
        assert type(s).__name__ == cls
        assert torch.equal(s.alphas_cumprod, model.scheduler.alphas_cumprod)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.sampling_scheduler("euler")
    good = SimpleNamespace(sampler="ddim", num_inference_steps=5, num_train_timesteps=10, guidance_scale=1.0)
    check_sampler_settings(good)
    for bad, match in (
        ({"sampler": "x"}, "sampler"),
        ({"num_inference_steps": 11}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
    ):
        with pytest.raises(ValueError, match=match):
            check_sampler_settings(SimpleNamespace(**{**vars(good), **bad}))
    assert guide(torch.tensor(1.0), torch.tensor(0.0), 2.0, "reference").item() == 3.0


def test_forgetting_turns_label_dropout_off_and_restores_it() -> None:
    model = tiny_ddpm()
    assert isinstance(model, ConditionalDDPM)
    x, c = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4) % 3
    t, eps, _ = model.draw_noise(x, torch.Generator().manual_seed(1))
    drop_all = DDPMNoise(t, eps, torch.zeros(4))
    model.train()
    with torch.no_grad():
        dropped = model.nelbo(x, c, noise=drop_all)
        with model.forgetting():
            assert model.class_dropout is False
            kept = model.nelbo(x, c, noise=drop_all)
        assert model.class_dropout is True
        assert torch.equal(kept, model.eps_loss(x, c, t, eps)) and not torch.equal(kept, dropped)
    with pytest.raises(RuntimeError), model.forgetting():
        raise RuntimeError
    assert model.class_dropout is True
    with Toy().forgetting():  # nothing to switch off elsewhere
        pass


def test_adapters_share_the_core() -> None:
    """The diffusion machinery is the core's in both adapters (only the DDPM adds its dropout draw)."""
    shared = ("eps_loss", "nelbo", "nelbo_all_timesteps", "paired_noise", "sampling_scheduler", "sample")
    for cls in (ConditionalDDPM, TextToImageModel):
        assert all(getattr(cls, name) is getattr(DiffusionModel, name) for name in shared), cls
    assert TextToImageModel.draw_noise is DiffusionModel.draw_noise


def test_every_family_satisfies_the_contract(tiny_cvae: nn.Module, tmp_path: Path) -> None:
    from selective_amnesia.worlds.tiny_sd import build_tiny_sd

    t2i = TextToImageModel.from_pretrained(build_tiny_sd("sd1", tmp_path / "sd1"))
    ddpm = tiny_ddpm()
    for model in (tiny_cvae, ddpm, t2i):
        assert isinstance(model, ConditionalGenerativeModel), type(model)
        assert isinstance(model.config.num_classes, int) and len(model.image_shape) == 3
        with model.forgetting():
            pass
    assert isinstance(ddpm, ConditionalDiffusionModel) and isinstance(t2i, ConditionalDiffusionModel)
    assert not isinstance(tiny_cvae, ConditionalDiffusionModel)
    assert (tiny_cvae.per_image_seeds, ddpm.per_image_seeds, t2i.per_image_seeds) == (False, True, True)
    assert (tiny_cvae.loss_entries, ddpm.loss_entries, t2i.loss_entries) == ("sum", "sum", "mean")
    assert t2i.config.num_classes == 0 and t2i.prompt_ids(["a cat"]).tolist() == [0]
    assert t2i.config.num_classes == 1  # the prompt table is the condition set
