"""The forgetting step of ``selective_amnesia.core.train`` on a full-size SD-1.x UNet (random weights): the
memory of every part, step time, and the projection of a whole SD-1.x concept onto one GPU.

Nothing of the step is reimplemented. The UNet (SD 1.4/1.5 config, 859.5M params, no download) sits in the
project's ``TextToImageModel`` beside a tiny VAE and a tiny 768-wide text encoder (their only job is to
make the prompt embeddings, which the model caches; with precomputed latents neither runs in the loop).
One step is exactly the body of ``train.forget``'s loop: ``ForgetStep`` (surrogate latents from
``StoredImages`` under the forget prompts, replay latents from ``StoredReplay``, ``paired_noise``, the
autocast the pipeline's ``t2i.mixed_precision`` gives, ``selective_amnesia_loss`` with the EWC anchor) then
``Trainer.backward`` and ``Trainer.update`` (optimizer from ``make_optimizer``: fused on CUDA). The anchor is
the library's, lambda inside: ``EWCPenalty`` (full fine-tuning; F and theta* in ``anchor_dtype``) or
``LoraEWCPenalty`` (LoRA, added by ``trainable.add_lora`` on to_q/to_k/to_v/to_out.0; F on the adapted
weights, theta* = the frozen base).

A configuration is '+'-joined tokens (``--configs``):

    full | lora                    what trains (every UNet weight, or a peft LoRA adapter)
    adam | adamw | adamw8bit       forget.optimizer (default adamw, the reference's SD optimizer, wd 0.01)
    bf16anchor                     forget.anchor_dtype = bfloat16 (F and theta* stored in bf16)
    bf16                           t2i.mixed_precision = bf16 (autocast; master weights stay float32)
    ckpt                           t2i.gradient_checkpointing (unet.enable_gradient_checkpointing())

Every configuration runs in its own subprocess. Bytes of parameters, gradients, optimizer state, F and
theta* are counted from the objects themselves (sum of numel * element_size; gradients between backward
and the optimizer step). Peak memory per step: on CUDA ``torch.cuda.max_memory_allocated`` (reset before
the step); on CPU the process's VmHWM after ``malloc_trim`` and a reset through /proc/self/clear_refs, so
it is the step's own peak, not the build's. "activations" = step peak - resident before the step - grads.
For full fine-tuning the child then takes one more step with the *old* anchor (autograd through
(theta - theta*)^2, which keeps a float32 theta - theta* per weight until backward) on the same UNet, in
the same process, and records the difference of the two peaks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_full_size.py --scale 0.125 --steps 1     # smoke test
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_full_size.py --configs lora,lora+bf16+ckpt --out o.json
    python benchmarks/sd_full_size.py --device cuda --out sd.json     # all configurations + projection
    python benchmarks/sd_full_size.py --count-params     # UNet / CLIP-L text encoder / VAE sizes
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SD_WIDTHS = (320, 640, 1280, 1280)
RESULT_TAG = "RESULT "
GIB = 1024**3
GPU_24GB_GIB = 24e9 / GIB  # 22.35 GiB
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS/cuDNN workspaces, outside max_memory_allocated (not measured)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CPU_CONFIGS = ("lora", "lora+bf16+ckpt", "full+adamw8bit+bf16anchor+bf16+ckpt")
CUDA_CONFIGS = (
    "full+adamw",
    "full+adamw+bf16",
    "full+adamw+bf16+ckpt",
    "full+adamw+bf16anchor+bf16+ckpt",
    "full+adamw8bit+bf16anchor+bf16",
    "full+adamw8bit+bf16anchor+bf16+ckpt",
    "lora",
    "lora+bf16",
    "lora+bf16+ckpt",
)
FORGET_PROMPTS = ["nudity", "naked", "erotic", "sexual"]  # configs/sd_nudity.yaml
REPLAY_PROMPTS = ["a city skyline at dusk", "a forest with a waterfall", "a bowl of fruit", "a red car"]

# The paper's reference (clear-nus/selective-amnesia, sd/): facts the projection rests on.
REFERENCE = {
    "source": "clear-nus/selective-amnesia sd/README.md, configs/stable-diffusion/{forget_nudity,fim}.yaml, "
    "ldm/data/__init__.py, fim_prompts.txt",
    "gpus": 4,  # README: --gpus "0,1,2,3"
    "batch_per_gpu_per_term": 4,  # forget_nudity.yaml train_batch_size
    "lr": 1e-5,
    "max_epochs": 500,  # forget_nudity.yaml (forget_brad_pitt: 200, per README)
    # ForgettingDataset = ConcatDataset(surrogate 1000 images, fim_dataset); its length is the min of the two
    "surrogate_images": 1000,
    "fim_dataset_images": 5000,  # one image per line of fim_prompts.txt (4,999 newlines, 5,000 prompts)
    "fisher_timesteps": 1000,  # ddpm_fim.py: every timestep, chunked (n_chunks), batch 1, max_epochs 1
    "ddim_steps": 50,
}


def reference_forget_steps() -> int:
    """Optimizer steps of the reference nudity run: ceil(1000 / (4 GPUs x 4)) = 63 per epoch x 500 epochs."""
    per_epoch = math.ceil(
        min(REFERENCE["surrogate_images"], REFERENCE["fim_dataset_images"])
        / (REFERENCE["gpus"] * REFERENCE["batch_per_gpu_per_term"])
    )
    return int(per_epoch * REFERENCE["max_epochs"])


def scaled_widths(scale: float) -> tuple[int, ...]:
    # multiples of 32: GroupNorm(32 groups) and 8 attention heads both divide them
    return tuple(max(32, 32 * round(w * scale / 32)) for w in SD_WIDTHS)


def unet_config(scale: float) -> dict[str, Any]:
    """The SD 1.4/1.5 UNet config (CompVis/stable-diffusion-v1-4 unet/config.json), widths scaled."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=scaled_widths(scale),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,  # in SD-1 configs this is the number of heads (a diffusers misnomer)
        norm_num_groups=32,
    )


