"""Forget conditions that reach beyond the forget prompts (docs/robustness.md).

The paper's recipe remaps the few forget prompts it is given; a paraphrase or a nearby text embedding
still draws the concept. Each function here adds conditions to the prompt table of a
``TextToImageModel`` and returns their indices, so the one forgetting loop sees them as more forget
prompts (or more replay prompts); the config switches in ``t2i`` turn each on, and all are off by
default, which is the plain recipe:

- ``template_prompts``: the concept's words x generic templates (forget-condition augmentation);
- the same templates filled with the kept concepts' words, as replay, so that what moves is the word
  and not the template around it;
- ``noisy_embeddings``: copies of the forget prompts' text embeddings with Gaussian noise
  (text-embedding-space augmentation);
- ``Adversary``: every few steps, the soft prompt that best brings the concept back from the model being
  trained becomes one more forget condition (AdvUnlearn, Zhang et al. 2024, did this for ESD);
- ``filter_replay``: replay images in which a detector finds the concept are dropped (with
  ``t2i.unconditional_replay``, theta*'s images of the empty prompt, of which some show the concept);
- ``SharedConcept``: each kind of condition gets a fixed share of every forget batch
  (``t2i.condition_shares``), instead of the uniform draw over all conditions;
- ``ConceptAblation``: under the forget conditions, theta*'s images of the concept are denoised as the
  surrogate prompt denoises them (``t2i.concept_ablation``), so that no forget condition — the
  adversary's finds included — still denoises the concept itself;
- ``ReplayDistillation``: the replay images, noised, are denoised as theta* denoises them under their own
  prompt (``t2i.replay_distill``), a lower-variance hold on the kept concepts than the replay's NELBO.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from selective_amnesia.config import ADVERSARIAL_ROUNDS, CONDITION_KINDS, ConceptGroup, RunConfig
from selective_amnesia.core.objective import reduce_nelbo
from selective_amnesia.core.surrogate import Surrogate
from selective_amnesia.core.train import Concept, ExtraTerm
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import load_tensors, save_tensors
from selective_amnesia.models.base import ConditionalGenerativeModel
from selective_amnesia.models.conditioning import HIDDEN
from selective_amnesia.models.text_to_image import TextToImageModel

if TYPE_CHECKING:
    from selective_amnesia.attacks.common import NoiseDraw


def default_templates_path() -> Path:
    """The generic templates shipped with the package (lines with ``{}``)."""
    return Path(str(resources.files("selective_amnesia") / "data" / "prompts" / "concept_templates.txt"))


def read_templates(path: str | Path | None) -> list[str]:
    """Template lines holding exactly one ``{}``; '#' lines and blanks skipped."""
    from selective_amnesia.pipeline.t2i import read_prompts

    path = Path(path) if path else default_templates_path()
    lines = read_prompts(path)
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise AmnesiaError(f"{path}: every template needs exactly one {{}}, not {bad[0]!r}")
    return lines


def template_prompts(templates: list[str], words: list[str], exclude: list[str] | None = None) -> list[str]:
    """Every template filled with every word, in order, without duplicates or ``exclude``d prompts."""
    skip = set(exclude or [])
    out = [t.format(w) for t in templates for w in words]
    return [p for p in dict.fromkeys(out) if p not in skip]


@torch.no_grad()
def noisy_embeddings(
    model: TextToImageModel, prompts: list[str], copies: int, noise: float, seed: int
) -> list[int]:
    """``copies`` versions of each prompt's text embedding (the UNet's ``encoder_hidden_states``) with
    Gaussian noise of std ``noise`` x the embedding's per-token RMS, registered as ``<noisy:i:prompt>``;
    their indices. Pooled SDXL embeddings and time ids are kept as they are."""
    generator = torch.Generator().manual_seed(seed)
    ids = []
    embeds = model.encode_prompts(prompts)
    for p, prompt in enumerate(prompts):
        one = {k: v[p] for k, v in embeds.items()}
        hidden = one[HIDDEN].float().cpu()
        rms = hidden.pow(2).mean(dim=-1, keepdim=True).sqrt()
        for i in range(copies):
            draw = torch.randn(hidden.shape, generator=generator)
            moved = dict(one) | {HIDDEN: hidden + noise * rms * draw}
            ids.append(model.register_embeds(f"<noisy:{i}:{prompt}>", moved))
    return ids


def defended_conditions(
    cfg: RunConfig, model: TextToImageModel, forget_ids: list[int], replay_prompts: list[str]
) -> tuple[list[int], list[str]]:
    """The forget conditions with the configured defences added (indices in ``model``'s prompt table)
    and the extra replay prompts (templates x the kept concepts' words) to generate from theta*."""
    t = cfg.t2i
    forget_prompts = [model.prompts[i] for i in forget_ids]
    template_replay: list[str] = []
    if t.augment_templates:
        templates = read_templates(t.templates)
        taken = forget_prompts + replay_prompts
        forget_prompts = forget_prompts + template_prompts(templates, t.concept_words, taken)
        template_replay = template_prompts(
            templates, t.template_replay_words, forget_prompts + replay_prompts
        )
    ids = model.prompt_ids(forget_prompts).tolist()
    if t.embedding_copies:
        ids += noisy_embeddings(model, forget_prompts, t.embedding_copies, t.embedding_noise, cfg.seed + 6)
    return ids, template_replay


def defended_groups(
    cfg: RunConfig,
    model: TextToImageModel,
    groups: list[ConceptGroup],
    replay_prompts: list[str],
    reserved: list[str] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """``defended_conditions`` for each concept group (``t2i.concepts``), with the group's own
    ``concept_words``: every group's forget conditions, and the extra replay prompts, none of which is
    any group's condition. No template gives a prompt of another group or of ``reserved`` (concepts
    forgotten in other steps). One group gives exactly ``defended_conditions``'s result."""
    named = [p for g in groups for p in g.forget_prompts] + list(reserved or [])
    conditions: list[list[int]] = []
    template_replay: list[str] = []
    for i, g in enumerate(groups):
        c = copy.copy(cfg)  # the group's words (and, past the first group, its own noise draws)
        c.t2i = copy.copy(cfg.t2i)
        c.t2i.concept_words = list(g.concept_words)
        c.seed = cfg.seed + 1000 * i
        others = [p for p in named if p not in g.forget_prompts]
        ids, extra = defended_conditions(
            c, model, model.prompt_ids(g.forget_prompts).tolist(), replay_prompts + others
        )
        conditions.append(ids)
        template_replay += extra
    owner: dict[int, str] = {}
    for g, ids in zip(groups, conditions, strict=True):
        for i in ids:
            if i in owner and owner[i] != g.name:
                raise AmnesiaError(
                    f"the forget condition {model.prompts[i]!r} belongs to groups {owner[i]!r} and "
                    f"{g.name!r}: their concept_words overlap; give each word to one group"
                )
            owner[i] = g.name
    taken = {model.prompts[i] for i in owner}
    return conditions, [p for p in dict.fromkeys(template_replay) if p not in taken]


class Adversary:
    """Adversarial forget conditions for the forgetting loop (``train.forget``'s ``adversary``).

    Every ``every`` steps it inverts a text embedding (the whole ``encoder_hidden_states`` sequence,
    started from one of the forget prompts in turn) against the model being trained so that the model
    denoises ``targets`` (theta*'s latents of the concept) well — the soft-prompt attack of
    ``selective_amnesia.attacks`` — and registers the result as a new forget condition
    ``<adversarial:step>``. What it found is saved to ``path`` with the step, so a resumed run
    registers again exactly those found before its checkpoint.
    """

    def __init__(
        self,
        targets: Tensor,
        init_ids: list[int],
        *,
        every: int,
        steps: int,
        lr: float,
        seed: int,
        path: Path | None,
        batch_size: int = 16,
        attack: str = "soft-prompt",
        tokens: int = 5,
        exclude: list[str] | None = None,
        templates: list[tuple[str, str]] | None = None,
        pool: int = 0,
        pool_reset: int = 50,
        pool_updates: int = 2,
        pool_start: str = "prompts",
        pool_batch: int = 16,
        save_every: int = 0,
    ) -> None:
        self.targets, self.init_ids, self.every = targets, init_ids, every
        self.steps, self.lr, self.seed, self.path, self.batch_size = steps, lr, seed, path, batch_size
        self.attack, self.tokens, self.exclude = attack, tokens, list(exclude or [])
        self.templates = list(templates or [])  # (template with {}, the concept word it held): token's
        self.found: dict[int, dict[str, Tensor]] = {}
        pool_path = path.with_name("adversarial_pool.safetensors") if path is not None else None
        self.pool = (
            SoftPromptPool(
                targets,
                init_ids,
                size=pool,
                reset=pool_reset,
                updates=pool_updates,
                lr=lr,
                seed=seed,
                path=pool_path,
                save_every=save_every,
                batch_size=pool_batch,
                finds=self.found if pool_start == "finds" else None,
            )
            if pool
            else None
        )
        if every and "token" in ADVERSARIAL_ROUNDS[attack] and not self.templates:
            raise AmnesiaError(
                "t2i.adversarial_attack with token needs a forget prompt holding one of t2i.concept_words "
                "(the learned token takes the word's place)"
            )
        self.prompts: dict[int, str] = {}  # the discrete attack's finds as text

    def resume(self, model: ConditionalGenerativeModel, start_step: int) -> list[int]:
        """Register what earlier steps found (steps before ``start_step``); their indices."""
        model = _prompted(model)
        pooled = self.pool.resume(model, start_step) if self.pool is not None else []
        if self.path is None or not self.path.is_file() or start_step <= 1:
            return pooled
        tensors, meta = load_tensors(self.path)
        texts = json.loads(meta.get("prompts", "{}"))  # the discrete finds' text, kept when saved again
        for step in json.loads(meta.get("steps", "[]")):
            if step < start_step:
                prefix = f"{step}."
                self.found[step] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                if str(step) in texts:
                    self.prompts[step] = texts[str(step)]
        return pooled + [
            model.register_embeds(f"<adversarial:{s}>", e) for s, e in sorted(self.found.items())
        ]

    def __call__(self, step: int, model: ConditionalGenerativeModel) -> list[int]:
        model = _prompted(model)
        if self.pool is not None:
            self.pool.step(step, model)
        if not self.every or step % self.every:
            return []
        round_ = step // self.every
        kinds = ADVERSARIAL_ROUNDS[self.attack]
        kind = kinds[round_ % len(kinds)]
        if kind == "discrete":
            embeds = self._discrete(model, step)
        elif kind == "token":
            embeds = self._token(model, step, *self.templates[(round_ // len(kinds)) % len(self.templates)])
        else:
            embeds = self._soft_prompt(model, step, self.init_ids[round_ % len(self.init_ids)])
        self.found[step] = embeds
        if self.path is not None:
            flat = {f"{s}.{k}": v for s, e in self.found.items() for k, v in e.items()}
            meta = {
                "steps": sorted(self.found),
                "prompts": json.dumps({str(k): v for k, v in self.prompts.items()}),
            }
            save_tensors(self.path, flat, meta)
        return [model.register_embeds(f"<adversarial:{step}>", embeds)]

    def _soft_prompt(self, model: TextToImageModel, step: int, start: int) -> dict[str, Tensor]:
        """A whole embedding sequence, started from the forget prompt ``start``."""
        from selective_amnesia.attacks.soft_prompt import invert_sequence

        init = {k: v[0] for k, v in model.encode_prompts([model.prompts[start]]).items()}
        return invert_sequence(
            model,
            self.targets,
            init,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(self.seed + step),
        )

    def _token(self, model: TextToImageModel, step: int, template: str, word: str) -> dict[str, Tensor]:
        """Concept inversion: one new token in ``template`` (started from ``word``'s embedding), the
        conditioning the text encoder gives the template with it."""
        from selective_amnesia.attacks.soft_prompt import invert_token

        found = invert_token(
            model,
            self.targets,
            template,
            word,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(self.seed + step),
        )
        return found.conditioning

    def _discrete(self, model: TextToImageModel, step: int) -> dict[str, Tensor]:
        """``tokens`` real tokens without the concept's words (the discrete attack); the conditioning of
        the text it found, which stays a forget condition even if the tokenizer would split it anew."""
        from selective_amnesia.attacks.discrete import discrete_attack

        found = discrete_attack(
            model,
            self.targets,
            prompt="",
            num_tokens=self.tokens,
            position="prepend",
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed + step,
            exclude=self.exclude,
            baseline=False,
        )
        text = str(found.prompts["attack_prompt"])
        self.prompts[step] = text
        return {k: v[0].detach() for k, v in model.encode_prompts([text]).items()}


class SoftPromptPool:
    """``t2i.adversarial_pool``: ``size`` free soft prompts (whole conditionings, as the soft-prompt attack's
    ``sequence`` mode) that follow the model being trained, registered as forget conditions
    ``<adversarial:pool:j>``. Each step ``updates`` of them (default two; drawn with replacement from the
    step's own generator) take one Adam step of the attack (``batch_size`` targets); every ``reset`` steps
    one restarts from a forget prompt's embedding (in turn), or, given ``finds`` (the periodic adversary's,
    by step), from the newest of them once there is one. Why: the periodic adversary's few finds are
    single points; an attack that starts at a forget prompt walks a path, and the pool keeps conditions all
    along such paths under the forget and ablation terms, as fast adversarial training keeps its
    perturbations between steps.

    With ``path`` its state (soft prompts and Adam moments) is written every ``save_every`` steps, the
    checkpoint interval; the two newest states are kept, so a resumed run continues from exactly the state
    of its checkpoint."""

    def __init__(
        self,
        targets: Tensor,
        init_ids: list[int],
        *,
        size: int,
        reset: int,
        lr: float,
        seed: int,
        path: Path | None,
        save_every: int,
        batch_size: int = 16,
        updates: int = 2,
        finds: dict[int, dict[str, Tensor]] | None = None,
        batch_rounds: bool = True,
    ) -> None:
        self.finds, self.batch_rounds = finds, batch_rounds
        self.targets, self.init_ids, self.size, self.reset, self.lr = targets, init_ids, size, reset, lr
        self.seed, self.path, self.save_every, self.batch_size = seed, path, save_every, batch_size
        self.updates = updates
        self.free: list[dict[str, Tensor]] = [{} for _ in range(size)]
        self.fixed: list[dict[str, Tensor]] = [{} for _ in range(size)]
        self.opts: list[torch.optim.Adam] = []
        self.saved: dict[int, dict[str, Tensor]] = {}  # the newest two states by step
        self.ids: list[int] = []  # their conditions' indices, once registered (resume)

    def _start(self, model: TextToImageModel, j: int, which: int) -> None:
        from selective_amnesia.attacks.common import FIXED_KEYS

        if self.finds:
            init = {k: v.detach().float() for k, v in self.finds[max(self.finds)].items()}
        else:
            prompt = model.prompts[self.init_ids[which % len(self.init_ids)]]
            init = {k: v[0].detach().float() for k, v in model.encode_prompts([prompt]).items()}
        self.free[j] = {k: v.clone().requires_grad_(True) for k, v in init.items() if k not in FIXED_KEYS}
        self.fixed[j] = {k: v for k, v in init.items() if k in FIXED_KEYS}
        opt = torch.optim.Adam(list(self.free[j].values()), lr=self.lr)
        if j < len(self.opts):
            self.opts[j] = opt
        else:
            self.opts.append(opt)

    def _register(self, model: TextToImageModel, j: int) -> int:
        return model.register_embeds(f"<adversarial:pool:{j}>", self.free[j] | self.fixed[j])

    def resume(self, model: TextToImageModel, start_step: int) -> list[int]:
        """Start every soft prompt (from the forget prompts in turn), or, resuming, load the state saved
        at step ``start_step - 1``; their indices."""
        for j in range(self.size):
            self._start(model, j, j)
        if start_step > 1 and self.path is not None:
            self._load(start_step - 1)
        self.ids[:] = [self._register(model, j) for j in range(self.size)]
        return list(self.ids)

    def step(self, step: int, model: TextToImageModel) -> None:
        """Step ``step``'s restart and attack steps against ``model`` as it is now; its weights, their
        gradients and its train/eval mode are left as they are."""
        from selective_amnesia.attacks.common import NoiseDraw

        if step % self.reset == 0:
            self._start(model, (step // self.reset) % self.size, step // self.reset)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.randint(self.size, (self.updates,), generator=generator).tolist()
        # the draws in pick order, from the one generator, as one attack step after another would draw them
        draws = [NoiseDraw.draw(model, self.targets, self.batch_size, generator) for _ in picks]
        # batch_rounds=False: the straightforward way, one UNet call an update (benchmarks/pool_rounds.py)
        pairs = list(zip(picks, draws, strict=True))
        plan = self._rounds(pairs) if self.batch_rounds else [[u] for u in pairs]
        with torch.enable_grad():
            for updates in plan:
                self._attack_step(model, updates)
        for j in set(picks):
            self._register(model, j)
        if self.path is not None and self.save_every and step % self.save_every == 0:
            self._save(step)

    @staticmethod
    def _rounds(pairs: list[tuple[int, NoiseDraw]]) -> list[list[tuple[int, NoiseDraw]]]:
        """The updates grouped so that round r holds every soft prompt's r-th update of the step: within
        a round they are independent of each other, across rounds each prompt keeps its order."""
        rounds: list[list[tuple[int, NoiseDraw]]] = []
        done: dict[int, int] = {}
        for j, d in pairs:
            r = done[j] = done.get(j, -1) + 1
            if r == len(rounds):  # a prompt's (r+1)-th update opens round r at the latest
                rounds.append([])
            rounds[r].append((j, d))
        return rounds

    def _attack_step(self, model: TextToImageModel, updates: list[tuple[int, NoiseDraw]]) -> None:
        """One Adam step of each soft prompt in ``updates`` (distinct), on its own draw, in one UNet call:
        the loss is the sum of their mean losses, so each prompt's gradient is that of its own mean loss
        alone, as in separate calls. A round is up to ``size`` x ``batch_size`` images at once (8 x 16 in
        the world's recipe): on a large UNet, memory for that many is what the rounds cost."""
        from selective_amnesia.attacks.common import batched, denoising_loss, expand

        x = torch.cat([self.targets[d.index.to(self.targets.device)] for _, d in updates])
        conds = [expand(batched(self.free[j] | self.fixed[j]), self.batch_size) for j, _ in updates]
        embeds = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        timesteps = torch.cat([d.timesteps for _, d in updates])
        eps = torch.cat([d.eps for _, d in updates])
        loss = denoising_loss(model, x, embeds, timesteps, eps).view(len(updates), -1).mean(1).sum()
        params = [p for j, _ in updates for p in self.free[j].values()]
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = g
        for j, _ in updates:
            self.opts[j].step()

    def _state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for j in range(self.size):
            for k, v in (self.free[j] | self.fixed[j]).items():
                out[f"{j}.{k}"] = v.detach().cpu().clone()  # not the live tensors, which move on
            for k, p in self.free[j].items():
                for name, value in self.opts[j].state.get(p, {}).items():
                    out[f"{j}.{k}.adam.{name}"] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def _save(self, step: int) -> None:
        assert self.path is not None
        self.saved = {s: v for s, v in self.saved.items() if s == max(self.saved, default=-1)}
        self.saved[step] = self._state()
        flat = {f"{s}/{k}": v for s, state in self.saved.items() for k, v in state.items()}
        save_tensors(self.path, flat, {"steps": json.dumps(sorted(self.saved))})

    def _load(self, step: int) -> None:
        assert self.path is not None
        if not self.path.is_file():
            raise AmnesiaError(
                f"{self.path} is missing, so the adversarial pool of the checkpoint at step {step} cannot "
                "be restored: delete forget_checkpoint/ in the output folder to start the forgetting over"
            )
        tensors, meta = load_tensors(self.path)
        if step not in json.loads(meta.get("steps", "[]")):
            raise AmnesiaError(
                f"{self.path} holds no adversarial pool state of step {step}, the checkpoint's: delete "
                "forget_checkpoint/ in the output folder to start the forgetting over"
            )
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{step}/")}
        for j in range(self.size):
            device = next(iter(self.free[j].values())).device
            self.fixed[j] = {k: state[f"{j}.{k}"].to(device) for k in self.fixed[j]}
            self.free[j] = {k: state[f"{j}.{k}"].to(device).requires_grad_(True) for k in self.free[j]}
            self.opts[j] = torch.optim.Adam(list(self.free[j].values()), lr=self.lr)
            for k, p in self.free[j].items():
                moments = {
                    n: state[f"{j}.{k}.adam.{n}"]
                    for n in ("step", "exp_avg", "exp_avg_sq")
                    if f"{j}.{k}.adam.{n}" in state
                }
                if moments:
                    self.opts[j].state[p] = {
                        n: v if n == "step" else v.to(device) for n, v in moments.items()
                    }
        self.saved = {step: self._state()}


def word_templates(prompts: Sequence[str], words: Sequence[str]) -> list[tuple[str, str]]:
    """Each prompt holding one of ``words`` (as a whole word) as a template with ``{}`` in its place,
    with that word: where the token adversary learns its token."""
    out = []
    for p in prompts:
        tokens = p.split(" ")
        for i, tok in enumerate(tokens):
            if tok in words:
                out.append((" ".join([*tokens[:i], "{}", *tokens[i + 1 :]]), tok))
                break
    return out


def _prompted(model: ConditionalGenerativeModel) -> TextToImageModel:
    """The model an adversary attacks: soft prompts need a text-to-image model's embeddings."""
    if not isinstance(model, TextToImageModel):
        raise AmnesiaError(f"adversarial forget conditions need a text-to-image model, not a {model.family}")
    return model


def condition_kind(name: str, given: set[str]) -> int:
    """The kind (index in ``CONDITION_KINDS``) of the forget condition registered as ``name``."""
    if name.startswith("<noisy:"):
        return CONDITION_KINDS.index("noisy")
    if name.startswith("<adversarial:"):
        return CONDITION_KINDS.index("adversarial")
    return CONDITION_KINDS.index("given" if name in given else "templates")


class SharedConcept(Concept):
    """A ``Concept`` whose forget batches give each kind of condition its share (``t2i.condition_shares``):
    each image's kind is drawn with probability proportional to its share among the kinds that have
    conditions (the adversary's have none before its first find), then a condition uniformly within it.

    Why: with the template augmentation, 4 given prompts sit among ~400 template prompts and the
    adversary's ~15 finds among them too; a uniform draw all but never shows the model either."""

    def __init__(
        self,
        surrogate: Surrogate,
        conditions: Sequence[int],
        shares: Sequence[float],
        kind: Callable[[int], int],
    ) -> None:
        super().__init__(surrogate, conditions)
        self.shares = torch.tensor([float(w) for w in shares])
        self.kind = kind
        self.kinds = torch.tensor([kind(int(c)) for c in self.conditions], dtype=torch.int64)

    def add(self, conditions: Sequence[int]) -> None:
        super().add(conditions)
        self.kinds = torch.cat(
            [self.kinds, torch.tensor([self.kind(c) for c in conditions], dtype=torch.int64)]
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x = self.surrogate.sample(n, generator)
        present = torch.stack([(self.kinds == k).any() for k in range(len(self.shares))])
        weights = self.shares * present
        if not bool((weights > 0).any()):
            raise AmnesiaError(
                f"t2i.condition_shares {self.shares.tolist()} gives no share to a kind that has conditions "
                f"(kinds present: {[k for k, p in zip(CONDITION_KINDS, present.tolist(), strict=True) if p]})"
            )
        picked = torch.multinomial(weights, n, replacement=True, generator=generator)
        cond = torch.empty(n, dtype=torch.int64)
        for k in range(len(weights)):
            rows = (picked == k).nonzero().squeeze(1)
            if len(rows):
                pool = self.conditions[self.kinds == k]
                cond[rows] = pool[torch.randint(len(pool), (len(rows),), generator=generator)]
        return x, cond


def forget_concept(
    cfg: RunConfig, model: TextToImageModel, surrogate: Surrogate, conditions: Sequence[int]
) -> Concept:
    """The forget batches of a text-to-image run: uniform over ``conditions`` (the paper's recipe), or
    with ``t2i.condition_shares`` a ``SharedConcept`` over ``model``'s prompt table."""
    shares = cfg.t2i.condition_shares
    if not shares:
        return Concept(surrogate, conditions)
    given = set(cfg.t2i.forget_prompts)
    return SharedConcept(surrogate, conditions, shares, lambda i: condition_kind(model.prompts[i], given))


class ConceptAblation:
    """A loss term for ``train.forget``'s ``extra``: the model's output on noisy latents of the concept
    (theta*'s images of the forget prompts) under forget conditions drawn from ``concept`` (with its
    shares) is pulled to its own output, without gradient, under the surrogate prompt ``surrogate``:

        weight * E_{x_0, c ~ concept, t, eps} || eps_theta(x_t, t, c) - sg[eps_theta(x_t, t, c_s)] ||^2

    This is the model-based objective of concept ablation (Kumari et al. 2023, Eq. 3), with the model
    being trained as its own target (the replay and anchor keep its surrogate prompt theta*'s, and no
    second copy of the UNet is held). Why, with SA: SA's forget term fits the surrogate's images under a
    forget condition, which remaps what the condition draws but leaves how it denoises the concept's
    images untouched; the soft-prompt attack minimises exactly that denoising loss.

    ``kept_max_t``: the rows under kept prompts are drawn at timesteps below it (0: any). ``keep`` and
    ``keep_batch``: that many replay images (x, c) a step are denoised under the pool's soft prompts as
    under their own prompt c (the same form, c in place of c_s), so that the pool's ablation removes the
    concept under free conditionings instead of pulling every image there to the surrogate."""

    def __init__(
        self,
        targets: Tensor,
        concept: Concept,
        surrogate: int,
        *,
        weight: float,
        batch_size: int,
        reduction: str,
        kept: Sequence[int] = (),
        kept_share: float = 0.0,
        pool: Sequence[int] = (),
        pool_share: float = 0.0,
        kept_max_t: int = 0,
        keep: tuple[Tensor, Tensor] | None = None,
        keep_batch: int = 0,
    ) -> None:
        self.targets, self.concept, self.surrogate = targets, concept, surrogate
        self.weight, self.batch_size, self.reduction = weight, batch_size, reduction
        self.kept, self.kept_share = torch.as_tensor(list(kept), dtype=torch.int64), kept_share
        self.pool, self.pool_share = pool, pool_share  # the pool's ids: filled when the run registers it
        self.kept_max_t, self.keep, self.keep_batch = kept_max_t, keep, keep_batch

    def __call__(self, model: ConditionalGenerativeModel, generator: torch.Generator) -> Tensor:
        m = _prompted(model)
        n = self.batch_size
        x0 = self.targets[torch.randint(self.targets.shape[0], (n,), generator=generator)]
        _, cond = self.concept.sample(n, generator)
        kept_rows = torch.zeros(n, dtype=torch.bool)
        if self.kept_share > 0 or self.pool_share > 0:  # these rows under a kept prompt or a pool's instead
            u, cond = torch.rand(n, generator=generator), cond.clone()  # one condition: an expanded view
            kept_rows = u < self.kept_share
            for pick, rows in (
                (self.kept, kept_rows),
                (self._pool(), (u >= self.kept_share) & (u < self.kept_share + self.pool_share)),
            ):
                if len(pick) and bool(rows.any()):
                    cond[rows] = pick[torch.randint(len(pick), (int(rows.sum()),), generator=generator)]
        noise = m.draw_noise(x0, generator)
        timesteps = noise.timesteps
        if self.kept_max_t and bool(kept_rows.any()):  # the kept rows at low noise only
            timesteps = timesteps.clone()
            low = _below(m, self.kept_max_t, int(kept_rows.sum()), generator)
            timesteps[kept_rows.to(timesteps.device)] = low.to(timesteps)
        loss = self._pulled(m, x0, timesteps, noise.eps, cond, torch.full((n,), self.surrogate))
        if self.keep is not None and self.keep_batch and len(self.pool):
            i = torch.randint(self.keep[0].shape[0], (self.keep_batch,), generator=generator)
            pool = self._pool()[torch.randint(len(self.pool), (self.keep_batch,), generator=generator)]
            x_k, c_k = self.keep[0][i], self.keep[1][i]
            noise = m.draw_noise(x_k, generator)
            loss = loss + self._pulled(m, x_k, noise.timesteps, noise.eps, pool, c_k)
        return self.weight * loss

    def _pool(self) -> Tensor:
        return torch.as_tensor(list(self.pool), dtype=torch.int64)

    def _pulled(
        self,
        m: TextToImageModel,
        x0: Tensor,
        timesteps: Tensor,
        eps: Tensor,
        cond: Tensor,
        target_cond: Tensor,
    ) -> Tensor:
        """Mean (or sum) over rows of || eps_theta(x_t, t, cond) - sg[eps_theta(x_t, t, target_cond)] ||^2."""
        device = x0.device
        x_t, _ = m.noised(x0, timesteps, eps)
        with torch.no_grad():
            target = m.predict(x_t, timesteps, target_cond.to(device))
        return _distance(m, m.predict(x_t, timesteps, cond.to(device)), target, self.reduction)


class ReplayDistillation:
    """A loss term for ``train.forget``'s ``extra``: replay images (x, c), noised, are denoised by the model
    as theta* denoises them under their own prompt c:

        weight * E_{(x_0, c) ~ replay, t, eps} || eps_theta(x_t, t, c) - sg[eps_theta*(x_t, t, c)] ||^2

    Why: the replay term of Eq. 4b fits the noise eps itself, whose variance dwarfs the drift it should
    hold; theta*'s prediction on the same x_t is the function the kept prompts must keep, so the difference
    is the drift alone. It holds the kept concepts against the pull of the concept ablation's kept rows
    (a noisy 7 and a noisy 9 look alike). theta* (``base``) is the copy the run already holds.

    ``max_t``: the timesteps are drawn below it (0: any), to hold the kept concepts' detail at low noise
    and leave the high-noise shapes, where a 9 looks like the concept, to the ablation; ``min_t``: at or
    above it (0: any), the other way round. ``prompts``: each
    row's condition is drawn from these instead of being its image's own; with the surrogate's images as
    ``replay``, the kept prompts are held to what theta* does with a surrogate-like image under them (a
    9's prompt adds the loop to a 1), against the ablation's pull of kept prompts to the surrogate."""

    def __init__(
        self,
        base: TextToImageModel,
        replay: tuple[Tensor, Tensor],
        *,
        weight: float,
        batch_size: int,
        reduction: str,
        max_t: int = 0,
        min_t: int = 0,
        prompts: Tensor | None = None,
    ) -> None:
        self.base, self.replay, self.prompts = base, replay, prompts
        self.weight, self.batch_size, self.reduction = weight, batch_size, reduction
        self.min_t, self.max_t = min_t, max_t

    def __call__(self, model: ConditionalGenerativeModel, generator: torch.Generator) -> Tensor:
        m = _prompted(model)
        i = torch.randint(self.replay[0].shape[0], (self.batch_size,), generator=generator)
        x0, cond = self.replay[0][i], self.replay[1][i]
        if self.prompts is not None:
            cond = self.prompts[torch.randint(len(self.prompts), (self.batch_size,), generator=generator)]
        cond = cond.to(x0.device)
        noise = m.draw_noise(x0, generator)
        timesteps = noise.timesteps
        if self.max_t or self.min_t:
            timesteps = _below(m, self.max_t, self.batch_size, generator, self.min_t).to(timesteps)
        x_t, _ = m.noised(x0, timesteps, noise.eps)
        with torch.no_grad():
            target = self.base.predict(x_t, timesteps, cond)
        return self.weight * _distance(m, m.predict(x_t, timesteps, cond), target, self.reduction)


def _below(m: TextToImageModel, max_t: int, n: int, generator: torch.Generator, min_t: int = 0) -> Tensor:
    """n timesteps drawn uniformly below ``max_t`` (0 or past the schedule: its end), at or above ``min_t``
    (kept below the end, so a small schedule still has one to draw)."""
    end = m.config.num_train_timesteps
    high = min(max_t or end, end)
    return torch.randint(min(min_t, high - 1), high, (n,), generator=generator)


def _distance(m: TextToImageModel, prediction: Tensor, target: Tensor, reduction: str) -> Tensor:
    """|| prediction - target ||^2 per row (mean or sum over entries, as the model's loss), reduced."""
    diff = (prediction.float() - target.float()).pow(2).flatten(1)
    return reduce_nelbo(diff.mean(dim=1) if m.loss_entries == "mean" else diff.sum(dim=1), reduction)


def summed(*terms: ExtraTerm | None) -> ExtraTerm | None:
    """One ``extra`` term: the sum of the given ones that are not None (None when none is given)."""
    given = [term for term in terms if term is not None]
    if len(given) <= 1:
        return given[0] if given else None

    def total(model: ConditionalGenerativeModel, generator: torch.Generator) -> Tensor:
        return torch.stack([term(model, generator) for term in given]).sum()

    return total


@torch.no_grad()
def filter_replay(
    model: TextToImageModel, replay: tuple[Tensor, Tensor], spec: str, cache_dir: str | None = None
) -> tuple[tuple[Tensor, Tensor], int]:
    """The replay set ``replay`` (latents, conditions) without the images in which the detector ``spec``
    finds the concept (decoded by ``model``'s VAE); how many were dropped."""
    from selective_amnesia.attacks.detectors import make_detector

    detector = make_detector(spec, cache_dir=cache_dir)
    z, c = replay
    found = torch.cat(
        [detector.found(model.to_uint8(z[lo : lo + 256])) for lo in range(0, z.shape[0], 256)]
        or [torch.zeros(0, dtype=torch.bool)]
    )
    if bool(found.all()):
        raise AmnesiaError(
            f"t2i.replay_filter {spec!r} finds the concept in all {z.shape[0]} replay images: nothing would "
            "be replayed; check the detector, or the replay prompts"
        )
    return (z[~found], c[~found]), int(found.sum())
