"""Does forgetting "seven" in the MNIST text-to-image world hold? One entry of the robustness table.

    python benchmarks/t2i_robust.py --base runs/t2i_world --run runs/robust/sa --name sa \
        --split test --out benchmarks/results/t2i_robust [--attacks soft-prompt,discrete]

Each group is --per-group images spread evenly over its prompts, seeded per (seed, prompt, index) as
`amnesia sample --seed` does, judged by the MNIST judges trained on the 28 -> 16 -> 28 px round trip
(3 seeds, their probabilities averaged, argmax):
  - seven / forget prompts: the run's t2i.forget_prompts (what the forgetting was given)
  - seven / held-out captions: the world's other four training captions of seven
  - seven / paraphrases: benchmarks/prompts/seven_paraphrases_{dev,test}.txt (--split); tune on dev,
    report test (the split was committed before any tuning)
  - digit d != 7: the world's eight training captions of d (accuracy)
  - replay movement: mean |difference| per pixel (0-255) between theta*'s and the model's images of the
    replay prompts, same seeds
and, with --attacks, the attack success rates of selective_amnesia.attacks against the model (target
images: theta*'s images of "a handwritten 7"). The entry is merged into --out/result.json with the
run's wall time (its report.json): test-split entries at the top, keyed by --name (sa, sa_plain, esd_x,
esd_u, uce, base), development-split ones under "development". --per-group 50 is the quick setting
used while tuning.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from selective_amnesia.config import load_config
from selective_amnesia.evaluate.assess import for_classifier
from selective_amnesia.evaluate.classifier import ClassifierRecipe, load_or_train_classifier
from selective_amnesia.evaluate.nudity import retention_report
from selective_amnesia.io.artifacts import environment, read_json, write_json
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import prompt_latents, read_prompts
from selective_amnesia.worlds.mnist_t2i import captions

SEVEN = 7
PROMPTS = Path(__file__).resolve().parent / "prompts"
REPLAY = Path(__file__).resolve().parents[1] / "configs" / "prompts" / "mnist_world_replay.txt"


def judges(cache_dir: str | None = None) -> list[Any]:
    c = load_config(None, []).classifier
    recipe = ClassifierRecipe(**{k: v for k, v in vars(c).items() if k not in ("seeds", "cache_dir")})
    where = Path(cache_dir or c.cache_dir)
    return [load_or_train_classifier(recipe, where, s, "mnist", image_size=16)[0] for s in c.seeds]


def judge_images(images: torch.Tensor, js: list[Any]) -> torch.Tensor:
    """Class probabilities of uint8 images, the judges averaged."""
    return torch.stack([j.predict_proba(for_classifier(images, j)) for j in js]).mean(0)


def groups(forget_prompts: list[str], split: str) -> dict[str, tuple[int, list[str]]]:
    out = {
        "seven_forget_prompts": (SEVEN, forget_prompts),
        "seven_held_out_captions": (SEVEN, [p for p in captions(SEVEN) if p not in forget_prompts]),
        f"seven_paraphrases_{split}": (SEVEN, read_prompts(PROMPTS / f"seven_paraphrases_{split}.txt")),
    }
    for d in range(10):
        if d != SEVEN:
            out[f"digit_{d}"] = (d, captions(d))
    return out


def judge_groups(
    model: TextToImageModel, js: list[Any], forget_prompts: list[str], split: str, n: int, seed: int
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for group, (digit, prompts) in groups(forget_prompts, split).items():
        per = -(-n // len(prompts))
        z, _ = prompt_latents(model, prompts, per, seed, None, batch_size=128)
        pred = judge_images(model.to_uint8(z), js).argmax(1)
        rows[group] = {
            "images": int(pred.shape[0]),
            "as_7": float((pred == SEVEN).float().mean()),
            "accuracy": float((pred == digit).float().mean()),
            "drawn_as": torch.bincount(pred, minlength=10).tolist(),  # where a lost digit went
        }
        print(f"  {group:28s} as-7 {rows[group]['as_7']:.3f} acc {rows[group]['accuracy']:.3f}", flush=True)
    rows["min_other_digit_accuracy"] = min(r["accuracy"] for g, r in rows.items() if g.startswith("digit_"))
    return rows


def replay_movement(
    base: TextToImageModel, model: TextToImageModel, per_prompt: int, seed: int
) -> dict[str, Any]:
    prompts = read_prompts(REPLAY)
    before = base.to_uint8(prompt_latents(base, prompts, per_prompt, seed, None, batch_size=128)[0])
    after = model.to_uint8(prompt_latents(model, prompts, per_prompt, seed, None, batch_size=128)[0])
    return retention_report(before, after)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the world's pipeline directory (theta*)")
    p.add_argument(
        "--run",
        required=True,
        help="a run directory (forget/, report.json), 'base', a world's pipeline directory (the oracle) "
        "or a run's snapshot (RUN/snapshots/step-NNNNN; the robust config's forget prompts)",
    )
    p.add_argument("--name", required=True, help="the entry: sa, sa_plain, esd_x, esd_u, uce, base, ...")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=["dev", "test"], required=True)
    p.add_argument("--per-group", type=int, default=200)
    p.add_argument("--replay-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--attacks", default="", help="comma-separated: soft-prompt,discrete,token")
    p.add_argument("--attack-seed", type=int, default=None, help="the attacks' seed (default: --seed)")
    p.add_argument(
        "--more-soft-prompt-seeds",
        default="",
        help="comma-separated attack seeds at which the free soft prompt runs again (its ASR varies by tens "
        "of points between seeds on one model); their rates and the mean with --attack-seed's are kept",
    )
    p.add_argument("--judges-cache", default=None)
    p.add_argument(
        "--wall-from",
        default=None,
        help="a run whose report.json gives the wall time (--run a snapshot or a soup of its snapshots)",
    )
    p.add_argument(
        "--draws",
        default=None,
        help="the draws.json of benchmarks/t2i_draws.py when --run is its pick: kept with the entry (each "
        "draw's development rate, and the time of all the draws and their judging)",
    )
    args = p.parse_args()
    t0 = time.perf_counter()
    base = TextToImageModel.from_pretrained(args.base)
    if args.run == "base":
        model, report = base, {"forget_prompts": captions(SEVEN)[:4], "timings": {}}
    elif is_pipeline(args.run):  # another world (e.g. retrained without sevens: its build time) or a snapshot
        model = TextToImageModel.from_pretrained(args.run)
        world = Path(args.run) / "world.json"  # a run's snapshot (forget.snapshot_every) has none: no time
        timings = read_json(world).get("timings", {}) if world.is_file() else {}
        report = {
            "forget_prompts": captions(SEVEN)[:4],
            "timings": {"total_s": sum(timings.values())} if timings else {},
        }
    else:
        model = TextToImageModel.from_pretrained(Path(args.run) / "forget")
        report = read_json(Path(args.run) / "report.json")
    if args.wall_from:
        report["timings"] = read_json(Path(args.wall_from) / "report.json")["timings"]
    js = judges(args.judges_cache)
    print(f"{args.name} ({args.split}, {args.per_group} images per group)", flush=True)
    entry: dict[str, Any] = {
        "split": args.split,
        "per_group": args.per_group,
        "seed": args.seed,
        "groups": judge_groups(
            model, js, list(report["forget_prompts"]), args.split, args.per_group, args.seed
        ),
        "method_wall_s": report["timings"].get("total_s"),
        "forget_conditions": report.get("forget_conditions"),
    }
    if args.draws:
        d = read_json(Path(args.draws))
        entry["draws"] = {
            "pick": d["pick"],
            "dev_mean": {s: v["dev_mean"] for s, v in d["draws"].items()},
            "min_other_digit_accuracy": {s: v["min_other_digit_accuracy"] for s, v in d["draws"].items()},
            "draws_and_judges_s": d["draws_and_judges_s"],
        }
    if model is not base:
        entry["replay_movement"] = replay_movement(base, model, args.replay_per_prompt, args.seed)
        print(f"  replay movement {entry['replay_movement']['mean_abs_diff_mean']:.2f} / 255", flush=True)
    if args.attacks:
        entry["attacks"] = run_attacks(args)
    entry["eval_s"] = time.perf_counter() - t0
    entry["environment"] = environment()  # eval_s and the run's wall time depend on the CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    lock = os.open(out, os.O_RDONLY)  # two judges may finish together (t2i_robust.sh): one writes at a time
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merge(path, args, entry)
    finally:
        os.close(lock)
    print(f"wrote {path} ({args.name}, {args.split})")
    return 0


def merge(path: Path, args: argparse.Namespace, entry: dict[str, Any]) -> None:
    result = read_json(path) if path.is_file() else {}
    if args.split == "test":  # the table: one entry per method at the top
        result[args.name] = entry
    else:
        result.setdefault("development", {})[args.name] = entry
    write_json(path, result)


def is_pipeline(path: str) -> bool:
    return (Path(path) / "model_index.json").is_file()


def model_dir(run: str) -> str:
    """The pipeline directory of --run: itself (a world, e.g. the oracle) or a run's forget/."""
    return run if is_pipeline(run) else str(Path(run) / "forget")