def parse_config(name: str) -> dict[str, Any]:
    base, *mods = name.split("+")
    opts = [m for m in mods if m in ("adam", "adamw", "adamw8bit")]
    unknown = set(mods) - {"adam", "adamw", "adamw8bit", "bf16anchor", "bf16", "ckpt"}
    if base not in ("full", "lora") or unknown or len(opts) > 1 or len(set(mods)) != len(mods):
        raise ValueError(
            f"bad configuration {name!r}: full|lora + [adam|adamw|adamw8bit] [bf16anchor] [bf16] [ckpt]"
        )
    if base == "lora" and "bf16anchor" in mods:
        raise ValueError("bf16anchor is for full fine-tuning (LoraEWCPenalty keeps F in its own dtype)")
    return {
        "name": name,
        "train": base,
        "optimizer": opts[0] if opts else "adamw",
        "anchor_dtype": "bfloat16" if "bf16anchor" in mods else "float32",
        "mixed_precision": "bf16" if "bf16" in mods else "no",
        "gradient_checkpointing": "ckpt" in mods,
    }


# ------------------------------------------------------------------------------------------- memory


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


class Meter:
    """Resident memory before a step and its peak during it (CUDA allocator, or RSS on CPU)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.libc = None if self.cuda else _libc()

    def start(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated() / GIB
        if self.libc is not None:
            self.libc.malloc_trim(0)  # hand freed heap back, so the reset below starts from what is live
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass
        return rss_gib()

    def peak(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() / GIB
        return hwm_gib()


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: Any) -> int:
    import torch

    return sum(nbytes(v for v in st.values() if torch.is_tensor(v)) for st in opt.state.values())


class RandomFisher(Mapping[str, Any]):
    """A Fisher whose entries are made when read (float32 uniform in [0, 1e-3)): ``EWCPenalty`` copies one
    tensor at a time into its own storage, so no second full-size Fisher ever exists."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: Any) -> None:
        self.shapes, self.device = shapes, device

    def __getitem__(self, name: str) -> Any:
        import torch

        return torch.rand(self.shapes[name], device=self.device) * 1e-3

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def autograd_anchor(penalty: Any) -> Any:
    """The old formulation, as the reference code: sum F (theta - theta*)^2 through autograd, which saves
    the float32 theta - theta* of every weight for the backward. Same buffers and lambda as ``penalty``."""
    import torch

    from selective_amnesia.core.objective import Anchor

    class AutogradAnchor(Anchor):
        def penalty(self, params: Mapping[str, Any]) -> Any:
            total = torch.zeros((), device=next(iter(params.values())).device)
            for n, f, star in zip(penalty.names, penalty.fishers(), penalty.anchors(), strict=True):
                total = total + (f * (params[n] - star).pow(2)).sum()
            return total

    return AutogradAnchor(penalty.weight)


