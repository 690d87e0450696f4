"""Forgetting settings side by side, from one fixed base model, sharing every stage they can.

All variants run in one directory: the base model's evaluation, the Fisher and the replay set are made
once and reused (the pipeline reuses any stage whose settings did not change), so each further variant
costs one forgetting run and one evaluation. Prints one line per variant and writes ``OUT/sweep.json``.

    python benchmarks/ddpm_sweep.py --base runs/ddpm_mnist/base --out runs/sweep \
        --variant default= --variant ema_off=forget.ema_decay=0 --variant w4=evaluate.guidance_scale=4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from selective_amnesia.config import load_config
from selective_amnesia.io.artifacts import environment, write_json
from selective_amnesia.pipeline.classes import run_pipeline

METRICS = ("p_forget", "entropy", "fraction_forget", "remembered_accuracy", "fid", "precision", "recall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ddpm_mnist.yaml")
    ap.add_argument("--base", required=True, help="base model directory (theta*)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--variant", action="append", required=True, help="NAME=key.sub=value,key.sub=value (may be empty)"
    )
    ap.add_argument("--set", action="append", default=[], help="override applied to every variant")
    args = ap.parse_args()
    out = Path(args.out)
    results: list[dict[str, Any]] = []
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(",") if o]
        cfg = load_config(
            args.config,
            [
                f"pretrain.model_path={args.base}",
                f"device={args.device}",
                "forget.checkpoint_every=0",
                "progress=false",
                *args.set,
                *overrides,
            ],
        )
        start = time.perf_counter()
        report = run_pipeline(cfg, out)
        row: dict[str, Any] = {
            "variant": name,
            "overrides": overrides,
            "seconds": time.perf_counter() - start,
        }
        for model in ("base", "forget"):
            m = report["metrics"][model]
            row[model] = {k: m.get(k) for k in METRICS} | {f"{k}_std": m.get(f"{k}_std") for k in METRICS[:3]}
        row["fisher"] = {
            k: report["fisher"].get(k) for k in ("estimator", "seconds", "unet_image_evaluations")
        }
        row["timings"] = report["timings"]
        row["final_loss_terms"] = {k: v[-1] for k, v in report["loss_history"]["terms"].items()}
        results.append(row)
        f, b = row["forget"], row["base"]
        print(
            f"{name}: P(c_f) {b['p_forget']:.3f}->{f['p_forget']:.3f} entropy {f['entropy']:.2f} "
            f"acc {b['remembered_accuracy']:.3f}->{f['remembered_accuracy']:.3f} "
            f"FID {b['fid']:.2f}->{f['fid']:.2f} ({row['seconds']:.0f}s) losses {row['final_loss_terms']}",
            flush=True,
        )
        write_json(
            out / "sweep.json",
            {
                "results": results,
                "command": " ".join(["python benchmarks/ddpm_sweep.py", *__import__("sys").argv[1:]]),
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "environment": environment(),
            },
        )


if __name__ == "__main__":
    main()
