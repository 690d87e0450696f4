"""The diffusion Fisher: the paper's all-timesteps estimator against brute force, and the subsampled one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from selective_amnesia.core.fisher import Fisher
from selective_amnesia.core.fisher_diffusion import estimate_diffusion_fisher
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.ddpm import ConditionalDDPM, DDPMConfig
from tests.conftest import tiny_ddpm

LABELS = [0, 1, 2]
T = 6


def _tiny(dtype: torch.dtype = torch.float32) -> ConditionalDDPM:
    model: ConditionalDDPM = tiny_ddpm(num_train_timesteps=T).to(dtype)
    return model


@pytest.fixture(scope="module")
def model() -> ConditionalDDPM:
    return _tiny()


@pytest.fixture(scope="module")
def model64() -> ConditionalDDPM:
    return _tiny(torch.float64)


def _max_rel_err(a: Fisher, b: Fisher) -> float:
    """Largest element-wise |a - b| / |b| over entries of b above round-off of the whole Fisher's scale."""
    worst = 0.0
    scale = max(float(v.double().abs().max()) for v in b.values.values())
    for name, ref in b.values.items():
        ref64, got = ref.double(), a.values[name].double()
        mask = ref64.abs() > 1e-10 * scale
        if mask.any():
            worst = max(worst, float(((got - ref64).abs()[mask] / ref64.abs()[mask]).max()))
    return worst


def _mass(f: Fisher) -> float:
    return sum(float(v.double().sum()) for v in f.values.values())


