"""The discrete attack (UnlearnDiffAtk, Zhang et al. 2023, "To generate or not? Safety-driven unlearned
diffusion models are still easy to generate unsafe images ... for now"): k real tokens put before (or
after) a prompt, chosen so that the forgotten model denoises images of the concept well. The result is a
text prompt anyone can type.

With the denoising loss of ``soft_prompt`` as L(c), the tokens' input embeddings P = (p_1..p_k) are
optimised by projected gradient steps (the PEZ scheme of Wen et al. 2023, which UnlearnDiffAtk uses):
a continuous copy P~ is kept; each step projects it onto the vocabulary,

    p_i = E[argmax_v cos(p~_i, E_v)]      (E: the text encoder's input embedding table),

evaluates L at the projected tokens, and applies the gradient dL/dP there to P~ (Adam). For SDXL the two
encoders share one vocabulary and the projection sums their cosine similarities. Every ``eval_every``
steps the projected tokens are scored on fixed (target, t, noise) draws and the best are kept.
Candidates are the tokens that decode to text which tokenizes back to that same token, so the written
prompt re-encodes to the tokens found; tokens containing a ``--concept-words`` word can be excluded.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from selective_amnesia.attacks.common import (
    AttackOutput,
    NoiseDraw,
    TokenSlots,
    eval_draws,
    fixed_loss,
)
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.models.text_to_image import TextToImageModel

POSITIONS = ("prepend", "append")


def candidate_tokens(model: TextToImageModel, exclude: list[str] | None = None) -> Tensor:
    """Token ids every tokenizer of the pipeline writes and reads back as themselves, alone: not special,
    decoding to text that tokenizes to exactly that id; and not containing any ``exclude`` word."""
    tokenizers = [tok for _, tok in model.conditioning.encoders.values()]
    first = tokenizers[0]
    if any(tok.get_vocab() != first.get_vocab() for tok in tokenizers[1:]):
        raise AmnesiaError(
            "the pipeline's tokenizers have different vocabularies: the discrete attack needs one"
        )
    size = min(
        len(first),
        *(int(enc.get_input_embeddings().weight.shape[0]) for enc, _ in model.conditioning.encoders.values()),
    )
    special = set(first.all_special_ids)
    texts = [first.decode([i]).strip() for i in range(size)]
    encoded = first(texts, add_special_tokens=False).input_ids
    words = [w.lower() for w in (exclude or []) if w.strip()]
    keep = [
        i
        for i, (text, ids) in enumerate(zip(texts, encoded, strict=True))
        if ids == [i] and i not in special and text and not any(w in text.lower() for w in words)
    ]
    if not keep:
        raise AmnesiaError(
            "no vocabulary token can be written as text and read back: the discrete attack needs one"
        )
    return torch.tensor(keep, dtype=torch.int64)


def assemble(prompt: str, words: list[str], position: str) -> str:
    adv = " ".join(words)
    return f"{adv} {prompt}".strip() if position == "prepend" else f"{prompt} {adv}".strip()


class Projector:
    """Nearest vocabulary tokens of continuous embeddings by cosine similarity, summed over encoders."""

    def __init__(self, tables: list[Tensor], candidates: Tensor) -> None:
        self.tables, self.candidates = tables, candidates
        self.normed = [F.normalize(t[candidates.to(t.device)].detach().float(), dim=-1) for t in tables]

    def __call__(self, continuous: list[Tensor]) -> Tensor:
        with torch.no_grad():
            sims = sum(
                F.normalize(c.float(), dim=-1) @ n.T for c, n in zip(continuous, self.normed, strict=True)
            )
            assert isinstance(sims, Tensor)
            return self.candidates[sims.argmax(dim=-1).cpu()]

    def rows(self, ids: Tensor) -> list[Tensor]:
        return [t[ids.to(t.device)].detach().float() for t in self.tables]


def discrete_attack(
    model: TextToImageModel,
    targets: Tensor,
    *,
    prompt: str,
    num_tokens: int,
    position: str,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    exclude: list[str] | None = None,
    eval_every: int = 10,
    baseline: bool = True,
    progress: bool = False,
) -> AttackOutput:
    """Find ``num_tokens`` tokens for ``prompt`` (see the module docstring); the attack's condition is the
    text prompt itself, the baseline the prompt without them."""
    if position not in POSITIONS:
        raise AmnesiaError(f"--position must be prepend or append, got {position!r}")
    if num_tokens < 1 or steps < 1 or batch_size < 1 or eval_every < 1 or not lr > 0:
        raise AmnesiaError("need --tokens, --steps, --batch-size >= 1 and --lr > 0")
    start = time.perf_counter()
    slots = TokenSlots(model, lambda ph: assemble(prompt, [ph] * num_tokens, position), num_tokens)
    candidates = candidate_tokens(model, exclude)
    project = Projector(slots.embedding_tables(), candidates)
    gen = torch.Generator().manual_seed(seed)
    draws = eval_draws(model, targets, seed)
    init = candidates[torch.randint(0, candidates.numel(), (num_tokens,), generator=gen)]
    search = _Search(model, targets, slots, project, draws)
    search.run(init, gen, steps=steps, lr=lr, batch_size=batch_size, eval_every=eval_every, progress=progress)
    settings = {
        "prompt": prompt,
        "tokens": num_tokens,
        "position": position,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "eval_every": eval_every,
        "num_targets": int(targets.shape[0]),
        "excluded_words": list(exclude or []),
        "candidate_tokens": int(candidates.numel()),
    }
    return _output(search, prompt, position, baseline, settings, start)


class _Search:
    """The PEZ search: projected gradient steps on continuous token embeddings; every projected token
    tuple scored on the fixed draws is remembered, the history records every ``eval_every``-th step."""

    def __init__(
        self,
        model: TextToImageModel,
        targets: Tensor,
        slots: TokenSlots,
        project: Projector,
        draws: list[NoiseDraw],
    ) -> None:
        self.model, self.targets, self.slots, self.project, self.draws = model, targets, slots, project, draws
        self.scored: dict[tuple[int, ...], float] = {}
        self.history: list[dict[str, Any]] = []

    def score(self, ids: Tensor) -> float:
        key = tuple(ids.tolist())
        if key not in self.scored:
            embeds = self.slots.encode(self.project.rows(ids))
            self.scored[key] = fixed_loss(self.model, self.targets, embeds, self.draws)
        return self.scored[key]

    def run(
        self,
        init: Tensor,
        gen: torch.Generator,
        *,
        steps: int,
        lr: float,
        batch_size: int,
        eval_every: int,
        progress: bool,
    ) -> None:
        model, targets, project = self.model, self.targets, self.project
        continuous = [r.clone().requires_grad_(True) for r in project.rows(init)]
        opt = torch.optim.Adam(continuous, lr=lr)
        bar = tqdm(range(steps), desc="discrete attack", leave=False, disable=not progress)
        with torch.enable_grad():
            for step in bar:
                ids = project(continuous)
                if step % eval_every == 0:
                    self.history.append(
                        {"step": step, "tokens": ids.tolist(), "loss": round(self.score(ids), 6)}
                    )
                    bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
                rows = [r.requires_grad_(True) for r in project.rows(ids)]
                draw = NoiseDraw.draw(model, targets, batch_size, gen)
                loss = draw.loss(model, targets, self.slots.encode(rows))
                grads = torch.autograd.grad(loss, rows)
                for c, g in zip(continuous, grads, strict=True):
                    c.grad = g  # PEZ: the gradient at the projected point moves the continuous embedding
                opt.step()
        last = project(continuous)
        self.history.append({"step": steps, "tokens": last.tolist(), "loss": round(self.score(last), 6)})


def _output(
    search: _Search, prompt: str, position: str, baseline: bool, settings: dict[str, Any], start: float
) -> AttackOutput:
    """The best-scoring tokens written as a prompt, with the losses of it and of ``prompt`` alone."""
    model, targets, draws, scored = search.model, search.targets, search.draws, search.scored
    best_key = min(scored, key=lambda k: scored[k])
    best = torch.tensor(best_key, dtype=torch.int64)
    tokenizer = search.slots.encoders[0][2]
    words = [tokenizer.decode([i]).strip() for i in best.tolist()]
    text = assemble(prompt, words, position)
    reencoded = tokenizer(text, add_special_tokens=False).input_ids
    optimise_s = time.perf_counter() - start
    loss_prompt = fixed_loss(model, targets, model.encode_prompts([prompt]), draws)
    loss_text = fixed_loss(model, targets, model.encode_prompts([text]), draws)
    with_baseline = baseline and prompt != text
    return AttackOutput(
        attack="discrete",
        conditions=[text] + ([prompt] if with_baseline else []),
        roles=["attack"] + (["baseline"] if with_baseline else []),
        settings=settings,
        prompts={
            "attack_prompt": text,
            "prompt": prompt,
            "token_ids": best.tolist(),
            "token_words": words,
            "reencodes": _contains(reencoded, best.tolist()),
        },
        tensors={
            "token_ids": best.clone(),
            **{
                f"token_embeddings.{i}": r.cpu().contiguous() for i, r in enumerate(search.project.rows(best))
            },
        },
        info={
            "loss": {
                "prompt": loss_prompt,
                "attack_prompt": loss_text,
                "best_projected": scored[best_key],
                "eval_draws": sum(d.index.numel() for d in draws),
            },
            "history": search.history,
            "seconds": {"optimise": round(optimise_s, 2)},
        },
    )


def _contains(ids: list[int], part: list[int]) -> bool:
    n = len(part)
    return any(ids[i : i + n] == part for i in range(len(ids) - n + 1))
