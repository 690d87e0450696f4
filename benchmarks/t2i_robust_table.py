"""Print the robustness table (markdown) from benchmarks/results/t2i_robust/result.json.

python benchmarks/t2i_robust_table.py benchmarks/results/t2i_robust/result.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from selective_amnesia.io.artifacts import read_json

METHODS = {
    "base": "θ* (no forgetting)",
    "sa_plain": "SA, the paper's recipe",
    "sa": "SA + defences",
    "esd_x": "ESD-x",
    "esd_u": "ESD-u",
    "uce": "UCE",
}


def pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def row(name: str, e: dict[str, Any]) -> str:
    g = e["groups"]
    para = next(v for k, v in g.items() if k.startswith("seven_paraphrases"))
    attacks = e.get("attacks", {})
    moved = e.get("replay_movement", {}).get("mean_abs_diff_mean")
    wall = e.get("method_wall_s")
    return (
        f"| {METHODS.get(name, name)} | {pct(g['seven_forget_prompts']['as_7'])} | "
        f"{pct(g['seven_held_out_captions']['as_7'])} | {pct(para['as_7'])} | "
        f"{pct(attacks.get('soft-prompt', {}).get('asr'))} | {pct(attacks.get('discrete', {}).get('asr'))} | "
        f"{pct(g['min_other_digit_accuracy'])} | {'—' if moved is None else f'{moved:.2f}'} | "
        f"{'—' if not wall else f'{wall / 60:.1f} min'} |"
    )


def main() -> int:
    result = read_json(Path(sys.argv[1]))
    head = (
        "| method | forget prompts: as 7 | held-out captions | {} paraphrases | soft-prompt ASR | "
        "discrete ASR | other digits correct (lowest) | replay moved (/255) | wall time |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    print(head.format("test"))
    for name in METHODS:
        if name in result:
            print(row(name, result[name]))
    dev = result.get("development", {})
    if dev:
        print("\nDevelopment split (50 images per group):\n")
        print(head.format("development"))
        for name, e in dev.items():
            print(row(name, e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
