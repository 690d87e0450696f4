"""Average the UNet weights of a forgetting run's snapshots (a uniform "soup" of its late steps).

    python benchmarks/t2i_soup.py --run runs/candidates/s0 --steps 500-1000 --out runs/soups/s0_500

The question it answers (docs/robustness.md, session 27): the adversarial pool makes the soft-prompt rate
swing between snapshots 250 steps apart, so the last step is a draw; is the mean of the late weights,
which no single step's attack shaped, steadier? The output is the last chosen snapshot's pipeline
directory with its UNet replaced by the mean, so t2i_select.py and t2i_robust.py judge it as any snapshot
(write it as OUT/snapshots/step-NNNNN with --as-snapshot to use t2i_select.py unchanged). Only the UNet is
trained in these runs; the script stops if any other component differs between the snapshots.

Several --run directories (forgetting draws from the same theta*) average all their snapshots in the range
together (session 29: a soup across draws):

    python benchmarks/t2i_soup.py --run runs/s0 runs/s3 --steps 500-1000 --out runs/soups/s0s3_500
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel


def steps_of(run: Path, spec: str) -> list[Path]:
    """The snapshots of ``run`` whose step lies in ``spec`` ("500-1000", both ends included)."""
    lo, hi = (int(x) for x in spec.split("-"))
    found = [
        p
        for p in sorted((run / "snapshots").glob("step-*"))
        if lo <= int(p.name.split("-")[1]) <= hi and (p / "model_index.json").is_file()  # complete ones
    ]
    if not found:
        raise SystemExit(f"no complete snapshot of {run} lies in steps {spec}")
    return found


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, nargs="+", help="one run, or several draws")
    p.add_argument("--steps", required=True, help='an inclusive range of snapshot steps, "500-1000"')
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--as-snapshot", action="store_true", help="write OUT/snapshots/step-<last>")
    args = p.parse_args()
    snaps = [s for run in args.run for s in steps_of(run, args.steps)]
    for part in ("text_encoder", "vae"):
        if (snaps[0] / part).is_dir() and len({digest(s / part) for s in snaps}) > 1:
            raise SystemExit(f"{part} differs between snapshots; this soup averages the UNet only")
    total: dict[str, torch.Tensor] = {}
    for s in snaps:
        unet = UNet2DConditionModel.from_pretrained(s / "unet")  # the last one loaded carries the mean
        for k, v in unet.state_dict().items():
            total[k] = total.get(k, torch.zeros_like(v, dtype=torch.float64)) + v.double()
    unet.load_state_dict({k: (v / len(snaps)).float() for k, v in total.items()})
    out = args.out / "snapshots" / snaps[-1].name if args.as_snapshot else args.out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(snaps[-1], out, ignore=shutil.ignore_patterns("unet", "model_index.json"))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    shutil.copy(snaps[-1] / "model_index.json", out)  # last: the directory is complete once it exists
    runs = f", {len(args.run)} runs" if len(args.run) > 1 else ""
    print(f"mean of {len(snaps)} snapshots ({snaps[0].name} .. {snaps[-1].name}{runs}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
