"""Collect a finished `amnesia run configs/ddpm_mnist.yaml` into benchmarks/results/ddpm_mnist/.

Writes ``result.json`` (the metrics, the issue's targets and whether each is met, the stage times and
the command) and copies the base and forgotten model directories (stock diffusers layout, ~4 MB each),
so that anyone can re-sample and re-evaluate without retraining:

    python benchmarks/ddpm_mnist_result.py runs/ddpm_mnist
    amnesia sample --model benchmarks/results/ddpm_mnist/forget --labels 0 --num-per-label 500 \
        --seed 1 --out f.npz
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from selective_amnesia.io.artifacts import read_json, write_json

DEST = Path("benchmarks/results/ddpm_mnist")


def targets(base: dict[str, Any], forget: dict[str, Any], total_s: float) -> dict[str, Any]:
    """The issue's done-when checks, each with its measured value."""
    checks = {
        "total_minutes <= 90": (total_s / 60, total_s / 60 <= 90),
        "P(c_f) <= 0.15": (forget["p_forget"], forget["p_forget"] <= 0.15),
        "entropy >= 1.8 nats": (forget["entropy"], forget["entropy"] >= 1.8),
        "base remembered accuracy >= 0.90": (
            base["remembered_accuracy"],
            base["remembered_accuracy"] >= 0.90,
        ),
        "remembered accuracy within 3 points of base": (
            forget["remembered_accuracy"] - base["remembered_accuracy"],
            base["remembered_accuracy"] - forget["remembered_accuracy"] <= 0.03,
        ),
        "FID <= 1.25x base": (forget["fid"] / base["fid"], forget["fid"] <= 1.25 * base["fid"]),
    }
    return {k: {"value": round(v, 4), "met": bool(ok)} for k, (v, ok) in checks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the run directory of `amnesia run configs/ddpm_mnist.yaml`")
    ap.add_argument(
        "--command",
        default="OMP_NUM_THREADS=1 amnesia run configs/ddpm_mnist.yaml --out runs/ddpm_mnist",
        help="the command that made the run (recorded in result.json)",
    )
    ap.add_argument(
        "--keep-previous",
        default=None,
        help="save the result.json being replaced under this name in the same folder first",
    )
    args = ap.parse_args()
    report = read_json(args.run / "report.json")
    base, forget = report["metrics"]["base"], report["metrics"]["forget"]
    if args.keep_previous and (DEST / "result.json").is_file():
        shutil.copy(DEST / "result.json", DEST / args.keep_previous)
    result = {
        "command": args.command,
        "machine": "2-core x86_64 CPU, torch 2.13.0+cpu; one torch thread, another job on the other core",
        "targets": targets(base, forget, report["timings"]["total_s"]),
        "timings_s": report["timings"],
        "metrics": {"base": base, "forget": forget},
        "fisher": report["fisher"],
        "config": report["config"],
        "environment": report["environment"],
    }
    DEST.mkdir(parents=True, exist_ok=True)
    write_json(DEST / "result.json", result)
    shutil.copy(args.run / "before_after.png", DEST / "before_after.png")
    # a run that reused the committed base (pretrain.model_path) has no base/ of its own: keep that one
    for name in [n for n in ("base", "forget") if (args.run / n).is_dir()]:
        if (DEST / name).exists():
            shutil.rmtree(DEST / name)
        shutil.copytree(args.run / name, DEST / name, ignore=shutil.ignore_patterns("checkpoint", "replay"))
    for k, v in result["targets"].items():
        print(f"{'met    ' if v['met'] else 'NOT MET'}  {k}: {v['value']}")


if __name__ == "__main__":
    main()
