"""A probe, not a method: can the world's UNet itself stop drawing sevens under free soft prompts?

Starting from a finished forgetting run (its forget/ pipeline and cached sets), fine-tune the UNet with
no anchor on three terms, then judge it with benchmarks/t2i_robust.py (docs/robustness.md, "the free
soft prompt"):

- concept ablation under a pool of free soft prompts (whole embedding sequences) that follow the model:
  every step two of them take one Adam step of the soft-prompt attack, and every --reset steps one
  restarts from a forget prompt's embedding; with --kept-share, that share of the rows is under a random
  kept prompt instead (no prompt at all denoises a seven);
- the surrogate's images under the pool's soft prompts (SA's forget term);
- the run's own outputs, frozen, on its prompts over its replay, template-replay, empty-prompt and
  surrogate images (distillation in place of replay and the Fisher anchor).

    python benchmarks/t2i_pool_probe.py --run runs/robust/sa --out runs/probe/kept25 --kept-share 0.25
    python benchmarks/t2i_pool_probe.py ... ; python benchmarks/t2i_robust.py --run runs/probe/kept25 ...
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor

from selective_amnesia.attacks.common import denoising_loss
from selective_amnesia.core.defences import read_templates, template_prompts
from selective_amnesia.io.artifacts import load_tensors
from selective_amnesia.models.conditioning import HIDDEN, unet_kwargs
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.pipeline.t2i import read_prompts

FORGET = ["a handwritten 7", "the number seven", "a drawing of the digit seven", "the digit 7"]
KEPT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "eight", "nine"]
KEPT_WORDS += [str(d) for d in range(10) if d != 7]


def cached(run: Path, name: str) -> Tensor:
    files = sorted((run / name).glob("*.safetensors"))
    return torch.cat([load_tensors(f)[0]["latents"] for f in files])


def eps_of(model: TextToImageModel, x_t: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
    out: Tensor = model.unet(x_t, t, **unet_kwargs({HIDDEN: hidden})).sample
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished t2i_mnist_robust run directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--reset", type=int, default=50)
    p.add_argument("--kept-share", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--replay-prompts", default="configs/prompts/mnist_world_replay.txt")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    targets, surrogate = cached(args.run, "adversarial_targets"), cached(args.run, "surrogate")
    names = ("replay", "template_replay", "unconditional_replay")
    keep_x = torch.cat([*(cached(args.run, n) for n in names), surrogate])
    student = TextToImageModel.from_pretrained(args.run / "forget")
    teacher = TextToImageModel.from_pretrained(args.run / "forget").requires_grad_(False)
    templates = read_templates(None)
    kept = read_prompts(Path(args.replay_prompts)) + ["a handwritten 1", ""]
    kept += template_prompts(templates, KEPT_WORDS)
    told = kept + FORGET + template_prompts(templates, ["seven", "7"])  # what the run was trained on
    e_kept, e_told = (teacher.encode_prompts(ps)[HIDDEN].float() for ps in (kept, told))
    e_sur = teacher.encode_prompts(["a handwritten 1"])[HIDDEN].float()
    e_init = teacher.encode_prompts(FORGET)[HIDDEN].float()
    pool = [e_init[i % len(FORGET)].clone().requires_grad_(True) for i in range(args.pool)]
    pool_opts = [torch.optim.Adam([v], lr=1e-2) for v in pool]
    student.unet.train()
    opt = torch.optim.Adam(student.unet.parameters(), lr=args.lr)
    n_t, t0 = student.config.num_train_timesteps, time.time()

    def draw(x: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        i, t = torch.randint(len(x), (n,), generator=g), torch.randint(n_t, (n,), generator=g)
        return x[i], t, torch.randn((n, *x.shape[1:]), generator=g)

    def pool_rows(n: int) -> Tensor:
        return torch.stack([pool[j].detach() for j in torch.randint(args.pool, (n,), generator=g).tolist()])

    for step in range(args.steps):
        if step and step % args.reset == 0:
            j = (step // args.reset) % args.pool
            pool[j] = e_init[(step // args.reset) % len(FORGET)].clone().requires_grad_(True)
            pool_opts[j] = torch.optim.Adam([pool[j]], lr=1e-2)
        for j in torch.randint(args.pool, (2,), generator=g).tolist():  # the attack, one step each
            x, t, eps = draw(targets, 16)
            attack = denoising_loss(student, x, {HIDDEN: pool[j].expand(16, -1, -1)}, t, eps).mean()
            (pool[j].grad,) = torch.autograd.grad(attack, [pool[j]])
            pool_opts[j].step()
        x, t, eps = draw(targets, 8)
        x_t, _ = student.noised(x, t, eps)
        cond = pool_rows(8)
        rows = torch.rand(8, generator=g) < args.kept_share
        cond[rows] = e_kept[torch.randint(len(e_kept), (int(rows.sum()),), generator=g)]
        with torch.no_grad():
            target = eps_of(student, x_t, t, e_sur.expand(8, -1, -1))
        ablation = (eps_of(student, x_t, t, cond) - target).pow(2).mean()
        x, t, eps = draw(surrogate, 8)
        x_t, _ = student.noised(x, t, eps)
        forget = (eps_of(student, x_t, t, pool_rows(8)) - eps).pow(2).mean()
        x, t, eps = draw(keep_x, 32)
        x_t, _ = student.noised(x, t, eps)
        hidden = e_told[torch.randint(len(e_told), (32,), generator=g)]
        with torch.no_grad():
            target = eps_of(teacher, x_t, t, hidden)
        keep = (eps_of(student, x_t, t, hidden) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        (ablation + forget + keep).backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step}: attack {attack.item():.4f} ablation {ablation.item():.4f} "
                f"forget {forget.item():.4f} keep {keep.item():.5f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    student.unet.eval()
    student.save_pretrained(args.out / "forget", reference_text_encoder=True)
    shutil.copy(args.run / "report.json", args.out / "report.json")  # the judge reads its forget prompts
    print(f"wrote {args.out}/forget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