def test_all_timesteps_equals_per_timestep_brute_force(model64: ConditionalDDPM) -> None:
    n, seed = 5, 3
    got = estimate_diffusion_fisher(model64, num_samples=n, labels=LABELS, seed=seed, progress=False)
    got.check_matches(model64)

    # the documented randomness, reproduced by hand: images from `seed`, then eps (T, 1, C, H, W) per
    # sample from `seed + 1`
    model64.eval()
    gen = torch.Generator().manual_seed(seed)
    cond = torch.tensor(LABELS)[torch.randint(len(LABELS), (n,), generator=gen)]
    x = model64.sample(cond, generator=gen)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    params = dict(model64.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(n):
        eps = torch.randn((T, 1, *model64.image_shape), generator=noise_gen, dtype=torch.float64)
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for t in range(T):  # one backward pass per timestep, summed: the definition
            loss = model64.eps_loss(x[i : i + 1], cond[i : i + 1], torch.tensor([t]), eps[t]).sum()
            for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                total[k] += g
        for k in acc:
            acc[k] += total[k].pow(2)
    ref = Fisher({k: v / n for k, v in acc.items()})
    assert _max_rel_err(got, ref) < 1e-5
    assert got.metadata["unet_image_evaluations"] == n * T
    assert got.metadata["estimator"] == "all_timesteps"


@pytest.mark.parametrize(("estimator", "k"), [("all_timesteps", 16), ("subsampled", 6)])
def test_result_does_not_depend_on_timestep_chunk(model64: ConditionalDDPM, estimator: str, k: int) -> None:
    runs = [
        estimate_diffusion_fisher(
            model64,
            num_samples=3,
            labels=LABELS,
            estimator=estimator,
            timesteps_per_sample=k,
            timestep_chunk=c,
            progress=False,
        )
        for c in (1, 6, 4)
    ]
    for other in runs[1:]:
        assert _max_rel_err(other, runs[0]) < 1e-9


def test_subsampled_is_deterministic_finite_and_matches_the_model(model: ConditionalDDPM) -> None:
    model.train()
    kw: dict[str, Any] = dict(num_samples=4, labels=LABELS, estimator="subsampled", timesteps_per_sample=4)
    a = estimate_diffusion_fisher(model, **kw, seed=1, progress=False)
    assert model.training  # mode restored
    b = estimate_diffusion_fisher(model, **kw, seed=1, progress=False)
    a.check_matches(model)  # names, shapes, finite, >= 0
    for name, v in a.values.items():
        assert torch.equal(v, b.values[name]), name
    c = estimate_diffusion_fisher(model, **kw, seed=2, progress=False)
    assert _mass(c) != _mass(a)
    m = a.metadata
    assert m["unet_image_evaluations"] == 4 * 4 and m["timesteps_per_sample"] == 4
    assert (
        m["num_train_timesteps"] == T
        and m["labels"] == LABELS
        and m["negative_mean_part_entries_clamped"] >= 0
    )


def test_subsampled_total_mass_is_close_to_all_timesteps(model: ConditionalDDPM) -> None:
    # Same images (same seed). At K=2 (c=6) a missing c^2 or c/2 factor moves the mass by ~2x; over
    # seeds 0..5 at N=48 the correct ratio stayed within [0.89, 1.16].
    full = estimate_diffusion_fisher(model, num_samples=48, labels=LABELS, progress=False)
    for k in (2, 4):
        sub = estimate_diffusion_fisher(
            model,
            num_samples=48,
            labels=LABELS,
            estimator="subsampled",
            timesteps_per_sample=k,
            progress=False,
        )
        assert 1 / 1.5 < _mass(sub) / _mass(full) < 1.5, k


class _LinearToy(nn.Module):
    """A "DDPM" whose per-row gradient is a_t + b_t * eps exactly: the expectations are closed-form."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        n_t, d = a.shape
        self.config = DDPMConfig(num_classes=2, num_train_timesteps=n_t, num_inference_steps=1)
        self.theta = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.a: Tensor
        self.b: Tensor
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.image_shape = (1, 1, d)

    def sample(self, cond: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return torch.zeros(cond.shape[0], *self.image_shape, dtype=torch.float64)

    def eps_loss(self, x: Tensor, cond: Tensor, timesteps: Tensor, eps: Tensor) -> Tensor:
        return (self.theta * (self.a[timesteps] + self.b[timesteps] * eps.flatten(1))).sum(1)


def test_subsampled_is_unbiased_on_an_analytic_case() -> None:
    # T=7, K=4: two strata of width c=3.5, so timestep 3 is shared (the non-divisible case).
    n_t, k = 7, 4
    c = n_t / (k // 2)
    a = torch.tensor(
        [[2.0, 2, 2, 2, 0, 0, -1], [0.5, 0, 1, 0.5, 2, 0, 1], [2.0, 2, 2, 2, 2, 2, 2]], dtype=torch.float64
    ).T
    b = torch.tensor([[1.0] * 7, [0.3, 1, 2, 0.5, 1, 1.5, 0.2], [0.5] * 7], dtype=torch.float64).T
    # paper: E[(sum_t g_t)^2] = (sum_t a_t)^2 + sum_t b_t^2; subsampled adds c * within-stratum variance
    # of a_t, with P(t | stratum i) = |[t, t+1) & [i c, (i+1) c)| / c
    paper = a.sum(0) ** 2 + b.pow(2).sum(0)
    spread = torch.zeros(3, dtype=torch.float64)
    for i in range(k // 2):
        p = torch.tensor(
            [max(0.0, min(t + 1, (i + 1) * c) - max(t, i * c)) / c for t in range(n_t)], dtype=torch.float64
        )
        mean = (p[:, None] * a).sum(0)
        spread += (p[:, None] * (a - mean) ** 2).sum(0)
    expected = paper + c * spread
    assert float(spread[2]) == 0 and float(spread[:2].min()) > 0  # a_t constant only in coordinate 2

    f = estimate_diffusion_fisher(
        _LinearToy(a, b),  # type: ignore[arg-type]
        num_samples=6000,
        labels=[0, 1],
        estimator="subsampled",
        timesteps_per_sample=k,
        progress=False,
    )
    got = f.values["theta"].double()
    # seeds 0..19 stayed within 3% (about 1.2% standard error at N=6000); a missing c^2 is >= 60% off
    # (coordinates 0-2), a (1/2) instead of (c/2) >= 12% off (coordinates 0-1)
    assert torch.allclose(got, expected, rtol=0.06), (got, expected, paper)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(estimator="exact"), "unknown diffusion Fisher estimator"),
        (dict(num_samples=0), "num_samples"),
        (dict(labels=[]), "at least one class"),
        (dict(labels=[0, 5]), "not classes"),
        (dict(timestep_chunk=0), "timestep_chunk"),
        (dict(estimator="subsampled", timesteps_per_sample=3), "even"),
        (dict(estimator="subsampled", timesteps_per_sample=0), "even"),
        (dict(estimator="subsampled", timesteps_per_sample=T + 2), "even"),
    ],
)
def test_bad_arguments_raise(model: ConditionalDDPM, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(num_samples=2, labels=LABELS, progress=False) | kwargs
    with pytest.raises(AmnesiaError, match=match):
        estimate_diffusion_fisher(model, **args)


def test_save_load_round_trip(model: ConditionalDDPM, tmp_path: Path) -> None:
    f = estimate_diffusion_fisher(
        model, num_samples=2, labels=LABELS, estimator="subsampled", timesteps_per_sample=2, progress=False
    )
    f.save(tmp_path / "fisher.safetensors")
    g = Fisher.load(tmp_path / "fisher.safetensors", model)
    assert g.metadata == f.metadata
    assert all(torch.equal(v, g.values[k]) for k, v in f.values.items())
    assert math.isfinite(_mass(g))


@pytest.mark.parametrize("estimator", ["all_timesteps", "subsampled"])
def test_processes_share_the_samples_and_sum_to_the_one_process_fisher(
    model: ConditionalDDPM, estimator: str
) -> None:
    """Two processes (simulated in turn): each takes every other sample; their summed parts equal the
    one-process estimate, because both draw the same images and noise in the same order."""
    kwargs: dict[str, Any] = dict(
        num_samples=5, labels=[0, 1, 2], estimator=estimator, seed=4, progress=False
    )
    kwargs["timesteps_per_sample"] = 4
    parts: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        parts.append(t.clone())
        return t

    estimate_diffusion_fisher(model, rank=1, world_size=2, reduce=keep, **kwargs)
    other = iter(parts)
    shared = estimate_diffusion_fisher(
        model, rank=0, world_size=2, reduce=lambda t: t + next(other), **kwargs
    )
    alone = estimate_diffusion_fisher(model, **kwargs)
    assert shared.metadata["processes"] == 2
    for name, v in alone.values.items():
        assert v.abs().sum() > 0
        assert torch.allclose(shared.values[name], v, rtol=1e-5, atol=1e-12), name
    with pytest.raises(AmnesiaError, match="reduce"):
        estimate_diffusion_fisher(model, rank=0, world_size=2, **kwargs)


def test_two_real_processes_write_the_one_process_fisher(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2` (as `accelerate launch` on GPUs): gloo sums the two halves."""
    import os
    import subprocess
    import sys

    from selective_amnesia.cli import main

    model_dir = tmp_path / "ddpm"
    tiny_ddpm(num_train_timesteps=10, num_classes=10).save_pretrained(model_dir)
    config = Path(__file__).resolve().parents[2] / "configs" / "ddpm_mnist_tiny.yaml"
    args = ["fisher", str(config), "--model", str(model_dir), "fisher.num_samples=4"]
    assert main([*args, "--out", str(tmp_path / "one.safetensors")]) == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "selective_amnesia.cli",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*torchrun, *args, "--out", str(tmp_path / "two.safetensors")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = Fisher.load(tmp_path / "one.safetensors"), Fisher.load(tmp_path / "two.safetensors")
    assert two.metadata["processes"] == 2 and "processes" not in one.metadata
    scale = max(float(v.abs().max()) for v in one.values.values())
    for name, v in one.values.items():  # summation order differs: tolerance relative to the Fisher's scale
        assert torch.allclose(two.values[name], v, rtol=1e-5, atol=1e-7 * scale), name