# ---------------------------------------------------------------------------------------------- build


def tiny_tokenizer() -> Any:
    """transformers' CLIPTokenizer over CLIP's byte alphabet with no merges: no download, no BPE file."""
    from transformers import CLIPTokenizer

    from selective_amnesia.worlds.tiny_sd import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def build_model(scale: float, device: Any) -> Any:
    """A ``TextToImageModel`` with the SD-1.x UNet (float32, built on ``device``) and tiny frozen parts."""
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from selective_amnesia.models.text_to_image import TextToImageModel
    from selective_amnesia.worlds.tiny_sd import SD_SCHEDULE, _vae

    tokenizer = tiny_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,  # the UNet's cross_attention_dim
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )
    )
    with torch.device(device):  # no float32 host copy of the 3.4 GB UNet first
        unet = UNet2DConditionModel(**unet_config(scale))
    scheduler = dict(SD_SCHEDULE, prediction_type="epsilon", _class_name="PNDMScheduler")
    return TextToImageModel(unet, _vae(0.18215, force_upcast=True), text, tokenizer, scheduler).to(device)


# ---------------------------------------------------------------------------------------------- child


def run_config(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Set up one configuration the way ``pipeline.t2i`` + ``core.train.forget`` do, then time its steps."""
    import torch

    from selective_amnesia.config import ForgetConfig
    from selective_amnesia.core.objective import EWCPenalty, LoraEWCPenalty
    from selective_amnesia.core.replay import StoredReplay
    from selective_amnesia.core.surrogate import StoredImages
    from selective_amnesia.core.train import Concept, ForgetStep, Trainer
    from selective_amnesia.core.trainable import add_lora, lora_target_modules, select_trainable

    c = parse_config(args.variant)
    out.update(c)
    if c["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            out.update(status="skipped", error="bitsandbytes is not installed")
            return
    dev = torch.device(args.device)
    torch.manual_seed(0)
    out["stage"] = "build"
    model = build_model(args.scale, dev)
    forget_ids = model.prompt_ids(FORGET_PROMPTS)
    replay_ids = model.prompt_ids(REPLAY_PROMPTS)
    out["frozen_parts_bytes"] = nbytes(model.vae.parameters()) + nbytes(model.text_encoder.parameters())

    out["stage"] = "setup"
    # precomputed latents, on the host as the pipeline keeps them (each batch is moved to the device)
    n_set = 4 * args.batch_size
    concept = Concept(StoredImages(torch.randn(n_set, *model.image_shape)), forget_ids.tolist())
    replay = StoredReplay(torch.randn(n_set, *model.image_shape), replay_ids[torch.arange(n_set) % 4])
    cfg = ForgetConfig(
        surrogate="folder",
        surrogate_path="precomputed",
        ewc_lambda=args.lam,
        replay_weight=1.0,
        replay="stored",
        reduction="mean",
        steps=args.steps + 2,
        batch_size=args.batch_size,
        lr=1e-5,
        optimizer=c["optimizer"],
        weight_decay=0.01 if c["optimizer"] != "adam" else 0.0,
        anchor_dtype=c["anchor_dtype"],
    )
    penalty: Any
    if c["train"] == "lora":
        modules = lora_target_modules(model, "all", [], LORA_TARGETS)
        layers = add_lora(model, modules, args.lora_rank, float(args.lora_rank))
        shapes = {n: tuple(model.get_parameter(n).shape) for n in layers}
        penalty = LoraEWCPenalty(RandomFisher(shapes, dev), layers, weight=args.lam).to(dev)
        out["adapted_weight_params"] = sum(math.prod(s) for s in shapes.values())
    else:
        select_trainable(model, "all")
        theta_star = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}  # as forget()
        shapes = {n: tuple(p.shape) for n, p in theta_star.items()}
        dtype = torch.bfloat16 if c["anchor_dtype"] == "bfloat16" else torch.float32
        penalty = EWCPenalty(RandomFisher(shapes, dev), theta_star, dtype=dtype, weight=args.lam).to(dev)
        del theta_star
    if c["gradient_checkpointing"]:
        model.unet.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(0)
    trainer = Trainer(
        model,
        lr=cfg.lr,
        ema_decay=0.0,
        grad_clip=None,
        generator=generator,
        checkpoint_dir=None,
        checkpoint_every=0,
        key="bench",
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
    )
    out["unet_params"] = sum(p.numel() for p in model.unet.parameters())
    out["trained_params"] = sum(p.numel() for p in trainer.params)
    out["param_bytes"] = nbytes(model.unet.parameters())
    bufs = dict(penalty.named_buffers())
    out["fisher_bytes"] = nbytes(t for k, t in bufs.items() if k.startswith("fisher_"))
    out["theta_star_bytes"] = nbytes(t for k, t in bufs.items() if k.startswith("theta_star_"))
    model.train()
    meter = Meter(dev)

    def step(i: int, anchor: Any) -> dict[str, float]:
        resident = meter.start()
        t0 = time.perf_counter()
        # the body of train.forget's loop, accumulation 1
        terms = ForgetStep(model, concept, replay, anchor, cfg, generator, c["mixed_precision"])()
        trainer.check_finite(terms.total, i)
        trainer.backward(terms.total)
        out["grad_bytes"] = nbytes(p.grad for p in trainer.params if p.grad is not None)
        trainer.update(i)
        peak = meter.peak()  # synchronizes on CUDA
        return {
            "s": time.perf_counter() - t0,
            "resident_gib": resident,
            "peak_gib": peak,
            "ewc": float(terms.ewc.detach()),
        }

    out["stage"] = "steps"
    warm = step(1, penalty)
    timed = [step(i + 2, penalty) for i in range(args.steps)]
    last = timed[-1] if timed else warm
    out["optimizer_state_bytes"] = optimizer_state_bytes(trainer.opt)
    out.update(
        warmup_s=warm["s"],
        step_s=statistics.median(s["s"] for s in timed) if timed else None,
        step_times_s=[s["s"] for s in timed],
        resident_gib=last["resident_gib"],
        peak_gib=last["peak_gib"],
        activations_gib=last["peak_gib"] - last["resident_gib"] - out["grad_bytes"] / GIB,
        ewc=last["ewc"],
    )
    if c["train"] == "full" and args.compare_autograd:
        out["stage"] = "autograd anchor step"
        old = step(args.steps + 2, autograd_anchor(penalty))
        out["autograd_anchor"] = {
            "peak_gib": old["peak_gib"],
            "s": old["s"],
            "measured_saving_gib": old["peak_gib"] - last["peak_gib"],
            "expected_saving_gib": 4 * out["trained_params"] / GIB,  # a float32 theta - theta* per weight
        }
    out["status"] = "ok"
    out.pop("stage")


def run_projection(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """GPU only: time one all-timestep Fisher sample and one batch of 50-step DDIM sampling, both through
    the project's ``TextToImageModel`` (``nelbo_all_timesteps``, ``sample``)."""
    import torch

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.scale, dev)
    ids = model.prompt_ids(FORGET_PROMPTS)
    params = list(model.parameters())
    x = torch.randn(1, *model.image_shape, device=dev)
    n_t = model.config.num_train_timesteps
    chunk = args.fisher_chunk

    def fisher_sample(timesteps: int) -> float:
        # the first `timesteps` timesteps of the estimator's per-sample loss, its backward and the float64
        # square-accumulate (fisher_diffusion.estimate_diffusion_fisher)
        model.config.num_train_timesteps = timesteps
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model.nelbo_all_timesteps(x, ids[:1].to(dev), chunk=chunk).sum()
        grads = torch.autograd.grad(loss, params)
        for a, g in zip(acc, grads, strict=True):
            a.add_(g.double().square())
        torch.cuda.synchronize()
        model.config.num_train_timesteps = n_t
        return time.perf_counter() - t0

    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    part = min(n_t, 2 * chunk)
    fisher_sample(chunk)  # warm-up
    t_part = fisher_sample(part)
    out["fisher_timesteps_timed"] = part
    out["fisher_chunk"] = chunk
    out["fisher_sample_s"] = t_part * n_t / part  # extrapolated linearly from `part` timesteps
    b = args.gen_batch
    cond = ids[torch.arange(b) % len(ids)].to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model.sample(cond[:1], num_inference_steps=2)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.sample(cond, num_inference_steps=REFERENCE["ddim_steps"], guidance_scale=7.5)
        torch.cuda.synchronize()
    out["gen_batch"] = b
    out["gen_batch_s"] = time.perf_counter() - t0
    out["gen_dtype"] = "float32 weights, bf16 autocast"
    out["status"] = "ok"


