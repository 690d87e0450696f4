"""Training steps a second of a world's UNet alone (forward, backward, Adam) at one batch, on one device.

What bounds a forgetting step on a machine: on this 2-core CPU the UNet's arithmetic, on a GPU the
launches of its many small kernels (the world's latents are 4 x 8 x 8), so that several runs side by
side share one GPU almost for free. Run one copy, or N at once and add their rates.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/unet_step_rate.py \
        --world benchmarks/results/t2i_robust/base --device cpu     # prints a JSON object as its last line

``--compile`` times the same step through ``torch.compile`` (inductor) as well, in the same process,
alternating with the eager step one step at a time (both train the same weights), and reports the ratio
and the compile time.
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
    ap.add_argument("--compile", action="store_true", help="also torch.compile's step, side by side")
    args = ap.parse_args()
    config = read_json(Path(args.world) / "unet" / "config.json")
    unet = UNet2DConditionModel.from_config(config).to(args.device)  # the architecture; weights don't matter
    opt = torch.optim.Adam(unet.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)
    size, width = config["sample_size"], config["cross_attention_dim"]
    x = torch.randn(args.batch, config["in_channels"], size, size, generator=gen).to(args.device)
    text = torch.randn(args.batch, 16, width, generator=gen).to(args.device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)

    def step(net: torch.nn.Module) -> None:
        net(x, t, text).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    nets: dict[str, torch.nn.Module] = {"eager": unet}
    out: dict[str, object] = {"device": args.device, "batch": args.batch, "threads": torch.get_num_threads()}
    if args.compile:
        nets["compiled"] = torch.compile(unet)  # the same module: the same parameters and optimizer
        t0 = time.perf_counter()
        step(nets["compiled"])  # compiles forward and backward
        sync()
        out["compile_s"] = time.perf_counter() - t0
    for net in nets.values():  # warm-up
        for _ in range(5):
            step(net)
    sync()
    seconds = dict.fromkeys(nets, 0.0)
    steps = dict.fromkeys(nets, 0)
    block = 10  # steps between syncs: a GPU's queue stays full, as in a run
    while sum(seconds.values()) < args.seconds * len(nets):
        for name, net in nets.items():  # alternate blocks, so that a busy moment hits both
            t0 = time.perf_counter()
            for _ in range(block):
                step(net)
            sync()
            seconds[name] += time.perf_counter() - t0
            steps[name] += block
    rates = {name: steps[name] / seconds[name] for name in nets}
    out["steps_per_s"] = rates["eager"]
    if args.compile:
        out["compiled_steps_per_s"] = rates["compiled"]
        out["compiled_over_eager"] = rates["compiled"] / rates["eager"]
    print(json.dumps(out | {"environment": environment()}))


if __name__ == "__main__":
    main()
