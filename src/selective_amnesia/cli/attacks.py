"""``amnesia attack {paraphrase,soft-prompt,discrete}``: the arguments and the command.

Registered by ``selective_amnesia.cli.app.build_parser`` through ``add_attack_parser``; bad input raises
``AmnesiaError`` (one line, exit status 2), checked before any model is loaded where it can be.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_amnesia.attacks import ATTACKS, DETECTOR_HELP
from selective_amnesia.errors import AmnesiaError

if TYPE_CHECKING:
    from selective_amnesia.attacks.common import AttackOutput
    from selective_amnesia.models.text_to_image import TextToImageModel


def add_attack_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    formatter_class: type[argparse.HelpFormatter],
) -> argparse.ArgumentParser:
    """Add ``attack`` and its three attacks to the CLI's subparsers; returns the ``attack`` parser."""
    help_ = "attack a text-to-image model's forgetting: paraphrases, soft prompts, discrete prompts"
    p: argparse.ArgumentParser = subparsers.add_parser(
        "attack", help=help_, description=help_, formatter_class=formatter_class
    )
    p.set_defaults(fn=cmd_attack)
    kinds: argparse._SubParsersAction[argparse.ArgumentParser] = p.add_subparsers(
        dest="attack", required=True, metavar="{" + ",".join(ATTACKS) + "}", parser_class=type(p)
    )
    a = _common_arguments(
        kinds,
        formatter_class,
        "paraphrase",
        "sample paraphrases of the concept and report how often it appears",
    )
    a.add_argument("--prompts", dest="prompts_file", default=None, help="prompt file, one prompt a line")
    a.add_argument("--concept-words", nargs="+", default=[], help="fill the built-in templates with these")
    a.add_argument("--templates", default=None, help="templates file (lines with {}) instead of the built-in")
    a.add_argument("--num-per-prompt", type=int, default=10, help="images per prompt")
    a = _common_arguments(
        kinds,
        formatter_class,
        "soft-prompt",
        "optimise a conditioning (white box) so the model draws the concept",
    )
    _optimisation_arguments(a, 300, 1e-2)
    a.add_argument("--mode", choices=("sequence", "token"), default="sequence", help="what is optimised")
    a.add_argument("--prompt", default="", help="sequence: the prompt whose embedding starts the search")
    a.add_argument("--template", default="{}", help="token: the prompt around the learned token ({})")
    a.add_argument(
        "--init-word", default=None, help="token: its starting word (default: the first concept word)"
    )
    a.add_argument("--concept-words", nargs="+", default=[], help="the concept's words")
    a = _common_arguments(
        kinds,
        formatter_class,
        "discrete",
        "optimise k real prompt tokens (UnlearnDiffAtk) so the model draws the concept",
    )
    _optimisation_arguments(a, 200, 1e-2)
    a.add_argument("--tokens", type=int, default=5, help="number of optimised tokens k")
    a.add_argument("--prompt", default="", help="the prompt they go with (default: none, concept-free)")
    a.add_argument("--position", choices=("prepend", "append"), default="prepend", help="where they go")
    a.add_argument("--concept-words", nargs="+", default=[], help="tokens containing these are not used")
    a.add_argument("--eval-every", type=int, default=10, help="steps between scoring the projected tokens")
    return p