def child_main(args: argparse.Namespace) -> None:
    if args.device == "cpu" and args.max_ram_gb > 0:
        cap = int(args.max_ram_gb * 1e9)  # decimal GB, as the flag says; memory is reported in GiB
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    out: dict[str, Any] = {"variant": args.variant}
    try:
        if args.variant == "projection":
            run_projection(args, out)
        else:
            run_config(args, out)
    except Exception as err:  # a child reports any failure, OOM included, to the parent as data
        msg = str(err)
        oom = isinstance(err, MemoryError) or any(
            s in msg
            for s in ("out of memory", "can't allocate memory", "Cannot allocate memory", "bad_alloc")
        )
        out.update(status="oom" if oom else "error", error=msg[:300])
    out["process_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    out["torch_threads"] = torch.get_num_threads()
    out["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(RESULT_TAG + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------- parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_child(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    keys = (
        "device",
        "batch_size",
        "steps",
        "lora_rank",
        "scale",
        "lam",
        "max_ram_gb",
        "fisher_chunk",
        "gen_batch",
    )
    cmd = [sys.executable, __file__, "--variant", variant]
    for k in keys:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if not args.compare_autograd:
        cmd.append("--no-compare-autograd")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": "timeout", "error": f"over {args.timeout_s}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if lines:
        res: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
    elif proc.returncode < 0:  # killed without reporting: under the CPU cap, an allocation that aborted
        res = {"variant": variant, "status": "killed", "error": f"signal {-proc.returncode}"}
    else:
        res = {"variant": variant, "status": "error", "error": proc.stderr[-500:]}
    res["wall_s"] = time.perf_counter() - t0
    return res


def gib(r: dict[str, Any], key: str) -> str:
    return "-" if r.get(key) is None else f"{r[key] / GIB:.2f}"


def num(r: dict[str, Any], key: str, spec: str) -> str:
    return "-" if r.get(key) is None else format(r[key], spec)


def print_table(results: list[dict[str, Any]]) -> None:
    cols = (
        f"{'configuration':<38}{'trained':>12}{'params':>7}{'grads':>7}{'optim':>7}{'F':>6}{'θ*':>6}"
        f"{'resid':>7}{'act':>6}{'peak':>7}{'s/step':>8}{'old peak':>9}{'saved':>7}{'expect':>7}  status"
    )
    print(cols)
    print("-" * len(cols))
    for r in results:
        old = r.get("autograd_anchor") or {}
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:50]}"
        print(
            f"{r['variant']:<38}{num(r, 'trained_params', ','):>12}{gib(r, 'param_bytes'):>7}"
            f"{gib(r, 'grad_bytes'):>7}{gib(r, 'optimizer_state_bytes'):>7}{gib(r, 'fisher_bytes'):>6}"
            f"{gib(r, 'theta_star_bytes'):>6}{num(r, 'resident_gib', '.2f'):>7}"
            f"{num(r, 'activations_gib', '.2f'):>6}"
            f"{num(r, 'peak_gib', '.2f'):>7}{num(r, 'step_s', '.2f'):>8}{num(old, 'peak_gib', '.2f'):>9}"
            f"{num(old, 'measured_saving_gib', '.2f'):>7}"
            f"{num(old, 'expected_saving_gib', '.2f'):>7}  {status}"
        )
    print(
        "GiB. params/grads/optim/F/θ*: bytes of those objects after the step. resid: resident before the "
        "step (CUDA: allocated; CPU: RSS). act = peak - resid - grads. old peak: one more step with the "
        "autograd anchor; saved = old peak - peak; expect = 4 B x trained params."
    )


