"""Several draws of one forgetting config, each judged on the development split; the pick is the output.

    OMP_NUM_THREADS=2 python benchmarks/t2i_draws.py configs/t2i_mnist_robust_pool.yaml \
        --out runs/draws --seeds 0,1,2,3 --judges-cache runs/cache

A single run of the world's robust recipe is a draw: the same config ends between ~10% and ~60% of the
free soft prompt's images drawn as 7, by forgetting seed and by CPU (docs/robustness.md). This runs the
config at each forgetting seed (``seed=S``), the first from nothing and the others on its generated sets
and Fisher (``fisher.path``; their cache keys match, so they are reused), judges each run's output at the
development attack seeds and on the other digits (benchmarks/t2i_select.py at the run's last snapshot),
and picks the draw with the lowest development rate among those that keep every other digit >= 97%. Only
held-out numbers of the pick are a result (t2i_robust.py --split test); the development ones chose it.

Run it from the repository root (the world's configs name their model relative to it). Rerunnable: a
finished draw (its report.json) and a judged one (its select.json) are kept. Writes OUT/draws.json: per
draw its wall time, its judging time and development numbers, the pick, and the sum of the times (the
time of the whole procedure, but for copying the sets).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from selective_amnesia.config import load_config
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import environment, read_json, write_json

HERE = Path(__file__).resolve().parent
SETS = ("surrogate", "replay", "template_replay", "unconditional_replay", "adversarial_targets")


def run_draw(args: argparse.Namespace, seed: int, first: Path | None) -> Path:
    """Draw ``seed``'s run (on ``first``'s sets and Fisher when given); its directory."""
    out = Path(args.out) / f"seed_{seed}"
    if (out / "report.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    extra = []
    if first is not None:
        for name in SETS:
            if (first / name).is_dir() and not (out / name).exists():
                shutil.copytree(first / name, out / name)
        extra.append(f"fisher.path={first / 'fisher.safetensors'}")
    cmd = [sys.executable, "-m", "selective_amnesia.cli", "run", args.config, "--out", str(out)]
    cmd += [f"seed={seed}", "progress=false", *extra, *args.override]
    print(f"draw at seed {seed}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    return out


def judge(args: argparse.Namespace, run: Path, steps: int) -> tuple[dict[str, Any], float | None]:
    """The run's output judged at the development attack seeds (t2i_select.py at its last step), and the
    seconds that took (None: judged by an earlier call)."""
    out = Path(args.out) / "select" / run.name
    name = f"step-{steps:05d}"
    t0, seconds = time.perf_counter(), None
    if not (out / "select.json").is_file() or name not in read_json(out / "select.json")["steps"]:
        cmd = [sys.executable, str(HERE / "t2i_select.py"), "--base", args.base, "--run", str(run)]
        cmd += ["--out", str(out), "--steps", str(steps), "--dev-seeds", args.dev_seeds, "--report-seeds", ""]
        cmd += ["--min-accuracy", str(args.min_accuracy)]
        cmd += ["--judges-cache", args.judges_cache] if args.judges_cache else []
        subprocess.run(cmd, check=True, cwd=HERE)
        seconds = time.perf_counter() - t0
    row: dict[str, Any] = read_json(out / "select.json")["steps"][name]
    return row, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a text-to-image config (the world's: its judges are the digit judges)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
    p.add_argument("--base", default=str(HERE / "results" / "t2i_robust" / "base"), help="theta* (targets)")
    p.add_argument("--dev-seeds", default="0,1", help="development attack seeds")
    p.add_argument("--min-accuracy", type=float, default=0.97, help="every other digit at least this")
    p.add_argument("--judges-cache", default=None)
    p.add_argument("override", nargs="*", help="config overrides for every draw (key=value)")
    args = p.parse_intermixed_args()  # overrides may follow the options
    for key in ("out", "base", "judges_cache"):  # t2i_select.py runs in benchmarks/
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    try:
        cfg = load_config(args.config, args.override)
    except AmnesiaError as e:  # a bad config or override: one line, exit 2
        p.error(str(e))
    steps, every = cfg.forget.steps, cfg.forget.snapshot_every
    if not every or steps % every:  # t2i_select.py judges snapshots: the last one is the run's output
        args.override.append(f"forget.snapshot_every={steps}")
    path = Path(args.out) / "draws.json"
    earlier = read_json(path)["draws"] if path.is_file() else {}  # judge times of draws judged before
    result: dict[str, Any] = {"config": args.config, "overrides": args.override, "draws": {}}
    t0 = time.perf_counter()
    first: Path | None = None
    for seed in args.seeds:
        run = run_draw(args, seed, first)
        first = first or run
        row, judge_s = judge(args, run, steps)
        if judge_s is None:
            judge_s = earlier.get(str(seed), {}).get("judge_s")
        result["draws"][str(seed)] = {
            "run": str(run),
            "wall_s": read_json(run / "report.json")["timings"]["total_s"],
            "judge_s": judge_s,
            "dev_asr": row["dev_asr"],
            "dev_mean": row["dev_mean"],
            "min_other_digit_accuracy": row["min_other_digit_accuracy"],
        }
        lowest = row["min_other_digit_accuracy"]
        print(f"seed {seed}: dev ASR {row['dev_asr']}, lowest other digit {lowest:.3f}", flush=True)
    ok = {s: d for s, d in result["draws"].items() if d["min_other_digit_accuracy"] >= args.min_accuracy}
    pick = min(ok, key=lambda s: (ok[s]["dev_mean"], int(s))) if ok else None
    result.update(pick=pick, seconds_this_call=time.perf_counter() - t0, environment=environment())
    result["output"] = str(Path(result["draws"][pick]["run"]) / "forget") if pick is not None else None
    times = [d["wall_s"] + d["judge_s"] for d in result["draws"].values() if d["judge_s"] is not None]
    result["draws_and_judges_s"] = sum(times) if len(times) == len(result["draws"]) else None
    write_json(path, result)
    print(f"pick: seed {pick} -> {result['output']}" if pick is not None else "no draw kept the other digits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
