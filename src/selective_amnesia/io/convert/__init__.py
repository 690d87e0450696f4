"""``amnesia convert``: legacy checkpoints of the paper's reference code to safetensors, safely, and Stable
Diffusion between its single-file (CompVis/A1111) and diffusers layouts.

The reference code (github clear-nus/selective-amnesia) writes these files; what each holds was read from
its sources (paths relative to that repository):

* MNIST VAE, ``vae/train_cvae.py`` and ``vae/train_forget.py``: ``torch.save({"model": state_dict,
  "config": argparse.Namespace}, "ckpts/ckpt.pt")``. The state dict is ``OneHotCVAE`` (``vae/model.py``):
  ``fc1 fc2 fc31 fc32 fc4 fc5 fc6`` ``.weight/.bias``; the Namespace holds ``x_dim h_dim1 h_dim2 z_dim``,
  ``dataset`` and its run directories.
* VAE Fisher, ``vae/calculate_fim.py``: ``pickle.dump(fisher_dict)`` (plain pickle, not ``torch.save``)
  of ``{parameter name: tensor}`` to ``fisher_dict.pkl``, per-sample squared gradients averaged.
* DDPM, ``ddpm/runners/diffusion.py``: ``torch.save([model.state_dict(), optimizer.state_dict(), step,
  (ema_helper.state_dict())], "ckpts/ckpt.pth")``, every name prefixed ``module.`` (``DataParallel``);
  its ``fisher_dict.pkl`` is again a plain pickle with ``module.`` names.
* Stable Diffusion, ``sd/main_forget.py`` (PyTorch Lightning 1.4.2, ``sd/environment.yaml``): a Lightning
  ``.ckpt`` with the CompVis weights under ``"state_dict"``; ``sd/ldm/models/diffusion/ddpm_fim.py`` and
  ``sd/combine_fisher_dict.py`` write ``full_fisher_dict.pkl`` (plain pickle, highest protocol) keyed by
  ``diffusion_model.*``.

What is supported:

* ``--to safetensors`` (every format above): the chosen state dict (``--key``; by default ``state_dict``
  or ``model`` of a dict, element 0 of the DDPM list, else everything) flattened to dotted names, a
  ``module.`` prefix common to all names dropped, written as one ``.safetensors`` whose metadata names the
  source file and its sha256. A converted CompVis ``.ckpt`` can go to diffusers' ``from_single_file``.
* ``--to cvae``: a reference MNIST VAE checkpoint to our model directory. The architectures are the same
  (``models/cvae.py`` concatenates ``[x, onehot]`` and ``[z, onehot]`` in the same order and ends in a
  sigmoid), so the mapping is a renaming, checked by loading with ``strict=True``.
* ``--to fisher --model DIR``: a reference VAE Fisher onto our CVAE parameter names, or any Fisher whose
  names already are the model's; checked with ``Fisher.check_matches``.

* ``--to diffusers --config DIR``: a CompVis/A1111 single-file Stable Diffusion 1.x/2.x/XL checkpoint
  (``.safetensors``, or a ``.ckpt`` read here weights-only and handed on as safetensors) to a stock
  diffusers directory through diffusers' ``from_single_file``; ``DIR`` is a local diffusers directory of
  the same architecture that supplies the component configs, tokenizer(s) and scheduler, so nothing is
  downloaded. Components the file lacks come from ``DIR`` and the summary says so.
* ``--to single-file``: a diffusers SD 1.x/2.x/XL pipeline directory to one original-layout
  ``.safetensors`` (UNet, VAE, text encoder(s) under LDM names), the inverse of diffusers' converters and
  checked with them before it is written (section "Stable Diffusion single files" below).

Not supported: the reference DDPM UNet cannot be mapped onto our diffusers ``UNet2DModel``. It projects
``concat(silu(t_emb), silu(c_emb))`` in every residual block where diffusers adds the class embedding to
the time embedding before one projection, so its weights (and Fisher) have no exact counterpart; convert
them with ``--to safetensors`` only. Likewise the Stable Diffusion Fisher is not renamed to diffusers
names. Nothing here trains or evaluates; a converted Fisher must belong to the converted weights.

Safety: files are read only by ``torch.load(..., weights_only=True)`` (zip or legacy torch format) or, for
plain pickles, by an unpickler that resolves exactly the globals a pickled tensor needs (see
``_TensorUnpickler``). No other global is ever resolved; a file naming one is refused.
"""

from __future__ import annotations

from selective_amnesia.io.convert.legacy import (
    REFERENCE_VAE_NAMES,
    Converted,
    convert_fisher,
    convert_to_cvae,
    convert_to_safetensors,
    flatten_tensors,
    map_reference_vae,
    reference_vae_config,
    select,
    strip_data_parallel,
)
from selective_amnesia.io.convert.safe_load import file_sha256, load_legacy
from selective_amnesia.io.convert.single_file import (
    SDComponents,
    check_single_file,
    clip_to_ldm,
    convert_single_file_to_diffusers,
    export_single_file,
    open_clip_to_ldm,
    pipeline_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

__all__ = [
    "REFERENCE_VAE_NAMES",
    "Converted",
    "SDComponents",
    "check_single_file",
    "clip_to_ldm",
    "convert_fisher",
    "convert_single_file_to_diffusers",
    "convert_to_cvae",
    "convert_to_safetensors",
    "export_single_file",
    "file_sha256",
    "flatten_tensors",
    "load_legacy",
    "map_reference_vae",
    "open_clip_to_ldm",
    "pipeline_to_ldm",
    "reference_vae_config",
    "select",
    "strip_data_parallel",
    "unet_to_ldm",
    "vae_to_ldm",
]
