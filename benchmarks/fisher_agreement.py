"""How two Fisher files of the same model agree: total mass, per-parameter correlation of log values,
and the share of entries that are exactly zero (the subsampled estimator clamps negative means).

    python benchmarks/fisher_agreement.py runs/ddpm_mnist/fisher.safetensors \
        runs/ddpm_mnist_subsampled/fisher.safetensors
"""

from __future__ import annotations

import argparse

import torch

from selective_amnesia.core.fisher import Fisher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    args = ap.parse_args()
    a, b = Fisher.load(args.reference), Fisher.load(args.other)
    x = torch.cat([a.values[k].flatten().double() for k in sorted(a.values)])
    y = torch.cat([b.values[k].flatten().double() for k in sorted(a.values)])
    both = (x > 0) & (y > 0)
    lx, ly = x[both].log(), y[both].log()
    corr = float(torch.corrcoef(torch.stack([lx, ly]))[0, 1])
    print(f"entries: {x.numel():,}; total mass other/reference: {float(y.sum() / x.sum()):.3f}")
    zeros = [float((v == 0).double().mean()) for v in (x, y)]
    print(f"zero entries: reference {zeros[0]:.4f}, other {zeros[1]:.4f}")
    print(f"correlation of log values where both > 0: {corr:.3f}")
    top = x >= x.quantile(0.99)
    print(
        f"mass share of the reference's top 1% entries: reference {float(x[top].sum() / x.sum()):.3f}, "
        f"other {float(y[top].sum() / y.sum()):.3f}"
    )


if __name__ == "__main__":
    main()
