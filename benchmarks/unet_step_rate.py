"""Training steps a second of a world's UNet alone (forward, backward, Adam) at one batch, on one device.

What bounds a forgetting step on a machine: on this 2-core CPU the UNet's arithmetic, on a GPU the
launches of its many small kernels (the world's latents are 4 x 8 x 8), so that several runs side by
side share one GPU almost for free. Run one copy, or N at once and add their rates.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/unet_step_rate.py \
        --world benchmarks/results/t2i_robust/base --device cpu     # prints a JSON object as its last line
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from selective_amnesia.io.artifacts import environment, read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="a pipeline directory: its unet/config.json is used")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="the forgetting batch of the world's configs")
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    config = read_json(Path(args.world) / "unet" / "config.json")
    unet = UNet2DConditionModel.from_config(config).to(args.device)  # the architecture; weights don't matter
    opt = torch.optim.Adam(unet.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)
    size, width = config["sample_size"], config["cross_attention_dim"]
    x = torch.randn(args.batch, config["in_channels"], size, size, generator=gen).to(args.device)
    text = torch.randn(args.batch, 16, width, generator=gen).to(args.device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)

    def step() -> None:
        unet(x, t, text).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(5):  # warm-up
        step()
    sync()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.seconds:
        step()
        n += 1
    sync()
    rate = n / (time.perf_counter() - t0)
    threads = torch.get_num_threads()
    out = {"device": args.device, "batch": args.batch, "steps_per_s": rate, "threads": threads}
    print(json.dumps(out | {"environment": environment()}))


if __name__ == "__main__":
    main()
