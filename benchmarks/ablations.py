"""The paper's ablations on the default MNIST pipeline, from one base model and one Fisher.

Runs the full SA objective and three ablations (naive objective of Eq. 3, lambda=0 without EWC,
gamma=0 without replay) with ``amnesia run``'s code, reusing the base model and Fisher of an existing
run directory, and prints a table plus a JSON object as its last line.

    .venv/bin/amnesia run --out runs/mnist_cvae          # once (make run does this)
    .venv/bin/python benchmarks/ablations.py --base-run runs/mnist_cvae --out benchmarks/results/ablations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selective_amnesia.config import load_config
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.pipeline.classes import run_pipeline

VARIANTS = {
    "SA (full objective)": [],
    "naive objective (Eq. 3)": ["forget.objective=naive"],
    # the naive term is unbounded below and diverges at the default length; stopped early it can be scored
    "naive objective, 400 steps": ["forget.objective=naive", "forget.steps=400"],
    "no EWC (lambda=0)": ["forget.ewc_lambda=0"],
    "no replay (gamma=0)": ["forget.replay_weight=0"],
}
KEYS = ("p_forget", "frac_classified_forget", "entropy", "remembered_accuracy", "fid", "precision", "recall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-run", required=True, help="run dir with base/ and fisher.safetensors")
    ap.add_argument("--config", default=None, help="config of that run (default: the built-in defaults)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every variant")
    args = ap.parse_args()
    base = Path(args.base_run)
    common = [
        f"pretrain.model_path={base / 'base'}",
        f"fisher.path={base / 'fisher.safetensors'}",
        "progress=false",
        *args.overrides,
    ]
    rows = {}
    for name, extra in VARIANTS.items():
        slug = name.split(" (")[0].replace(" ", "_").replace(",", "")
        cfg = load_config(args.config, [*common, *extra])
        try:
            report = run_pipeline(cfg, Path(args.out) / slug)
        except AmnesiaError as e:  # divergence is a result here, not a crash
            rows[name] = {"overrides": extra, "diverged": str(e)}
            continue
        rows[name] = {
            "overrides": extra,
            **{k: report["metrics"]["forget"][k] for k in KEYS},
            "forget_s": report["timings"]["forget_s"],
        }
        rows.setdefault("base model", {"overrides": [], **{k: report["metrics"]["base"][k] for k in KEYS}})
    print("| variant | P(c_f) | classified as c_f | entropy | remembered acc. | FID | precision | recall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = ["diverged"] * len(KEYS) if "diverged" in r else [f"{r[k]:.4f}" for k in KEYS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablations.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