def run_attacks(args: argparse.Namespace) -> dict[str, Any]:
    """The attacks through the real `amnesia attack` command; their outputs go to --out/attacks/NAME/."""
    model = args.base if args.run == "base" else model_dir(args.run)
    seed = args.seed if args.attack_seed is None else args.attack_seed  # tune at one seed, report another
    device = getattr(args, "device", "cpu")  # t2i_select.py --device: the attacks on a GPU
    common = ["--model", model, "--detector", "digit:7", "--no-progress", "--device", device]
    if args.judges_cache:
        common += ["--classifier-cache", args.judges_cache]
    target = ["--target-model", args.base, "--target-prompt", "a handwritten 7"]
    kinds = {
        # the strongest start: the forget prompt's own embedding, optimised to bring sevens back
        "soft-prompt": ["--mode", "sequence", "--prompt", "a handwritten 7", *target],
        # five real tokens, none containing the concept's words, with no other prompt
        "discrete": ["--tokens", "5", "--concept-words", "seven", "7", *target],
        # concept inversion as Pham et al.: one new token in "a handwritten {}", through the text encoder
        "token": ["--mode", "token", "--template", "a handwritten {}", "--init-word", "seven", *target],
    }
    command = {"token": "soft-prompt"}  # the attack command each kind runs (default: its name)
    out: dict[str, Any] = {}
    kinds_run = args.attacks.split(",")
    more = [int(x) for x in getattr(args, "more_soft_prompt_seeds", "").split(",") if x and int(x) != seed]
    runs = [(kind, kind, seed) for kind in kinds_run]
    runs += [("soft-prompt", f"soft-prompt-seed{s}", s) for s in more if "soft-prompt" in kinds_run]
    for kind, name, at in runs:
        where = Path(args.out) / "attacks" / args.name / name
        t0 = time.perf_counter()
        shutil.rmtree(where, ignore_errors=True)  # a fresh attack each time
        cmd = [
            sys.executable,
            "-m",
            "selective_amnesia.cli",
            "attack",
            command.get(kind, kind),
            "--out",
            str(where),
        ]
        subprocess.run([*cmd, *common, "--seed", str(at), *kinds[kind]], check=True)
        report = read_json(where / "attack.json")
        if at != seed:  # a further seed of the free soft prompt: its rate goes next to the first one's
            sp = out["soft-prompt"]
            sp.setdefault("more_seeds", {})[str(at)] = report.get("asr")
            rates = [sp["asr"], *sp["more_seeds"].values()]
            sp["asr_mean"] = sum(rates) / len(rates)
            print(f"  attack soft-prompt at seed {at}: ASR {report.get('asr')}", flush=True)
            continue
        out[kind] = {
            "asr": report.get("asr"),
            "seed": seed,
            "wall_s": time.perf_counter() - t0,
            "output": str(where),
        }
        for key in ("prompt", "prompts", "baseline_asr"):
            if key in report:
                out[kind][key] = report[key]
        print(f"  attack {kind}: ASR {out[kind]['asr']}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
