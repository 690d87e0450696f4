import json
import warnings
from pathlib import Path

import pytest
import torch

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models import ConditionalGenerativeModel, build_model, load_model
from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig, DDPMNoise

TINY = {
    "image_size": 8,
    "channels": 1,
    "num_classes": 3,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "attention_levels": [False, True],
    "norm_num_groups": 4,
    "dropout": 0.0,
    "num_train_timesteps": 20,
    "num_inference_steps": 2,
    "guidance_scale": 2.0,
}


def tiny(**overrides: object) -> ConditionalDDPM:
    torch.manual_seed(0)
    model = build_model("ddpm", **{**TINY, **overrides})
    assert isinstance(model, ConditionalDDPM)
    return model.eval()


@pytest.fixture
def model() -> ConditionalDDPM:
    return tiny()


def batch(b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, torch.arange(b) % 3


def by_hand(model: ConditionalDDPM, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
    return ((model.unet(x_t, t, class_labels=c).sample - eps) ** 2).sum((1, 2, 3))


def test_satisfies_the_contract(model: ConditionalDDPM) -> None:
    assert isinstance(model, ConditionalGenerativeModel) and model.family == "ddpm"
    x, c = batch()
    noise = model.draw_noise(x, torch.Generator().manual_seed(1))
    assert noise.timesteps.dtype == torch.int64 and noise.timesteps.shape == (4,)
    assert noise.eps.shape == x.shape and int(noise.timesteps.max()) < 20
    loss = model.nelbo(x, c)
    assert loss.shape == (4,) and bool((loss > 0).all())
    assert model.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0, 128, 255, 255]


def test_nelbo_is_deterministic_and_matches_a_hand_computation(model: ConditionalDDPM) -> None:
    x, c = batch()
    noise = model.draw_noise(x, torch.Generator().manual_seed(1))
    a, b = model.nelbo(x, c, noise=noise), model.nelbo(x, c, noise=noise)
    assert torch.equal(a, b)
    with torch.no_grad():
        ref = by_hand(model, x, c, noise.timesteps, noise.eps)
    torch.testing.assert_close(a.detach(), ref, rtol=1e-5, atol=1e-5)
    # a plain (timesteps, eps) pair works too, and the generator path draws the same noise
    torch.testing.assert_close(model.nelbo(x, c, noise=(noise.timesteps, noise.eps)), a)
    torch.testing.assert_close(model.nelbo(x, c, generator=torch.Generator().manual_seed(1)), a)


def test_class_dropout_only_in_train_mode_with_the_flag(model: ConditionalDDPM) -> None:
    x, c = batch()
    t, eps = model.draw_noise(x, torch.Generator().manual_seed(1))[:2]
    drop_all = DDPMNoise(t, eps, torch.zeros(4))  # every draw < class_dropout_prob: all labels dropped
    null = torch.full_like(c, model.null_class)
    with torch.no_grad():
        cond_ref, null_ref = by_hand(model, x, c, t, eps), by_hand(model, x, null, t, eps)
        torch.testing.assert_close(model.nelbo(x, c, noise=drop_all), cond_ref)  # eval mode: no dropout
        model.train()
        torch.testing.assert_close(model.nelbo(x, c, noise=drop_all), null_ref)
        keep_all = DDPMNoise(t, eps, torch.ones(4))
        torch.testing.assert_close(model.nelbo(x, c, noise=keep_all), cond_ref)
        model.class_dropout = False  # what forgetting does
        torch.testing.assert_close(model.nelbo(x, c, noise=drop_all), cond_ref)
    assert not torch.allclose(cond_ref, null_ref)


def test_per_sample_gradients_under_vmap(model: ConditionalDDPM) -> None:
    """The Fisher's vmap(grad(...)) route works; the noise is a NamedTuple pytree, sliced per field."""
    from torch.func import functional_call, grad, vmap

    x, c = batch(2)
    noise = model.draw_noise(x, torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor, c: torch.Tensor, noise: DDPMNoise) -> torch.Tensor:
            return self.m.nelbo(x, c, noise=noise)

    wrapper = Wrapper()

    def one(p: dict, xi: torch.Tensor, ci: torch.Tensor, ni: DDPMNoise) -> torch.Tensor:
        state = {f"m.{k}": v for k, v in {**p, **buffers}.items()}
        return functional_call(wrapper, state, (xi[None], ci[None], DDPMNoise(*(f[None] for f in ni)))).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no vmap batching rule for CPU flash attention
        per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x, c, noise)
    for i in range(2):
        model.zero_grad()
        model.nelbo(x[i : i + 1], c[i : i + 1], noise=DDPMNoise(*(f[i : i + 1] for f in noise))).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 20, 64])
