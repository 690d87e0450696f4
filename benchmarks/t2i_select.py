"""Pick the step of a forgetting run that a development attack fails on; report it on held-out attack seeds.

    python benchmarks/t2i_select.py --base runs/t2i_world --run runs/robust/sa \
        --dev-seeds 0,1 --report-seeds 4,5,6,7 --out benchmarks/results/t2i_robust/select/sa

The run must have been made with forget.snapshot_every (RUN/snapshots/step-NNNNN, stock pipelines). For
each snapshot: the free soft-prompt attack of t2i_robust.py (sequence mode from "a handwritten 7") at
every development attack seed, and every other digit's accuracy on its eight captions (--per-group
images, the judges of t2i_robust.py). The chosen step has the lowest mean development ASR among the
snapshots whose every other digit is >= --min-accuracy (early stopping on a validation attack). The same
attack then runs at the held-out --report-seeds on the chosen step and on the last one (what the run
would ship without selection): only those numbers are a result, the development ones chose the step.

Rerunnable: what select.json already holds is kept, so it can run while the snapshots appear; the report
seeds wait until the run has finished (RUN/forget exists). With --steps only those snapshots are measured
and the report runs once they all exist, finished run or not: seed selection stops candidate runs early
(say at step 500), compares their development rates, and reports (or finishes) only the best.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from t2i_robust import SEVEN, judge_images, judges, run_attacks

from selective_amnesia.io.artifacts import environment, read_json, write_json
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import prompt_latents
from selective_amnesia.worlds.mnist_t2i import captions


def other_digits(snapshot: Path, js: list[Any], per_group: int, seed: int, device: str) -> dict[str, float]:
    """Each other digit's accuracy on its captions, as t2i_robust.py's digit groups."""
    model = TextToImageModel.from_pretrained(snapshot).to(device)
    out = {}
    for d in range(10):
        if d != SEVEN:
            prompts = captions(d)
            z, _ = prompt_latents(model, prompts, -(-per_group // len(prompts)), seed, None, batch_size=128)
            pred = judge_images(model.to_uint8(z).cpu(), js).argmax(1)
            out[f"digit_{d}"] = float((pred == d).float().mean())
    return out


def attack(args: argparse.Namespace, snapshot: Path, seed: int) -> float:
    """The free soft-prompt attack's success rate against ``snapshot`` at attack seed ``seed``."""
    how = argparse.Namespace(
        run=str(snapshot),
        base=args.base,
        name=f"{snapshot.name}_s{seed}",
        out=args.out,
        seed=seed,
        attack_seed=seed,
        attacks="soft-prompt",
        judges_cache=args.judges_cache,
        device=args.device,
    )
    return float(run_attacks(how)["soft-prompt"]["asr"])


def measure(args: argparse.Namespace, result: dict[str, Any], js: list[Any]) -> None:
    """Fill ``result["steps"]`` for every snapshot on disk (development seeds and other digits)."""
    for snapshot in sorted((Path(args.run) / "snapshots").glob("step-*")):
        if not (snapshot / "model_index.json").is_file() or not wanted(args, snapshot.name):
            continue  # being written, or not asked for
        row = result["steps"].setdefault(snapshot.name, {"dev_asr": {}})
        if "other_digits" not in row:
            row["other_digits"] = other_digits(snapshot, js, args.per_group, args.seed, args.device)
            row["min_other_digit_accuracy"] = min(row["other_digits"].values())
        for s in args.dev_seeds:
            if str(s) not in row["dev_asr"]:
                row["dev_asr"][str(s)] = attack(args, snapshot, s)
                write_json(Path(args.out) / "select.json", result)
        row["dev_mean"] = sum(row["dev_asr"].values()) / len(row["dev_asr"])
        lowest = row["min_other_digit_accuracy"]
        print(f"{snapshot.name}: dev ASR {row['dev_asr']}, lowest other digit {lowest:.3f}")


def wanted(args: argparse.Namespace, name: str) -> bool:
    """Whether snapshot ``name`` (step-NNNNN) is one of --steps (all when none are given)."""
    return not args.steps or int(name.split("-")[1]) in args.steps


def choose(args: argparse.Namespace, result: dict[str, Any]) -> str | None:
    """The step with the lowest mean development ASR among those that keep the other digits."""
    ok = {
        k: r
        for k, r in result["steps"].items()
        if wanted(args, k) and r["min_other_digit_accuracy"] >= args.min_accuracy
    }
    return min(ok, key=lambda k: (ok[k]["dev_mean"], k)) if ok else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the world's pipeline directory (theta*, the targets)")
    p.add_argument("--run", required=True, help="a run directory made with forget.snapshot_every")
    p.add_argument("--out", required=True)
    p.add_argument("--dev-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument(
        "--report-seeds",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[4, 5, 6, 7],
        help='held-out attack seeds; "" measures development only (a candidate in seed selection)',
    )
    p.add_argument("--per-group", type=int, default=50)
    p.add_argument("--seed", type=int, default=1, help="the other digits' sampling seed")
    p.add_argument("--min-accuracy", type=float, default=0.97)
    p.add_argument("--judges-cache", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda: the snapshots' sampling, the attacks")
    p.add_argument(
        "--steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[],
        help="only these snapshot steps (e.g. 500); the report then needs only them, not the finished run",
    )
    args = p.parse_args()
    if set(args.dev_seeds) & set(args.report_seeds):
        p.error("--dev-seeds and --report-seeds must not share a seed: the report seeds are held out")
    path = Path(args.out) / "select.json"
    result = read_json(path) if path.is_file() else {"run": args.run, "steps": {}}
    result.update(dev_seeds=args.dev_seeds, report_seeds=args.report_seeds, min_accuracy=args.min_accuracy)
    result["environment"] = environment()  # the machine of this measurement (CPUs differ 1.9x in time)
    measure(args, result, judges(args.judges_cache))
    write_json(path, result)
    chosen = choose(args, result)
    have = {int(k.split("-")[1]) for k in result["steps"]}
    finished = (Path(args.run) / "forget" / "model_index.json").is_file()
    done = set(args.steps) <= have if args.steps else finished
    if not done or not args.report_seeds:
        why = "no --report-seeds" if not args.report_seeds else "waits for the run (or every --steps)"
        print(f"chosen so far: {chosen}; held-out report: {why}")
        return 0
    last = max(k for k in result["steps"] if wanted(args, k))
    result["chosen"], result["last"] = chosen, last  # chosen None: no step kept the other digits
    for name in dict.fromkeys(n for n in (chosen, last) if n is not None):
        held = result["steps"][name].setdefault("report_asr", {})
        for s in args.report_seeds:
            if str(s) not in held:
                held[str(s)] = attack(args, Path(args.run) / "snapshots" / name, s)
                write_json(path, result)
        result["steps"][name]["report_mean"] = sum(held.values()) / len(held)
        print(f"{name}: held-out ASR {held} mean {result['steps'][name]['report_mean']:.3f}")
    write_json(path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
