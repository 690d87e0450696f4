"""Training-step time of candidate shapes for the MNIST text-to-image world (why the world is its size).

    OMP_NUM_THREADS=2 python benchmarks/t2i_world_sizes.py

Times one Adam step at batch 128 on 8x8x4 latents with 16 x 384 text embeddings for a few
UNet2DConditionModel shapes, and one VAE step on 16x16x1 images; prints parameters and seconds per step
(median of 3 after a warm-up), and the ratio to the chosen shape (run side by side in one process).
"""

from __future__ import annotations

import statistics
import time

import torch

from selective_amnesia.worlds.mnist_t2i import WorldConfig, build_components


def step_time(fn: object, repeats: int = 3) -> float:
    fn()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    shapes = {
        "chosen: 64/128, cross-attn at 4x4": WorldConfig(),
        "64/128, cross-attn at 8x8 and 4x4": WorldConfig(unet_cross_attention=[True, True]),
        "96/192, cross-attn at 8x8 and 4x4": WorldConfig(
            unet_channels=[96, 192], unet_cross_attention=[True, True]
        ),
    }
    x, text = torch.randn(128, 4, 8, 8), torch.randn(128, 16, 384)
    t = torch.randint(0, 1000, (128,))
    rows = []
    for name, cfg in shapes.items():
        vae, unet = build_components(cfg)
        opt = torch.optim.Adam(unet.parameters(), 1e-4)

        def unet_step(unet: torch.nn.Module = unet, opt: torch.optim.Optimizer = opt) -> None:
            loss = (unet(x, t, encoder_hidden_states=text).sample - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        rows.append((name, sum(p.numel() for p in unet.parameters()), step_time(unet_step)))
    vae, _ = build_components(WorldConfig())
    vopt = torch.optim.Adam(vae.parameters(), 1e-3)
    images = torch.rand(128, 1, 16, 16) * 2 - 1

    def vae_step() -> None:
        dist = vae.encode(images).latent_dist
        loss = (vae.decode(dist.sample()).sample - images).pow(2).mean() + 1e-5 * dist.kl().mean()
        vopt.zero_grad()
        loss.backward()
        vopt.step()

    rows.append(
        ("VAE 32/64 (16x16x1 <-> 8x8x4)", sum(p.numel() for p in vae.parameters()), step_time(vae_step))
    )
    base = rows[0][2]
    print(f"threads: {torch.get_num_threads()}")
    for name, n, s in rows:
        print(f"{name:40s} {n / 1e6:6.2f} M params  {s:6.3f} s/step  x{s / base:.2f}")


if __name__ == "__main__":
    main()