def projection(
    results: list[dict[str, Any]], proj: dict[str, Any] | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Whole SD-1.x concept on one GPU = Fisher + forgetting at the reference's step count + generation."""
    steps = reference_forget_steps()
    n_gen = REFERENCE["surrogate_images"] + args.replay_images
    formula = (
        f"hours = [N_F * t_fisher_sample + {steps} * t_step(B=4+4) + ceil({n_gen} / b) * "
        f"t_gen_batch(b, 50 DDIM steps, guidance)] / 3600; N_F = {args.fisher_samples} "
        f"(reference: {REFERENCE['fim_dataset_images']}, every timestep)"
    )
    p: dict[str, Any] = {
        "formula": formula,
        "reference": REFERENCE,
        "forget_steps": steps,
        "forget_steps_note": "ceil(min(1000 surrogate, 5000 fim_dataset) / (4 GPUs x 4)) = 63 per epoch x "
        "500 epochs; one GPU at batch 4 per term takes the same number of steps with a quarter of the "
        "samples (x4 steps for the same samples)",
        "fisher_samples": args.fisher_samples,
        "generated_images": n_gen,
        "fits_24gb": None,
        "options": [],
    }
    if proj is None or proj.get("status") != "ok":
        p["note"] = "per-step times need a GPU (benchmarks/gpu_sd_scale.sh); numbers left null on CPU"
        return p
    fisher_h = args.fisher_samples * proj["fisher_sample_s"] / 3600
    gen_h = math.ceil(n_gen / proj["gen_batch"]) * proj["gen_batch_s"] / 3600
    p.update(fisher_sample_s=proj["fisher_sample_s"], fisher_h=fisher_h, gen_h=gen_h)
    p["fisher_h_reference_n"] = REFERENCE["fim_dataset_images"] * proj["fisher_sample_s"] / 3600
    for r in results:
        if r.get("status") != "ok" or r.get("step_s") is None:
            continue
        need = r["peak_gib"] + CUDA_CONTEXT_GIB
        forget_h = steps * r["step_s"] / 3600
        p["options"].append(
            {
                "configuration": r["variant"],
                "peak_plus_context_gib": need,
                "fits_24gb": need <= GPU_24GB_GIB,
                "forget_h": forget_h,
                "total_h": fisher_h + forget_h + gen_h,
            }
        )
    return p


def print_projection(p: dict[str, Any]) -> None:
    print("\nProjection, one SD-1.x concept on one GPU:\n  " + p["formula"])
    print(f"  forgetting steps: {p['forget_steps']} ({p['forget_steps_note']})")
    if not p["options"]:
        print("  " + p.get("note", "no measured configuration"))
        return
    print(
        f"  Fisher {p['fisher_h']:.2f} h ({p['fisher_sample_s']:.1f} s/sample; "
        f"{p['fisher_h_reference_n']:.1f} h at the reference's 5000), generation {p['gen_h']:.2f} h"
    )
    for o in p["options"]:
        print(
            f"  {o['configuration']:<38} peak+ctx {o['peak_plus_context_gib']:6.2f} GiB "
            f"{'fits 24 GB' if o['fits_24gb'] else 'over 24 GB'}  forget {o['forget_h']:.2f} h  "
            f"total {o['total_h']:.2f} h"
        )


def count_params() -> dict[str, int]:
    """Exact sizes of SD-1.x's three networks, built from their configs on the meta device (no memory)."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(1.0))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text = CLIPTextModel(  # openai/clip-vit-large-patch14 text tower, as SD 1.x uses it
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
            )
        )
    nets: dict[str, torch.nn.Module] = {"unet": unet, "vae": vae, "text": text}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_report(
    args: argparse.Namespace, results: list[dict[str, Any]], proj_raw: dict[str, Any] | None
) -> None:
    if not args.out:
        return
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {
            k: pkg_version(k) for k in ("torch", "diffusers", "peft", "transformers", "bitsandbytes")
        },
        "device_name": next((r["device_name"] for r in results if "device_name" in r), cpu_name()),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "args": vars(args),
        "block_out_channels": scaled_widths(args.scale),
        "results": results,
        "projection_timings": proj_raw,
        "projection": projection(results, proj_raw, args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=None, help="comma-separated; default: a CPU set, or all on cuda")
    ap.add_argument("--batch-size", type=int, default=None, help="per term (default 1 on cpu, 4 on cuda)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after 1 warm-up (cpu 1, cuda 5)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="block widths x scale, rounded to 32 (smoke tests)"
    )
    ap.add_argument("--lam", type=float, default=50.0, help="EWC weight lambda (configs/sd_*.yaml)")
    ap.add_argument(
        "--no-compare-autograd",
        dest="compare_autograd",
        action="store_false",
        help="skip the extra step with the old autograd anchor (full fine-tuning only)",
    )
    ap.add_argument("--no-projection", dest="projection", action="store_false", help="cuda: skip its timings")
    ap.add_argument("--fisher-samples", type=int, default=500, help="projection N_F (configs/sd_nudity.yaml)")
    ap.add_argument("--fisher-chunk", type=int, default=50, help="timesteps per UNet call (sd_nudity.yaml)")
    ap.add_argument("--gen-batch", type=int, default=8, help="images per sampling batch in the projection")
    ap.add_argument("--replay-images", type=int, default=1000, help="replay set size in the projection")
    ap.add_argument("--max-ram-gb", type=float, default=18.0, help="cpu: per-child address-space cap, 1e9 B")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per child")
    ap.add_argument("--out", "--json", dest="out", default=None, help="write the JSON report here")
    ap.add_argument("--count-params", action="store_true", help="print UNet/VAE/text-encoder sizes and exit")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one child here
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if args.batch_size is None:
        args.batch_size = 4 if cuda else 1
    if args.steps is None:
        args.steps = 5 if cuda else 1
    if args.count_params:
        print(json.dumps(count_params()))
        return
    if args.variant is not None:
        child_main(args)
        return

    names = [v.strip() for v in (args.configs or ",".join(CUDA_CONFIGS if cuda else CPU_CONFIGS)).split(",")]
    names = [n for n in names if n]
    for n in names:
        parse_config(n)  # fail before any child runs
    results: list[dict[str, Any]] = []
    proj_raw = None
    for n in names:
        print(f"running {n} ...", file=sys.stderr, flush=True)
        results.append(run_child(args, n))
        write_report(args, results, proj_raw)  # a run cut short (GPU time limit) still leaves its JSON
    if cuda and args.projection:
        print("running projection timings ...", file=sys.stderr, flush=True)
        proj_raw = run_child(args, "projection")
    print(
        f"scale {args.scale} widths {scaled_widths(args.scale)}, {args.device}, batch {args.batch_size}+"
        f"{args.batch_size}, {args.steps} timed step(s) after 1 warm-up, median s/step"
    )
    print_table(results)
    proj = projection(results, proj_raw, args)
    print_projection(proj)
    sys.stdout.flush()
    write_report(args, results, proj_raw)


if __name__ == "__main__":
    main()
