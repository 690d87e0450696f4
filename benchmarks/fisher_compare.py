"""The paper's all-timestep diffusion Fisher vs our subsampled one: cost, and forgetting with each.

Runs the pipeline from a fixed base model once per (estimator, seed): the seed changes the Fisher's
samples and noise, the replay set, the forgetting run and the evaluation samples, so the spread over
seeds is the run-to-run noise the two estimators are compared against. Prints a table and writes
``OUT/fisher_compare.json``.

    python benchmarks/fisher_compare.py --base runs/ddpm_mnist/base --out runs/fisher_compare \
        --seeds 0 1 2 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from selective_amnesia.config import load_config
from selective_amnesia.io.artifacts import environment, write_json
from selective_amnesia.pipeline.classes import run_pipeline

METRICS = ("p_forget", "entropy", "remembered_accuracy", "fid", "precision", "recall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ddpm_mnist.yaml")
    ap.add_argument("--base", required=True, help="base model directory (theta*)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=["all_timesteps", "subsampled"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a key.sub=value override")
    args = ap.parse_args()
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    for estimator in args.estimators:
        for seed in args.seeds:
            cfg = load_config(
                args.config,
                [
                    f"pretrain.model_path={args.base}",
                    f"seed={seed}",
                    f"fisher.estimator={estimator}",
                    f"device={args.device}",
                    "forget.checkpoint_every=0",
                    "progress=false",
                    *args.overrides,
                ],
            )
            start = time.perf_counter()
            report = run_pipeline(cfg, out / f"{estimator}_seed{seed}")
            row = {
                "estimator": estimator,
                "seed": seed,
                "fisher_seconds": report["timings"]["fisher_s"],
                "fisher_unet_image_evaluations": report["fisher"]["unet_image_evaluations"],
                "run_seconds": round(time.perf_counter() - start, 1),
                **{f"forget_{k}": report["metrics"]["forget"][k] for k in METRICS},
                **{f"base_{k}": report["metrics"]["base"][k] for k in METRICS},
            }
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            save(out, args, rows)  # after every run, so a cut-off batch keeps what it finished
    summary = save(out, args, rows)
    print(f"\n| estimator | Fisher s | UNet image evals | {' | '.join(METRICS)} (forgotten model) |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for estimator, s in summary.items():
        cells = [f"{s['forget_' + k][0]:.3f} ± {s['forget_' + k][1]:.3f}" for k in METRICS]
        print(
            f"| {estimator} | {s['fisher_seconds'][0]:.1f} | {s['fisher_unet_image_evaluations'][0]:.0f} | "
            + " | ".join(cells)
            + " |"
        )


def save(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation per estimator; written with the rows and the command."""
    summary: dict[str, Any] = {}
    for estimator in args.estimators:
        mine = [r for r in rows if r["estimator"] == estimator]
        if not mine:
            continue
        summary[estimator] = {
            k: (
                statistics.fmean(r[k] for r in mine),
                statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0,
            )
            for k in mine[0]
            if k not in ("estimator", "seed")
        }
    command = [f"--config {args.config}", f"--base {args.base}", f"--out {args.out}", "--seeds"]
    command += [str(s) for s in args.seeds] + ["--estimators", *args.estimators, "--device", args.device]
    write_json(
        out / "fisher_compare.json",
        {
            "rows": rows,
            "summary": summary,
            "command": "python benchmarks/fisher_compare.py " + " ".join(command + args.overrides),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch_threads": torch.get_num_threads(),
            "environment": environment(),
        },
    )
    return summary


if __name__ == "__main__":
    main()
