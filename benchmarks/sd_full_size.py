"""One Selective-Amnesia forgetting step on a full-size SD-1.x UNet (random weights): time and peak memory.

The UNet is built from the SD 1.4/1.5 config (859.5M params, no download). One step (paper Eq. 4):

    forget eps-MSE (batch B) + gamma * replay eps-MSE (batch B) + lambda * sum_i F_i (theta_i - theta*_i)^2

then backward and an Adam step. Variants (``--variants``, '+'-joined tokens):

    full       every UNet weight trained; Fisher F and theta* are full copies, working dtype, on the device
    lora       peft LoRA on to_q/to_k/to_v/to_out.0 (as diffusers' train_text_to_image_lora.py); the EWC
               term is on the effective weights W0 + s*B@A: sum F_W * (s*B@A)^2, theta* = W0 (no extra copy)
    +ckpt      unet.enable_gradient_checkpointing()
    +host      (full only) F and theta* live in host memory and are copied to the device every step, as the
               paper's reference code did; meaningless on --device cpu, so skipped there

Each variant runs in its own subprocess (this script with ``--variant``). On CPU the child caps its address
space at ``--max-ram-gb`` so a variant that does not fit reports out-of-memory instead of taking the machine
down, and its peak memory is the child's ru_maxrss (whole process: interpreter, torch, build; nothing
subtracted). On CUDA it is torch.cuda.max_memory_allocated after a reset just before the first step.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_full_size.py --scale 0.125 --steps 1     # smoke test
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd_full_size.py --variants lora,lora+ckpt --json out.json
    .venv/bin/python benchmarks/sd_full_size.py --device cuda --dtype bfloat16 --fisher-on-host
    .venv/bin/python benchmarks/sd_full_size.py --count-params     # UNet / CLIP-L text encoder / VAE sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ALL_VARIANTS = ("full", "full+ckpt", "lora", "lora+ckpt")
SD_WIDTHS = (320, 640, 1280, 1280)
RESULT_TAG = "RESULT "
GIB = 1024**3


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


def parse_variant(name: str) -> tuple[str, set[str]]:
    base, *mods = name.split("+")
    if (
        base not in ("full", "lora")
        or not set(mods) <= {"ckpt", "host"}
        or ("host" in mods and base != "full")
    ):
        raise ValueError(f"unknown variant {name!r}: full|lora, optionally +ckpt, full also +host")
    return base, set(mods)


# ----------------------------------------------------------------------------------------------- child


def rss_now_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def is_oom(err: BaseException) -> bool:
    msg = str(err)
    return isinstance(err, MemoryError) or any(
        s in msg for s in ("out of memory", "can't allocate memory", "Cannot allocate memory", "bad_alloc")
    )


def run_variant(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Build, set up and time one variant in this process, filling ``out`` as it goes (kept on failure)."""
    import torch

    # concrete module paths: diffusers' top-level lazy exports hide the classes from type checkers
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    base, mods = parse_variant(args.variant)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    low_precision = dtype != torch.float32
    torch.manual_seed(0)
    out["stage"] = "build"

    # build straight in the working dtype on the device: no fp32 host copy of the 3.4 GB UNet first
    torch.set_default_dtype(dtype)
    with dev:
        unet = UNet2DConditionModel(**unet_config(args.scale))
    torch.set_default_dtype(torch.float32)
    unet.train()
    if "ckpt" in mods:
        unet.enable_gradient_checkpointing()
    out["unet_params"] = sum(p.numel() for p in unet.parameters())
    out["stage"] = "setup"

    if base == "full":
        params = list(unet.parameters())
        on_host = "host" in mods
        store = torch.device("cpu") if on_host else dev
        pin = on_host and dev.type == "cuda"
        fisher = [torch.rand(p.shape, dtype=dtype, device=store, pin_memory=pin) for p in params]
        theta_star = [p.detach().to(store, copy=True) for p in params]
        if pin:
            theta_star = [t.pin_memory() for t in theta_star]
        ewc_bytes = sum(t.numel() * t.element_size() for t in fisher + theta_star)
        lora_layers: list[Any] = []
    else:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as LoraLinear

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        # as diffusers' LoRA script: frozen base in the working dtype, trainable adapters in fp32
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in unet.parameters() if p.requires_grad]
        lora_layers = [m for m in unet.modules() if isinstance(m, LoraLinear)]
        # F only for the adapted W; theta* = W0 is the frozen base weight itself, so it costs nothing extra
        fisher = [torch.rand(m.base_layer.weight.shape, dtype=dtype, device=dev) for m in lora_layers]
        theta_star = []
        ewc_bytes = sum(t.numel() * t.element_size() for t in fisher)
        out["adapted_layers"] = len(lora_layers)
        out["adapted_weight_params"] = sum(m.base_layer.weight.numel() for m in lora_layers)

    out["trained_params"] = sum(p.numel() for p in params)
    out["fisher_theta_star_bytes"] = ewc_bytes
    # fused Adam: no full-size foreach temporaries (the foreach path allocates e.g. sqrt(v) for all params)
    opt = torch.optim.Adam(params, lr=1e-5, fused=True)

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    alphas_cumprod = sched.alphas_cumprod.to(dev)
    b = args.batch_size

    def sa_loss() -> torch.Tensor:
        # forget batch and replay batch in one forward of 2B; per-term means keep Eq. 4's weighting
        x0 = torch.randn(2 * b, 4, 64, 64, device=dev)
        emb = torch.randn(2 * b, 77, 768, device=dev, dtype=dtype)
        t = torch.randint(0, 1000, (2 * b,), device=dev)
        noise = torch.randn_like(x0)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(dtype)
        with torch.autocast(dev.type, dtype=dtype, enabled=low_precision):
            pred = unet(x_t, t, encoder_hidden_states=emb).sample
        mse = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        return mse[:b].mean() + args.gamma * mse[b:].mean()

    def ewc_full() -> float:
        # analytic gradient 2*lam*F*(theta-theta*), one tensor at a time: autograd would keep a full-size
        # (theta - theta*) for backward, i.e. one more copy of the model
        total = torch.zeros((), device=dev)
        with torch.no_grad():
            for p, f, s in zip(params, fisher, theta_star, strict=True):
                f = f.to(dev, non_blocking=True)
                d = p - s.to(dev, non_blocking=True)
                fd = f * d
                if p.grad is None:  # a parameter the UNet forward did not use
                    p.grad = torch.zeros_like(p)
                p.grad.add_(fd, alpha=2 * args.lam)
                total += (fd * d).sum(dtype=torch.float32)
        return float(total) * args.lam

    def ewc_lora() -> float:
        # per layer: materialise s*B@A (fp32), backward its penalty, drop its graph before the next layer
        total = torch.zeros((), device=dev)
        for m, f in zip(lora_layers, fisher, strict=True):
            delta = m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
            pen = args.lam * (f.float() * delta.square()).sum()
            pen.backward()
            total += pen.detach()  # no float() here: that would sync the GPU once per layer
        return float(total)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float, float]:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)  # grads exist after step 1: no reallocation, steady-state memory
        loss = sa_loss()
        loss.backward()
        pen = ewc_full() if base == "full" else ewc_lora()
        opt.step()
        sync()
        return time.perf_counter() - t0, float(loss), pen

    out["stage"] = "steps"
    if dev.type == "cuda":
        out["resident_before_steps_gb"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    else:
        out["rss_before_steps_gb"] = rss_now_gb()
    warmup_s = step()[0]
    timed = [step() for _ in range(args.steps)]
    times = [t for t, _, _ in timed]
    out.update(
        status="ok",
        warmup_s=warmup_s,
        step_s=statistics.median(times),
        step_times_s=times,
        # from the last step: the EWC term is 0 on step 1 (theta = theta*, LoRA B = 0), not after it
        loss=timed[-1][1] if timed else None,
        ewc=timed[-1][2] if timed else None,
    )
    if dev.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / GIB
        out["peak_kind"] = "torch.cuda.max_memory_allocated"
    out.pop("stage")


def child_main(args: argparse.Namespace) -> None:
    if args.device == "cpu" and args.max_ram_gb > 0:
        cap = int(args.max_ram_gb * 1e9)  # decimal GB, as the flag says; memory is reported in GiB
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    out: dict[str, Any] = {"variant": args.variant}
    try:
        run_variant(args, out)
    except Exception as err:  # a child reports any failure, OOM included, to the parent as data
        out.update(status="oom" if is_oom(err) else "error", error=str(err)[:300])
    if args.device == "cpu":
        out["peak_gb"] = peak_rss_gb()
        out["peak_kind"] = "child ru_maxrss (whole process, nothing subtracted)"
    out["torch_threads"] = torch.get_num_threads()
    out["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(RESULT_TAG + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child_cmd(args: argparse.Namespace, variant: str) -> list[str]:
    keys = ("device", "dtype", "batch_size", "steps", "lora_rank", "scale", "gamma", "lam", "max_ram_gb")
    cmd = [sys.executable, __file__, "--variant", variant]
    for k in keys:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return cmd


def run_child(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            child_cmd(args, variant), capture_output=True, text=True, timeout=args.timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": "timeout", "error": f"over {args.timeout_s}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if lines:
        res = json.loads(lines[-1][len(RESULT_TAG) :])
    elif proc.returncode < 0:
        # killed without reporting: on CPU under the cap that is almost always an allocation that aborted
        res = {"variant": variant, "status": "killed", "error": f"signal {-proc.returncode}"}
    else:
        res = {"variant": variant, "status": "error", "error": proc.stderr[-500:]}
    res["wall_s"] = time.perf_counter() - t0
    return res


def fmt_status(r: dict[str, Any], args: argparse.Namespace) -> str:
    if r["status"] == "ok":
        return "ok"
    if r["status"] in ("oom", "killed") and args.device == "cpu":
        return f"out of memory at {args.max_ram_gb:g} GB cap ({r['status']} in {r.get('stage', '?')})"
    return f"{r['status']}: {r.get('error', '')[:60]}"


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def num(r: dict[str, Any], key: str, spec: str, div: float | None = None) -> str:
        return "-" if r.get(key) is None else format(r[key] / div if div else r[key], spec)

    head = (
        f"{'variant':<16}{'trained':>14}{'F+θ* GiB':>10}{'s/step':>9}{'warmup s':>10}{'peak GiB':>10}  status"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['variant']:<16}{num(r, 'trained_params', ','):>14}"
            f"{num(r, 'fisher_theta_star_bytes', '.2f', GIB):>10}{num(r, 'step_s', '.2f'):>9}"
            f"{num(r, 'warmup_s', '.2f'):>10}{num(r, 'peak_gb', '.2f'):>10}  {fmt_status(r, args)}"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=None, help="per term (default 1 on cpu, 4 on cuda)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after 1 warm-up (cpu 2, cuda 5)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS))
    ap.add_argument("--fisher-on-host", action="store_true", help="also run full[+ckpt]+host")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="block widths x scale, rounded to 32 (smoke tests)"
    )
    ap.add_argument("--gamma", type=float, default=1.0, help="replay weight")
    ap.add_argument("--lam", type=float, default=100.0, help="EWC weight lambda")
    ap.add_argument(
        "--max-ram-gb", type=float, default=12.0, help="cpu: per-variant address-space cap, 1e9 bytes"
    )
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per variant")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--count-params", action="store_true", help="print UNet/VAE/text-encoder sizes and exit")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant, here
    args = ap.parse_args()
    if args.device == "cpu" and args.dtype == "float16":
        ap.error("on cpu use float32 or bfloat16")
    if args.batch_size is None:
        args.batch_size = 1 if args.device == "cpu" else 4
    if args.steps is None:
        args.steps = 2 if args.device == "cpu" else 5

    if args.count_params:
        print(json.dumps(count_params()))
        return
    if args.variant is not None:
        child_main(args)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.fisher_on_host:
        variants += [v + "+host" for v in variants if parse_variant(v)[0] == "full" and "+host" not in v]
    for v in variants:
        parse_variant(v)
    results = []
    for v in variants:
        if "host" in parse_variant(v)[1] and args.device == "cpu":
            results.append({"variant": v, "status": "skipped", "error": "host is the device on cpu"})
            continue
        print(f"running {v} ...", file=sys.stderr, flush=True)
        results.append(run_child(args, v))
    print(
        f"scale {args.scale} widths {scaled_widths(args.scale)}, {args.device} {args.dtype}, "
        f"batch {args.batch_size}+{args.batch_size}, {args.steps} timed step(s), median s/step"
    )
    print_table(results, args)
    report = {
        "torch": version("torch"),
        "diffusers": version("diffusers"),
        "peft": version("peft"),
        "device_name": next((r["device_name"] for r in results if "device_name" in r), cpu_name()),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "args": vars(args),
        "block_out_channels": scaled_widths(args.scale),
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
