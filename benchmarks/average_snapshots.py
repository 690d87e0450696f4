"""Average the UNet weights of a run's snapshots (stochastic weight averaging, after the fact).

    python benchmarks/average_snapshots.py --out runs/swa/snapshots/step-01500 \
        RUN/snapshots/step-00500 RUN/snapshots/step-00750 ... RUN/forget

Each input is a stock pipeline directory (a snapshot of forget.snapshot_every, or the forgotten model).
The output is a copy of the last one with its UNet replaced by the uniform average (accumulated in
float64, written in the inputs' dtype), so t2i_select.py and `amnesia attack` load it as any snapshot.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


def average(dirs: list[Path]) -> dict[str, torch.Tensor]:
    """The uniform average of the UNet weights in ``dirs``, in the first one's dtypes."""
    first = load_file(dirs[0] / UNET)
    total = {k: v.double() for k, v in first.items()}
    for d in dirs[1:]:
        for k, v in load_file(d / UNET).items():
            total[k] += v.double()
    return {k: (v / len(dirs)).to(first[k].dtype).contiguous() for k, v in total.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the averaged pipeline directory (must not exist)")
    p.add_argument("dirs", nargs="+", help="pipeline directories to average")
    args = p.parse_args()
    dirs, out = [Path(d) for d in args.dirs], Path(args.out)
    missing = [str(d) for d in dirs if not (d / UNET).is_file()]
    if missing or out.exists():
        p.error(f"no {UNET} in {missing}" if missing else f"{out} exists; choose a new --out")
    weights = average(dirs)
    shutil.copytree(dirs[-1], out)
    save_file(weights, out / UNET, metadata={"format": "pt"})
    print(f"{out}: the average of {len(dirs)} UNets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
