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
    "sa": (
        "SA + defences + adversarial pool, mean of steps 500–1,000 (configs/t2i_mnist_robust_pool.yaml), "
        "the development pick of draws at forgetting seeds 0–3 (benchmarks/t2i_draws.py; seed 0, Intel Xeon "
        "AVX-512, session 32): the committed forget/; attacks at held-out seeds"
    ),
    "sa_avx2": (
        "the same config, one run at seed 0 on the AMD EPYC AVX2 machine (session 31; attacks at held-out "
        "seeds)"
    ),
    "sa_v3": "SA + defences, session 7 (configs/t2i_mnist_robust.yaml)",
    "sa_ablate": "SA + defences + concept ablation, without the token adversary",
    "sa_v2": "SA + defences, session 6 (no concept ablation)",
    "sa_v1": "SA + defences, first version (λ 25.6, uniform draw, soft-prompt adversary)",
    "sa_soup": (
        "the same recipe, its EMA snapshots at steps 500–1,000 averaged afterwards (benchmarks/t2i_soup.py, "
        "session 29; attacks at held-out seeds)"
    ),
    "esd_x": "ESD-x",
    "esd_u": "ESD-u",
    "uce": "UCE",
    "oracle_no7": "retrained without sevens (the oracle: its UNet never saw a 7; wall time = training)",
}
# the development runs (benchmarks/t2i_robust.sh dev_runs), each one change from the one before
DEV = {
    "sa_plain": "SA, the paper's recipe",
    "sa_v1": "SA + defences v1 (λ 25.6)",
    "sa_xattn": "v1, cross-attention weights only",
    "sa_lam12": "v1 at λ 12.8",
    "sa_lam12_uncond": "λ 12.8 + unconditional replay, sevens filtered",
    "sa_lam12_shares": "λ 12.8 + condition shares",
    "sa_lam12_shares_both": "λ 12.8 + shares + discrete adversary",
    "sa_lam12_all": "λ 12.8 + shares + discrete adversary + unconditional replay (session 6's config)",
    "sa_adv300": "… + the adversary at the attack's budget (300 steps, every 150)",
    "sa_ablate": "session 6's config + concept ablation",
    "sa_abl3": "… with the ablation's weight 3",
    "sa_v3": "session 6's config + concept ablation + the token adversary (configs/t2i_mnist_robust.yaml)",
    # session 8: the free soft prompt (docs/robustness.md), each from the config
    "sa_pool25": "the config + an adversarial pool of 8 soft prompts + a quarter of the ablation kept",
    "sa_pool50": "… with half under kept prompts",
    "sa_poolab": "the config + the pool, half the ablation's rows under it",
    "sa_poolab_kept": "… + a quarter under kept prompts",
    "sa_pool_lam3": "the pool, half + a quarter under kept prompts, at λ 3.2",
    "sa_pool_lam16": "… at λ 1.6",
    "probe_kept25_1500": "probe: the config's model + 1,500 steps of pool ablation, no anchor",
    # session 9, on a float32 copy of the committed float16 θ* (the float32 world was not on the machine)
    "oracle_no7": "retrained without sevens (the oracle; wall time = its UNet's training)",
    "sa_strong": "the pool at 3× its attack steps (6 a step, reset 150), half + a quarter kept, λ 3.2",
    "sa_strong_nokept": "… without the ablation under kept prompts",
    "sa_strong_lam12": "… at the config's λ 12.8",
    # session 10, each the strong-pool run (sa_strong) + one switch, on the same float32 copy of θ*
    "sa_strong_keep8": "the strong pool + 8 replay images a step kept under the pool's soft prompts",
    "sa_strong_lowt": "the strong pool with the kept-prompt ablation at t < 500 only",
    "sa_strong_lowt_kept50": "… with half the ablation's rows kept (not a quarter)",
    "sa_strong_lowt_lam6": "… at λ 6.4",
    "sa_strong_lowt250": "… at t < 250",
    "sa_strong_lowt_abl2": "… with the ablation's weight 2",
    # session 11
    "sa_strong_lowt_s1": "the strong pool at t < 500, seed 1 (new θ* sets and Fisher, in its wall time)",
    "sa_strong_lowt_s2": "… at seed 2",
    "sa_strong_lowt_distill2": "the strong pool at t < 500 + the replay distilled from θ* (weight 2)",
    "sa_strong_lowt_distill05": "… weight 0.5",
    "sa_strong_lowt_distill8": "… weight 8",
    # session 12
    "sa_strong_lowt_distill01": "the strong pool at t < 500 + the replay distilled from θ*, weight 0.1",
    "sa_strong_lowt_distill2_lowt": "… weight 2, the distillation at t < 500 only",
    "sa_strong_lowt_s2_distsur2": "seed 2 + the surrogate's images distilled under kept prompts (weight 2)",
    "sa_strong_lowt_distsur2": "… at seed 0",
    "sa_strong_lowt_s1_distsur2": "… at seed 1",
    "sa_strong_lowt_s2_distsur8": "… at seed 2, weight 8",
    "sa_strong_lowt_s0_distsur2_hi": (
        "the t < 500 recipe + the surrogate's images distilled at t ≥ 500 only (weight 2), seed 0"
    ),
    "sa_strong_lowt_s1_distsur2_hi": "… at seed 1",
    "sa_strong_lowt_s2_distsur2_hi": "… at seed 2",
    "sa_strong_lowt_s1_distsur2_t256": (
        "the t < 500 recipe + the surrogate distillation (weight 2) + 256 sevens for the adversary and "
        "the ablation (not 64), seed 1 (wall time: resumed at step 250, alone at two threads)"
    ),
    # session 15 (both resumed from session 14: wall time of the resumed part, two jobs at one thread)
    "sa_strong_lowt_s0_distsur2_t256": "… at seed 0 (wall time: resumed at step 250)",
    "sa_strong_lowt_s2_distsur2_t256": "… at seed 2 (wall time: resumed in the Fisher)",
}


def pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def soft_prompt(attacks: dict[str, Any]) -> str:
    """The free soft prompt's rate; with more attack seeds, their mean after it."""
    sp = attacks.get("soft-prompt", {})
    if "asr_mean" not in sp:
        return pct(sp.get("asr"))
    seeds = sorted([sp["seed"], *map(int, sp["more_seeds"])])
    return f"{pct(sp['asr'])} (seeds {', '.join(map(str, seeds))}: {pct(sp['asr_mean'])})"


def wall_time(e: dict[str, Any]) -> str:
    """The run's wall time; for the pick of several draws (t2i_draws.py), the time of them all after it."""
    wall, draws = e.get("method_wall_s"), e.get("draws")
    out = "—" if not wall else f"{wall / 60:.1f} min"
    if draws and draws.get("draws_and_judges_s"):
        out += f" (the pick of {len(draws['dev_mean'])} draws: {draws['draws_and_judges_s'] / 60:.1f} min)"
    return out


def row(name: str, e: dict[str, Any], labels: dict[str, str] = METHODS) -> str:
    g = e["groups"]
    para = next(v for k, v in g.items() if k.startswith("seven_paraphrases"))
    attacks = e.get("attacks", {})
    moved = e.get("replay_movement", {}).get("mean_abs_diff_mean")
    return (
        f"| {labels.get(name, name)} | {pct(g['seven_forget_prompts']['as_7'])} | "
        f"{pct(g['seven_held_out_captions']['as_7'])} | {pct(para['as_7'])} | "
        f"{soft_prompt(attacks)} | {pct(attacks.get('token', {}).get('asr'))} | "
        f"{pct(attacks.get('discrete', {}).get('asr'))} | "
        f"{pct(g['min_other_digit_accuracy'])} | {'—' if moved is None else f'{moved:.2f}'} | "
        f"{wall_time(e)} |"
    )


def main() -> int:
    result = read_json(Path(sys.argv[1]))
    head = (
        "| method | forget prompts: as 7 | held-out captions | {} paraphrases | soft-prompt ASR: sequence | "
        "soft-prompt ASR: token | discrete ASR | other digits correct (lowest) | replay moved (/255) | "
        "wall time |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    print(head.format("test"))
    for name in METHODS:
        if name in result:
            print(row(name, result[name]))
    dev = result.get("development", {})
    if dev:
        print("\nDevelopment split (50 images per group; attacks at seed 0):\n")
        print(head.format("development"))
        for name in [n for n in DEV if n in dev] + [n for n in dev if n not in DEV]:
            print(row(name, dev[name], DEV))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
