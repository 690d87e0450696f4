"""What the paper-scale DDPM configs cost on this machine's accelerator (or CPU): one pretraining step,
one forgetting step, the Fisher per sample with each estimator, and guided sampling.

Projects the wall time of each stage from the config's step/sample counts. Prints JSON and writes it to
``--out``. Meant for a GPU:

    python benchmarks/ddpm_paper_scale.py --device cuda --out paper_scale.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from selective_amnesia.config import load_config
from selective_amnesia.io.artifacts import environment
from selective_amnesia.models import build_model_from_config

CONFIGS = ("configs/ddpm_cifar10_paper.yaml", "configs/ddpm_stl10_paper.yaml")


def timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(path: str, device: str, repeats: int) -> dict[str, Any]:
    cfg = load_config(path)
    torch.manual_seed(0)
    model = build_model_from_config(cfg.model).to(device)
    c = cfg.model.ddpm
    shape = (c.channels, c.image_size, c.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"config": path, "parameters": n_params, "device": device}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def train_step(batch: int, terms: int = 1) -> None:
        loss = torch.zeros((), device=device)
        for _ in range(terms):
            x = torch.rand(batch, *shape, generator=g).mul(2).sub(1).to(device)
            y = torch.randint(0, 10, (batch,), generator=g).to(device)
            loss = loss + model.nelbo(x, y, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    s = timed(lambda: train_step(cfg.pretrain.batch_size), device, repeats)
    out["pretrain_step_s"] = s
    out["pretrain_projected_h"] = s * cfg.pretrain.steps / 3600
    if device.startswith("cuda"):
        out["pretrain_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    s = timed(lambda: train_step(cfg.forget.batch_size, terms=2), device, repeats)
    out["forget_step_s"] = s  # both terms; the EWC sum is negligible beside two UNet passes
    out["forget_projected_h"] = s * cfg.forget.steps / 3600
    model.eval()

    x1 = torch.rand(1, *shape, generator=g).mul(2).sub(1).to(device)
    c1 = torch.zeros(1, dtype=torch.int64, device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def fisher_all() -> None:
        loss = model.nelbo_all_timesteps(x1, c1, chunk=cfg.fisher.timestep_chunk, generator=None).sum()
        torch.autograd.grad(loss, params)

    k = cfg.fisher.timesteps_per_sample

    def fisher_sub() -> None:  # two backward passes of K/2 timesteps, as the subsampled estimator does
        for _ in range(2):
            t = torch.randint(0, c.num_train_timesteps, (k // 2,), generator=g).to(device)
            eps = torch.randn(k // 2, *shape, generator=g).to(device)
            loss = model.eps_loss(x1.expand(k // 2, *shape), c1.expand(k // 2), t, eps).sum()
            torch.autograd.grad(loss, params)

    s_all = timed(fisher_all, device, max(1, repeats // 5), warmup=1)
    s_sub = timed(fisher_sub, device, repeats)
    out["fisher_all_timesteps_s_per_sample"] = s_all
    out["fisher_subsampled_s_per_sample"] = s_sub
    out["fisher_measured_speedup"] = s_all / s_sub
    out["fisher_all_timesteps_projected_h"] = s_all * cfg.fisher.num_samples / 3600
    out["fisher_subsampled_projected_h"] = s_sub * cfg.fisher.num_samples / 3600

    batch = 500
    cond = torch.randint(0, 10, (batch,), generator=g)
    steps = 20  # timed with fewer sampler steps, scaled to the config's count
    s = timed(lambda: model.sample(cond, generator=g, num_inference_steps=steps), device, 1, warmup=1)
    per_step = s / steps
    out["sample_500_guided_step_s"] = per_step
    n_replay = 9 * cfg.forget.replay_per_class
    n_eval = 2 * (cfg.evaluate.num_forget_samples + 9 * cfg.evaluate.num_per_class)  # base + forgotten
    per_image = per_step * c.num_inference_steps / batch
    out["replay_generation_projected_h"] = per_image * n_replay / 3600
    out["evaluation_sampling_projected_h"] = per_image * n_eval / 3600
    if device.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "results": [measure(p, args.device, args.repeats) for p in args.configs],
        "environment": environment(),
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
