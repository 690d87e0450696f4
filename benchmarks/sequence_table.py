"""The many-concepts table (issue 14): one row per (run, step) from the `report.json` of sequence and
at-once runs of the class families, with the issue's targets checked after the last step.

    python benchmarks/sequence_table.py original=runs/seq_original online=runs/seq_online \
        latest=runs/seq_latest at_once=runs/at_once [--out benchmarks/results/sequential/vae.json]

Targets (VAE, MNIST): every forgotten class drawn as itself in <= 2% of samples, kept accuracy within
3 points of the base, kept FID <= 1.6x the base, the whole run <= 8 min with cached classifiers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _columns(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The concept x step columns; an at-once run (no sequence section) becomes base + one step."""
    if "sequence" in report:
        return list(report["sequence"]["columns"])
    if "concepts_table" in report:  # text-to-image, several concepts at once
        return list(report["concepts_table"]["columns"])
    forgotten = (
        report["forget_label"] if isinstance(report["forget_label"], list) else [report["forget_label"]]
    )
    cols = []
    for step, key in enumerate(("base", "forget")):
        m = report["metrics"][key]
        cols.append(
            {
                "step": step,
                "forgotten_so_far": forgotten if step else [],
                "as_itself": {
                    str(c): m.get(f"frac_classified_forget_c{c}", m["frac_classified_forget"])
                    for c in forgotten
                },
                "kept_accuracy": m["remembered_accuracy"],
                "kept_fid": m["fid"],
            }
        )
    return cols


def summarise(name: str, run: Path) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    cols = _columns(report)
    base, last = cols[0], cols[-1]
    t = report["timings"]
    minutes = (t["wall_s"] - t.get("classifier_training_s", 0.0)) / 60
    worst = max(last["as_itself"][str(c)] for c in last["forgotten_so_far"])
    if base["kept_fid"] is None:  # text-to-image world: judged per prompt, no FID (issue 14's t2i targets)
        targets = {
            "forgotten drawn as itself <= 10% on used captions": [worst, worst <= 0.10],
            "kept digits >= 95% correct": [last["kept_accuracy"], last["kept_accuracy"] >= 0.95],
        }
        return _result(name, run, report, cols, minutes, targets)
    targets = {
        "forgotten drawn as itself <= 2%": [worst, worst <= 0.02],
        "kept accuracy within 3 points of base": [
            base["kept_accuracy"] - last["kept_accuracy"],
            base["kept_accuracy"] - last["kept_accuracy"] <= 0.03,
        ],
        "kept FID <= 1.6x base": [
            last["kept_fid"] / base["kept_fid"],
            last["kept_fid"] <= 1.6 * base["kept_fid"],
        ],
        "minutes <= 8 (classifiers cached)": [minutes, minutes <= 8],
    }
    return _result(name, run, report, cols, minutes, targets)


def _result(
    name: str, run: Path, report: dict[str, Any], cols: list[dict[str, Any]], minutes: float, targets: dict
) -> dict[str, Any]:
    t = report["timings"]
    rows = [
        {
            "step": c["step"],
            "forgotten_so_far": c["forgotten_so_far"],
            "as_itself": {k: round(v, 4) for k, v in c["as_itself"].items()},
            "kept_accuracy": round(c["kept_accuracy"], 4),
            "kept_fid": None if c["kept_fid"] is None else round(c["kept_fid"], 3),
        }
        for c in cols
    ]
    anchor = report.get("sequence", {}).get("anchor", "at once")
    return {
        "name": name,
        "run": str(run),
        "anchor": anchor,
        "minutes": round(minutes, 2),
        "rows": rows,
        "targets": targets,
        "timings_s": t,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    order = [c for r in results for row in r["rows"] for c in row["forgotten_so_far"]]
    classes = list(dict.fromkeys(str(c) for c in order))
    head = ["run", "step", *[f"{c} as itself" for c in classes], "kept acc", "kept FID"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for row in r["rows"]:
            cells = [r["name"], str(row["step"])]
            for c in classes:
                v = row["as_itself"].get(str(c))
                bold = c in [str(f) for f in row["forgotten_so_far"]]
                cells.append("" if v is None else (f"**{100 * v:.1f}%**" if bold else f"{100 * v:.1f}%"))
            fid = row["kept_fid"]
            cells += [f"{100 * row['kept_accuracy']:.1f}%", "" if fid is None else f"{fid:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        met = ", ".join(f"{k}: {v[0]:.3g} {'met' if v[1] else 'NOT met'}" for k, v in r["targets"].items())
        lines.append(f"- {r['name']} ({r['anchor']}, {r['minutes']:.1f} min): {met}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="name=run_dir")
    parser.add_argument("--out", help="write the rows and targets as JSON")
    parser.add_argument("--note", default="", help="machine and command, stored with the result")
    args = parser.parse_args()
    results = [summarise(n, Path(d)) for n, d in (a.split("=", 1) for a in args.runs)]
    print(markdown(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"note": args.note, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
