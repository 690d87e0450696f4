"""What every attack shares: the denoising loss on a differentiable conditioning, placeholder tokens in
the text encoders' input, target latents, sampling the conditions found, and the output folder.

The loss is the model's own (``TextToImageModel.eps_loss``: ||model(z_t, t, c) - target||^2 averaged over
latent entries, target eps or v by the scheduler's ``prediction_type``), computed here from a conditioning
*tensor* instead of a prompt index so that gradients reach the conditioning; the UNet is only read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selective_amnesia.attacks.detectors import Detector
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import atomic_path, environment, read_json, save_tensors, write_json
from selective_amnesia.models.conditioning import Embeds, unet_kwargs
from selective_amnesia.models.text_to_image import TextToImageModel

# conditioning entries that are not text: SDXL's size/crop ids are never optimised
FIXED_KEYS = ("time_ids",)
# strings tried as the placeholder of an optimised token: the first that is one ordinary token in every
# tokenizer of the pipeline (and not in the prompt) is used
PLACEHOLDERS = ("*", "sks", "zwx", "x", "q", "z", "j")
GRID_ROWS, GRID_COLUMNS, GRID_MIN_SIDE = 16, 8, 64


def unet_weight(model: TextToImageModel) -> Tensor:
    weight: Tensor = next(model.unet.parameters())
    return weight


def expand(embeds: Embeds, batch: int) -> Embeds:
    """A conditioning of batch 1 repeated ``batch`` times, keeping the autograd graph."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in embeds.items()}


def batched(embeds: Embeds) -> Embeds:
    """A conditioning without batch dimension (the prompt table's form) as batch 1."""
    return {k: v.unsqueeze(0) for k, v in embeds.items()}


def denoising_loss(
    model: TextToImageModel, x: Tensor, embeds: Embeds, timesteps: Tensor, eps: Tensor
) -> Tensor:
    """``model.eps_loss`` with the conditioning given as (B, ...) tensors (differentiable), shape (B,)."""
    w = unet_weight(model)
    x, eps, timesteps = x.to(w.device, w.dtype), eps.to(w.device, w.dtype), timesteps.to(w.device)
    z_t, target = model.noised(x, timesteps, eps)
    text = {k: v.to(w.device, w.dtype) for k, v in embeds.items()}
    pred: Tensor = model.unet(z_t, timesteps, **unet_kwargs(text)).sample
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class NoiseDraw:
    """Which targets, timesteps and noise one loss evaluation uses, drawn from one generator."""

    index: Tensor
    timesteps: Tensor
    eps: Tensor

    @classmethod
    def draw(
        cls, model: TextToImageModel, targets: Tensor, batch: int, generator: torch.Generator
    ) -> NoiseDraw:
        n_t, dev = model.config.num_train_timesteps, generator.device  # a CPU or a CUDA generator
        index = torch.randint(0, targets.shape[0], (batch,), generator=generator, device=dev)
        timesteps = torch.randint(0, n_t, (batch,), generator=generator, device=dev)
        eps = torch.randn((batch, *targets.shape[1:]), generator=generator, device=dev)
        return cls(index, timesteps, eps)

    def loss(self, model: TextToImageModel, targets: Tensor, embeds: Embeds) -> Tensor:
        """Mean denoising loss of ``embeds`` (batch 1) on these draws."""
        x = targets[self.index.to(targets.device)]
        return denoising_loss(model, x, expand(embeds, x.shape[0]), self.timesteps, self.eps).mean()


@torch.no_grad()
def fixed_loss(model: TextToImageModel, targets: Tensor, embeds: Embeds, draws: list[NoiseDraw]) -> float:
    """The loss of ``embeds`` on fixed draws: comparable between conditionings and across steps."""
    embeds = {k: v.detach() for k, v in embeds.items()}
    return float(np.mean([d.loss(model, targets, embeds).item() for d in draws]))