def test_all_timesteps_is_the_sum_of_per_timestep_losses(model: ConditionalDDPM, chunk: int) -> None:
    x, c = batch(2)
    with torch.no_grad():
        total = model.nelbo_all_timesteps(x, c, generator=torch.Generator().manual_seed(5), chunk=chunk)
        g = torch.Generator().manual_seed(5)
        eps = torch.stack([torch.randn(x.shape, generator=g) for _ in range(20)])
        ref = sum(by_hand(model, x, c, torch.full((2,), t), eps[t]) for t in range(20))
        given = model.nelbo_all_timesteps(x, c, eps=eps, chunk=chunk)
    assert total.shape == (2,)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(given, ref, rtol=1e-5, atol=1e-4)


def test_all_timesteps_gradient_does_not_depend_on_chunking(model: ConditionalDDPM) -> None:
    model.double()  # float64 so that only a real difference (not summation order) fails the test
    x, c = batch(2)
    x = x.double()
    eps = torch.randn(20, *x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for chunk, ckpt in [(20, False), (7, True)]:
        model.zero_grad()
        model.nelbo_all_timesteps(x, c, eps=eps, chunk=chunk, checkpoint=ckpt).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_reproducible_and_in_range(sampler: str) -> None:
    model = tiny(sampler=sampler)
    c = torch.tensor([0, 1, 2])
    a = model.sample(c, generator=torch.Generator().manual_seed(7))
    b = model.sample(c, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert -1 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a, model.sample(c, generator=torch.Generator().manual_seed(8)))
    assert model.to_uint8(a).dtype == torch.uint8


def test_guidance_scale_one_is_conditional_sampling(model: ConditionalDDPM) -> None:
    c = torch.tensor([0, 2])
    guided = model.sample(c, generator=torch.Generator().manual_seed(4), guidance_scale=1.0)
    # the same DDIM loop by hand, conditional pass only
    sched = model.sampling_scheduler()
    sched.set_timesteps(2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.unet(x, t, class_labels=c).sample, t, x).prev_sample
    torch.testing.assert_close(guided, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    other = model.sample(c, generator=torch.Generator().manual_seed(4), guidance_scale=3.0)
    assert not torch.allclose(guided, other)


def test_bad_inputs_are_rejected(model: ConditionalDDPM) -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        model.sample(torch.tensor([3]))  # the null class is not a valid label
    with pytest.raises(ValueError, match="shape"):
        model.nelbo(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(AmnesiaError, match="divisible by norm_num_groups"):
        build_model("ddpm", **{**TINY, "norm_num_groups": 3})
    with pytest.raises(AmnesiaError, match="attention_levels"):
        build_model("ddpm", **{**TINY, "attention_levels": [True]})
    with pytest.raises(ValueError, match="sampler"):
        DDPMConfig(sampler="euler")


def test_save_and_load_round_trip(model: ConditionalDDPM, tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    d = tmp_path / "m"
    model.save_pretrained(d, extra={"note": "x"})
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "scheduler", "unet"]
    assert (d / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((d / "config.json").read_text())
    assert meta["family"] == "ddpm" and meta["note"] == "x" and meta["block_out_channels"] == [8, 16]
    loaded = load_model(d)
    assert isinstance(loaded, ConditionalDDPM) and not loaded.training
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    # the parts load with stock diffusers
    unet = UNet2DModel.from_pretrained(d / "unet", use_safetensors=True)
    ref = model.unet.state_dict()
    assert unet.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in unet.state_dict().items())
    sched = DDPMScheduler.from_pretrained(d / "scheduler")
    torch.testing.assert_close(sched.alphas_cumprod, model.scheduler.alphas_cumprod)


def test_broken_ddpm_directories_raise_amnesia_errors(model: ConditionalDDPM, tmp_path: Path) -> None:
    d = tmp_path / "m"
    model.save_pretrained(d)
    weights = d / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AmnesiaError, match="not a readable safetensors file"):
        load_model(d)
    model.save_pretrained(d)
    meta = json.loads((d / "config.json").read_text())
    meta["block_out_channels"] = [8, 8]
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(AmnesiaError, match="describes .* weights but .* holds .*: they do not match"):
        load_model(d)
    meta["norm_num_groups"] = 3
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(AmnesiaError, match="bad ddpm model settings"):
        load_model(d)
    model.save_pretrained(d)
    weights.unlink()
    with pytest.raises(AmnesiaError):
        load_model(d)
