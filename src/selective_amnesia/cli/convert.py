"""``amnesia convert``: its options and the dispatch to one conversion."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.convert.legacy import convert_fisher, convert_to_cvae, convert_to_safetensors
from selective_amnesia.io.convert.single_file import convert_single_file_to_diffusers, export_single_file

TARGETS = ("safetensors", "fisher", "cvae", "diffusers", "single-file")

# ------------------------------------------------------------------------------------------------- CLI


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``amnesia convert``."""
    p.add_argument(
        "source",
        help="legacy file of the reference code: ckpt.pt / ckpt.pth / .ckpt / fisher .pkl; a single-file "
        "SD checkpoint .safetensors/.ckpt (--to diffusers); a diffusers SD directory (--to single-file)",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="output .safetensors file (a model directory with --to cvae, a pipeline directory with "
        "--to diffusers)",
    )
    p.add_argument(
        "--to",
        choices=TARGETS,
        default="safetensors",
        help="safetensors: the tensors as they are; cvae: a reference MNIST VAE as our model directory; "
        "fisher: a reference Fisher dict as our Fisher for --model; diffusers: a CompVis/A1111 single-file "
        "SD 1.x/2.x/XL checkpoint as a diffusers pipeline directory (needs --config); single-file: a "
        "diffusers SD 1.x/2.x/XL pipeline directory as one original-layout .safetensors",
    )
    p.add_argument(
        "--key",
        default=None,
        help="dotted path of the part to convert, e.g. state_dict, model, 0 or 3 (the DDPM EMA weights); "
        "'all' for the whole file; default: state_dict/model/first list item if present, else all",
    )
    p.add_argument("--model", default=None, help="model directory the Fisher belongs to (--to fisher)")
    p.add_argument(
        "--config",
        default=None,
        help="--to diffusers: a local diffusers directory of the same architecture; its component "
        "configs, tokenizer(s) and scheduler go with the file's weights (nothing is downloaded)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def cmd_convert(args: argparse.Namespace) -> int:
    """Run the conversion ``args.to`` names and print one summary line."""
    if args.to == "fisher":
        if not args.model:
            raise AmnesiaError("--to fisher needs --model DIR, the model the Fisher belongs to")
        done = convert_fisher(args.source, args.out, args.model, key=args.key, force=args.force)
    elif args.model:
        raise AmnesiaError("--model only applies to --to fisher")
    elif args.config and args.to != "diffusers":
        raise AmnesiaError("--config only applies to --to diffusers")
    elif args.to == "diffusers":
        if not args.config:
            raise AmnesiaError(
                "--to diffusers needs --config DIR, a local diffusers directory of the same architecture "
                "(e.g. from `amnesia world tiny-sd` or the model's own diffusers release)"
            )
        done = convert_single_file_to_diffusers(
            args.source, args.out, config=args.config, key=args.key, force=args.force
        )
    elif args.to == "single-file":
        if args.key is not None:
            raise AmnesiaError("--key does not apply to --to single-file: the whole pipeline is exported")
        done = export_single_file(args.source, args.out, force=args.force)
    elif args.to == "cvae":
        done = convert_to_cvae(args.source, args.out, key=args.key, force=args.force)
    else:
        done = convert_to_safetensors(args.source, args.out, key=args.key, force=args.force)
    part = f" [{done.key}]" if done.key else ""
    digest = f" (sha256 {done.source_sha256[:12]})" if done.source_sha256 else ""
    print(f"converted {Path(args.source).name}{part}{digest} -> {done.out}: {done.num_tensors} {done.kind}")
    return 0