def eval_draws(
    model: TextToImageModel, targets: Tensor, seed: int, num: int = 64, batch: int = 32
) -> list[NoiseDraw]:
    """``num`` (target, timestep, noise) triples from their own generator, in batches."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return [NoiseDraw.draw(model, targets, min(batch, num - lo), gen) for lo in range(0, num, batch)]


# ---- placeholder tokens ------------------------------------------------------------------------------


class TokenSlots:
    """Optimised vectors in place of placeholder tokens of a prompt, through the frozen text encoder(s).

    ``text(placeholder)`` writes the prompt around a placeholder string; every occurrence of the
    placeholder's token id in the tokenized prompt (``count`` per encoder) gets the next given vector in
    its encoder's input-embedding output (a forward hook on ``get_input_embeddings()``): exactly what a new
    vocabulary row with that vector would give, without touching the tokenizer or the embedding table.
    ``encode`` runs the pipeline's own conditioning (``TextConditioning._encode``: CLIP last or SDXL's
    penultimate states, pooled projection, time ids) with gradients to the vectors.
    """

    def __init__(self, model: TextToImageModel, text: Callable[[str], str], count: int) -> None:
        self.model, self.count = model, count
        self.encoders: list[tuple[str, Any, Any]] = list(
            (name, enc, tok) for name, (enc, tok) in model.conditioning.encoders.items()
        )
        for ph in PLACEHOLDERS:
            found = [self._placeholder_id(tok, ph) for _, _, tok in self.encoders]
            ids = [i for i in found if i is not None]
            if len(ids) != len(found):
                continue
            prompt = text(ph)
            counts = [
                int(torch.eq(self._tokens(tok, prompt), i).sum())
                for (_, _, tok), i in zip(self.encoders, ids, strict=True)
            ]
            if all(c == count for c in counts):
                self.placeholder, self.prompt, self.ids = ph, prompt, ids
                return
        raise AmnesiaError(
            f"cannot place {count} optimised token(s) in {text('{}')!r}: the prompt is too long for the "
            "text encoder, or the tokenizer has no free placeholder; shorten the prompt"
        )

    @staticmethod
    def _placeholder_id(tokenizer: Any, text: str) -> int | None:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] in tokenizer.all_special_ids:
            return None
        return int(ids[0])

    @staticmethod
    def _tokens(tokenizer: Any, prompt: str) -> Tensor:
        # as the conditioning tokenizes (max-length padding, truncation)
        ids: Tensor = tokenizer(
            [prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids

    def embedding_tables(self) -> list[Tensor]:
        """Each encoder's input-embedding matrix (V, D), frozen."""
        return [enc.get_input_embeddings().weight for _, enc, _ in self.encoders]

    @contextmanager
    def _hooks(self, vectors: list[Tensor]) -> Iterator[None]:
        handles = []
        for (_, enc, _), pid, vec in zip(self.encoders, self.ids, vectors, strict=True):

            def hook(module: Any, inputs: Any, output: Tensor, pid: int = pid, vec: Tensor = vec) -> Tensor:
                mask = inputs[0] == pid
                out = output.clone()
                out[mask] = vec.to(out.dtype).repeat(int(inputs[0].shape[0]), 1)
                return out

            handles.append(enc.get_input_embeddings().register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def encode(self, vectors: list[Tensor]) -> Embeds:
        """The conditioning (batch 1) with ``vectors[e]`` (count, D_e) at the placeholders of encoder e."""
        for v, table in zip(vectors, self.embedding_tables(), strict=True):
            if v.shape != (self.count, table.shape[1]):
                raise ValueError(
                    f"expected vectors of shape {(self.count, table.shape[1])}, got {tuple(v.shape)}"
                )
        with self._hooks(vectors), torch.enable_grad():
            # the conditioning's private encoder call: the public ``encode`` is under no_grad
            out = self.model.conditioning._encode([self.prompt])
        return {k: v.float() for k, v in out.items()}


# ---- the model and the targets ------------------------------------------------------------------------


def load_attacked_model(path: str | Path, device: str) -> TextToImageModel:
    """A text-to-image pipeline directory (``amnesia sample`` loads the same); a clear line otherwise."""
    from selective_amnesia.models import load_model

    path = Path(path)
    index_path = path / "model_index.json"
    if index_path.is_file():
        index = read_json(index_path)
        entry = index.get("text_encoder") if isinstance(index, dict) else None
        has_encoder = isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
        if not has_encoder and not (path / "text_encoder_ref.json").is_file():
            raise AmnesiaError(
                f"{path} has no text encoder: attacks optimise prompts, so they need a text-to-image "
                "pipeline with its text encoder"
            )
    model = load_model(path)
    if not isinstance(model, TextToImageModel):
        raise AmnesiaError(
            f"{path} is a {model.family} model without a text encoder: "
            "attacks need a text-to-image pipeline directory"
        )
    return model.to(device)


def sample_conditions(
    model: TextToImageModel,
    names: list[str],
    per: int,
    seed: int,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """``per`` latents of every condition (prompt text or a registered ``<name>``) and the index of its
    condition in ``names``; image i of a condition depends only on (seed, condition, i), as in
    ``amnesia sample --seed``."""
    from selective_amnesia.pipeline.t2i import prompt_latents

    z, ids = prompt_latents(model, names, per, seed, None, batch_size=batch_size, progress=progress)
    where = {model.prompts.index(n): i for i, n in enumerate(names)}
    return z, torch.tensor([where[int(i)] for i in ids.tolist()], dtype=torch.int64)


def load_targets(
    model: TextToImageModel,
    *,
    folder: str | None,
    target_model: str | None,
    target_prompt: str | None,
    num: int,
    seed: int,
    device: str,
    progress: bool = False,
) -> Tensor:
    """Latents (N, C, h, w) of the concept: an image folder encoded by the attacked model's VAE, or
    ``num`` images of ``target_prompt`` from the original model theta* (decoded to images and encoded
    again, so the attacked model's VAE defines the latents either way)."""
    from selective_amnesia.data import load_image_folder

    if (folder is None) == (target_model is None):
        raise AmnesiaError(
            "give the concept's images: --targets FOLDER or --target-model DIR --target-prompt TEXT"
        )
    if folder is not None:
        c, h, w = model.pixel_shape
        images = load_image_folder(folder, image_size=h, channels=c).images
        if h != w:
            raise AmnesiaError(f"this model makes {h}x{w} images; only square targets are supported")
        return model.from_uint8(images)
    if not target_prompt:
        raise AmnesiaError("--target-model needs --target-prompt: the concept's prompt for theta*")
    theta = load_attacked_model(str(target_model), device)
    if theta.pixel_shape != model.pixel_shape:
        raise AmnesiaError(
            f"--target-model makes images of shape {theta.pixel_shape}, the attacked model "
            f"{model.pixel_shape}: they must be the same pipeline before and after forgetting"
        )
    z, _ = sample_conditions(theta, [target_prompt], num, seed, progress=progress)
    images = theta.to_uint8(z)
    del theta
    return model.from_uint8(images)


# ---- output ---------------------------------------------------------------------------------------------


@dataclass
class AttackOutput:
    """What an attack found, to be sampled, judged and written by ``finish``."""

    attack: str
    conditions: list[str]  # prompt texts and registered <names>, in order
    roles: list[str]  # "attack" or "baseline" per condition
    settings: dict[str, Any]
    prompts: dict[str, Any] = field(default_factory=dict)  # written as prompts.json
    tensors: dict[str, Tensor] = field(default_factory=dict)  # written as embeddings.safetensors
    extra_files: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name -> tensors
    info: dict[str, Any] = field(default_factory=dict)  # losses, history...


def finish(
    out: Path,
    model: TextToImageModel,
    result: AttackOutput,
    detector: Detector,
    *,
    num_per_condition: int,
    seed: int,
    batch_size: int,
    started: float,
    progress: bool = False,
    model_path: str = "",
) -> dict[str, Any]:
    """Sample every condition, judge the images, and write images.npz, grid.png, prompts.json,
    embeddings.safetensors and attack.json into ``out``; returns attack.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    z, labels = sample_conditions(
        model, result.conditions, num_per_condition, seed, batch_size=batch_size, progress=progress
    )
    images = model.to_uint8(z)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = _judge(detector, images)
    detect_s = time.perf_counter() - t0
    per_prompt = _per_prompt(result, found, labels)
    _write_images(out, result, images, labels, found, num_per_condition)
    outputs = ["attack.json", "images.npz", "grid.png", "prompts.json"]
    outputs += _write_prompts_and_tensors(out, result)
    report: dict[str, Any] = {
        "attack": result.attack,
        "model": model_path,
        "detector": detector.name,
        "asr": _rate(per_prompt, "attack"),
        "baseline_asr": _rate(per_prompt, "baseline"),
        "num_images": sum(r["images"] for r in per_prompt if r["role"] == "attack"),
        "per_prompt": per_prompt,
        "settings": result.settings,
        "seed": seed,
        "sampler": {
            "sampler": model.config.sampler,
            "num_inference_steps": model.config.num_inference_steps,
            "guidance_scale": model.config.guidance_scale,
        },
        **result.info,
        "seconds": {
            **result.info.get("seconds", {}),
            "sampling": round(sample_s, 2),
            "detector": round(detect_s, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "outputs": outputs,
        "environment": environment(),
    }
    write_json(out / "attack.json", report)
    return report


def _judge(detector: Detector, images: Tensor) -> Tensor:
    """The detector's yes/no per image, checked to be one answer per image."""
    found = detector.found(images).bool().cpu()
    if found.shape != (images.shape[0],):
        raise AmnesiaError(
            f"detector {detector.name} gave {tuple(found.shape)} answers for {images.shape[0]} images"
        )
    return found


def _per_prompt(result: AttackOutput, found: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    """attack.json's per-condition rows: how many of its images the detector found the concept in."""
    per_prompt: list[dict[str, Any]] = []
    for i, (cond, role) in enumerate(zip(result.conditions, result.roles, strict=True)):
        hit = found[labels == i]
        per_prompt.append(
            {
                "prompt": cond,
                "role": role,
                "images": int(hit.numel()),
                "found": int(hit.sum()),
                "rate": int(hit.sum()) / hit.numel() if hit.numel() else None,
            }
        )
    return per_prompt


def _rate(per_prompt: list[dict[str, Any]], role: str) -> float | None:
    """The share of found images over the conditions of ``role`` (None when it has no images)."""
    rows = [r for r in per_prompt if r["role"] == role]
    n = sum(r["images"] for r in rows)
    return sum(r["found"] for r in rows) / n if n else None


def _write_images(
    out: Path,
    result: AttackOutput,
    images: Tensor,
    labels: Tensor,
    found: Tensor,
    num_per_condition: int,
) -> None:
    """images.npz (every image with its condition and verdict) and grid.png (a row per condition)."""
    from selective_amnesia.evaluate.report import image_grid, save_png

    with atomic_path(out / "images.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            images=images.permute(0, 2, 3, 1).contiguous().numpy(),
            labels=labels.numpy().astype(np.int64),
            prompts=np.array(result.conditions),
            found=found.numpy(),
        )
    shown = [i for i in range(len(result.conditions))][:GRID_ROWS]
    cols = min(num_per_condition, GRID_COLUMNS)
    rows = [images[labels == i][:cols] for i in shown]
    grid = image_grid(torch.cat(rows), nrow=cols)
    scale = max(1, GRID_MIN_SIDE // images.shape[-1])  # 16-px MNIST-world images are shown larger
    save_png(grid.repeat(scale, axis=0).repeat(scale, axis=1), out / "grid.png")


def _write_prompts_and_tensors(out: Path, result: AttackOutput) -> list[str]:
    """prompts.json, and the attack's tensors when it has any; returns the tensor files written."""
    outputs: list[str] = []
    write_json(
        out / "prompts.json", {"conditions": result.conditions, "roles": result.roles, **result.prompts}
    )
    if result.tensors:
        meta = {"attack": result.attack, "conditions": result.conditions}
        save_tensors(out / "embeddings.safetensors", result.tensors, meta)
        outputs.append("embeddings.safetensors")
    for name, tensors in result.extra_files.items():
        save_tensors(out / name, tensors, {"attack": result.attack})
        outputs.append(name)
    return outputs