def _common_arguments(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser],
    formatter_class: type[argparse.HelpFormatter],
    name: str,
    help_: str,
) -> argparse.ArgumentParser:
    """One attack's parser with the options every attack has."""
    a: argparse.ArgumentParser = kinds.add_parser(
        name, help=help_, description=help_, formatter_class=formatter_class
    )
    a.add_argument("--model", required=True, help="the attacked text-to-image pipeline directory")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--detector", required=True, help=DETECTOR_HELP)
    a.add_argument(
        "--threshold", type=float, default=None, help="detector threshold (nudity 0.6, identity 0.5)"
    )
    a.add_argument(
        "--classifier-cache",
        default=None,
        help="digit judges' cache (default: the classifier cache of amnesia run)",
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the optimisation and of every image")
    a.add_argument("--batch-size", type=int, default=64, help="images per sampler call (same images)")
    a.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    a.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return a


def _optimisation_arguments(a: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """The options of the attacks that optimise against images of the concept (soft-prompt, discrete)."""
    a.add_argument("--targets", default=None, help="a folder of images of the concept")
    a.add_argument("--target-model", default=None, help="or the original model theta* to draw them from")
    a.add_argument("--target-prompt", default=None, help="the concept's prompt for --target-model")
    a.add_argument("--num-targets", type=int, default=64, help="images drawn from --target-model")
    a.add_argument("--steps", type=int, default=steps, help="optimisation steps")
    a.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    a.add_argument("--train-batch", type=int, default=16, help="targets per optimisation step")
    a.add_argument("--num-images", type=int, default=100, help="images sampled with what is found")
    a.add_argument("--no-baseline", action="store_true", help="do not also sample the starting prompt")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not 1 <= value < 2**31:
            raise AmnesiaError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded."""
    if not 0 <= args.seed < 2**31:
        raise AmnesiaError(f"--seed must lie in [0, 2**31), got {args.seed}")
    _positive(
        args,
        "batch_size",
        "num_per_prompt",
        "num_targets",
        "steps",
        "train_batch",
        "num_images",
        "tokens",
        "eval_every",
    )
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise AmnesiaError(f"--lr must be a finite number > 0, got {lr}")
    if args.attack != "paraphrase":
        if (args.targets is None) == (args.target_model is None):
            raise AmnesiaError(
                "give the concept's images: --targets FOLDER or --target-model DIR --target-prompt TEXT"
            )
        if args.target_model is not None and not args.target_prompt:
            raise AmnesiaError("--target-model needs --target-prompt: the concept's prompt for theta*")
    out = Path(args.out).resolve()
    for flag in ("targets", "target_model"):
        source = getattr(args, flag, None)
        if source and (out == Path(source).resolve() or out.is_relative_to(Path(source).resolve())):
            raise AmnesiaError(
                f"--out {args.out} lies in --{flag.replace('_', '-')} {source}: write somewhere else"
            )
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise AmnesiaError(f"--out {args.out} is an existing file, not a directory: choose another --out")


def cmd_attack(args: argparse.Namespace) -> int:
    """``amnesia attack KIND``: run the attack, sample and judge its images, write the report to --out."""
    from selective_amnesia.attacks.common import finish, load_attacked_model
    from selective_amnesia.attacks.detectors import make_detector
    from selective_amnesia.config import resolve_device
    from selective_amnesia.io import runstate

    started = time.perf_counter()
    progress = not args.no_progress
    _check_args(args)
    device = resolve_device(args.device)
    prompts: list[str] = []
    if args.attack == "paraphrase":
        from selective_amnesia.attacks.paraphrase import paraphrase_prompts

        prompts = paraphrase_prompts(args.prompts_file, args.concept_words, args.templates)
    if args.attack == "soft-prompt" and args.mode == "token" and not (args.init_word or args.concept_words):
        raise AmnesiaError(
            "--mode token starts from a word: pass --init-word WORD or --concept-words WORD ..."
        )
    detector = make_detector(
        args.detector, threshold=args.threshold, cache_dir=args.classifier_cache, progress=progress
    )
    if args.attack != "paraphrase" and args.target_model:
        from selective_amnesia.cli.app import resolve_model  # a Hub id, as --model (resolved by main)

        args.target_model = resolve_model(args.target_model)
    model = load_attacked_model(args.model, device)
    out = Path(args.out)
    runstate.begin(out, "attack")
    per = args.num_per_prompt if args.attack == "paraphrase" else args.num_images
    settings: dict[str, Any] = {"num_per_condition": per}
    if args.attack == "paraphrase":
        result = _paraphrase(args, prompts, settings)
    else:
        result = _optimisation_attack(args, model, device, progress, settings)
    report = finish(
        out,
        model,
        result,
        detector,
        num_per_condition=per,
        seed=args.seed,
        batch_size=args.batch_size,
        started=started,
        progress=progress,
        model_path=str(args.model),
    )
    base = report["baseline_asr"]
    than = f" (baseline {base:.1%})" if base is not None else ""
    print(
        f"{report['attack']}: ASR {report['asr']:.1%}{than} over {report['num_images']} images, detector "
        f"{detector.name}; {report['seconds']['total']:.1f}s; written to {out}"
    )
    return 0


def _paraphrase(args: argparse.Namespace, prompts: list[str], settings: dict[str, Any]) -> AttackOutput:
    from selective_amnesia.attacks.paraphrase import paraphrase_attack

    settings |= {
        "prompts_file": args.prompts_file,
        "concept_words": args.concept_words,
        "templates": args.templates or "built-in",
    }
    return paraphrase_attack(prompts, settings)


def _optimisation_attack(
    args: argparse.Namespace, model: TextToImageModel, device: Any, progress: bool, settings: dict[str, Any]
) -> AttackOutput:
    """soft-prompt or discrete: load (or draw) the concept's images, then optimise against them."""
    from selective_amnesia.attacks.common import load_targets

    t0 = time.perf_counter()
    targets = load_targets(
        model,
        folder=args.targets,
        target_model=args.target_model,
        target_prompt=args.target_prompt,
        num=args.num_targets,
        seed=args.seed,
        device=device,
        progress=progress,
    )
    targets_s = time.perf_counter() - t0
    source = (
        {"targets": args.targets}
        if args.targets
        else {"target_model": args.target_model, "target_prompt": args.target_prompt}
    )
    if args.attack == "soft-prompt":
        result = _soft_prompt(args, model, targets, progress)
    else:
        result = _discrete(args, model, targets, progress)
    result.settings |= settings | source
    result.info.setdefault("seconds", {})["targets"] = round(targets_s, 2)
    return result


def _soft_prompt(
    args: argparse.Namespace, model: TextToImageModel, targets: Any, progress: bool
) -> AttackOutput:
    from selective_amnesia.attacks.soft_prompt import soft_prompt_attack

    return soft_prompt_attack(
        model,
        targets,
        mode=args.mode,
        prompt=args.prompt,
        template=args.template,
        init_word=args.init_word or next(iter(args.concept_words), ""),
        steps=args.steps,
        lr=args.lr,
        batch_size=args.train_batch,
        seed=args.seed,
        baseline=not args.no_baseline,
        progress=progress,
    )


def _discrete(
    args: argparse.Namespace, model: TextToImageModel, targets: Any, progress: bool
) -> AttackOutput:
    from selective_amnesia.attacks.discrete import discrete_attack

    return discrete_attack(
        model,
        targets,
        prompt=args.prompt,
        num_tokens=args.tokens,
        position=args.position,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.train_batch,
        seed=args.seed,
        exclude=args.concept_words,
        eval_every=args.eval_every,
        baseline=not args.no_baseline,
        progress=progress,
    )
