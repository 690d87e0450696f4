from pathlib import Path

import pytest
import torch

from selective_amnesia.core.fisher import Fisher, estimate_fisher, supports_batched
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models import build_model

LABELS = list(range(10))


def _max_rel_err(a: Fisher, b: Fisher) -> float:
    """Largest element-wise |a - b| / |b| over entries not lost to round-off in b.

    Round-off is judged against the whole Fisher's scale: some entries are exactly zero in exact
    arithmetic (e.g. an attention key bias, to which softmax is invariant) and hold only noise.
    """
    worst = 0.0
    scale = max(float(v.double().abs().max()) for v in b.values.values())
    for name, ref in b.values.items():
        ref64, got = ref.double(), a.values[name].double()
        mask = ref64.abs() > 1e-12 * scale
        if not mask.any():
            continue
        worst = max(worst, float(((got - ref64).abs()[mask] / ref64.abs()[mask]).max()))
    return worst


@pytest.fixture
def model64() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cvae", hidden_dims=[24, 12], latent_dim=3).double()


def test_batched_and_vmap_equal_the_one_sample_loop(model64: torch.nn.Module) -> None:
    assert supports_batched(model64)
    loop = estimate_fisher(model64, num_samples=40, labels=LABELS, estimator="loop", progress=False)
    for est in ("batched", "vmap"):
        fast = estimate_fisher(
            model64, num_samples=40, labels=LABELS, estimator=est, chunk_size=16, progress=False
        )
        assert _max_rel_err(fast, loop) < 1e-4, est
        assert _max_rel_err(fast, loop) < 1e-9, est  # float64: the same numbers, not just close


def test_float32_batched_matches_loop_within_1e_4() -> None:
    torch.manual_seed(1)
    model = build_model("cvae", hidden_dims=[64, 32], latent_dim=4)
    loop = estimate_fisher(model, num_samples=64, labels=LABELS, estimator="loop", progress=False)
    fast = estimate_fisher(model, num_samples=64, labels=LABELS, estimator="batched", progress=False)
    for name in loop.values:
        ref = loop.values[name]
        assert float((fast.values[name] - ref).abs().max() / ref.abs().max()) < 1e-4, name


def test_result_does_not_depend_on_chunk_size(model64: torch.nn.Module) -> None:
    a = estimate_fisher(model64, num_samples=300, labels=LABELS, chunk_size=7, progress=False)
    b = estimate_fisher(model64, num_samples=300, labels=LABELS, chunk_size=300, progress=False)
    assert _max_rel_err(a, b) < 1e-9


def test_fisher_is_the_mean_of_squared_per_sample_gradients(model64: torch.nn.Module) -> None:
    """Not the square of the batch-mean gradient (Avalanche's estimator), which shrinks with batch size."""
    f = estimate_fisher(model64, num_samples=50, labels=LABELS, progress=False)
    g = torch.Generator().manual_seed(0)
    x = model64.sample(torch.zeros(50, dtype=torch.int64), generator=g)
    loss = model64.nelbo(x, torch.zeros(50, dtype=torch.int64), generator=g).mean()
    (grad,) = torch.autograd.grad(loss, [model64.decoder[-1].bias])
    assert float(f.values["decoder.4.bias"].sum()) > 5 * float(grad.pow(2).sum())


def test_save_load_with_metadata_and_checks(model64: torch.nn.Module, tmp_path: Path) -> None:
    f = estimate_fisher(model64, num_samples=20, labels=LABELS, seed=3, progress=False)
    f.save(tmp_path / "f.safetensors")
    g = Fisher.load(tmp_path / "f.safetensors", model64)
    assert (
        g.metadata["num_samples"] == 20 and g.metadata["seed"] == 3 and g.metadata["estimator"] == "batched"
    )
    assert len(g.metadata["model_hash"]) == 16
    other = build_model("cvae", hidden_dims=[8], latent_dim=2)
    with pytest.raises(AmnesiaError, match="does not match"):
        Fisher.load(tmp_path / "f.safetensors", other)
    bad = Fisher({k: v.clone() for k, v in f.values.items()}, f.metadata)
    bad.values["to_mu.bias"][0] = float("nan")
    with pytest.raises(AmnesiaError, match="NaN"):
        bad.check_matches(model64)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(AmnesiaError, match="safetensors"):
        Fisher.load(tmp_path / "bad.safetensors")


def test_bad_arguments(model64: torch.nn.Module) -> None:
    with pytest.raises(AmnesiaError, match="estimator"):
        estimate_fisher(model64, num_samples=2, labels=LABELS, estimator="exact", progress=False)
    with pytest.raises(AmnesiaError):
        estimate_fisher(model64, num_samples=0, labels=LABELS, progress=False)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func has no SDPA batching rule
def test_estimators_agree_on_a_tiny_diffusion_model() -> None:
    """Tuple noise (timesteps, eps, dropout draw) goes through the loop and vmap estimators alike."""
    torch.manual_seed(0)
    model = build_model(
        "ddpm",
        image_size=8,
        channels=1,
        num_classes=3,
        block_out_channels=[8, 16],
        layers_per_block=1,
        attention_levels=[False, False],
        norm_num_groups=4,
        num_train_timesteps=20,
        num_inference_steps=2,
    ).double()
    assert not supports_batched(model)
    kw = dict(num_samples=6, labels=[0, 1, 2], progress=False)
    loop = estimate_fisher(model, estimator="loop", **kw)
    fast = estimate_fisher(model, estimator="batched", chunk_size=4, **kw)  # falls back to vmap
    assert fast.metadata["estimator"] == "vmap"
    assert _max_rel_err(fast, loop) < 1e-9
