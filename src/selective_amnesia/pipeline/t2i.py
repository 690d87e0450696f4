"""Forgetting a concept in a text-to-image pipeline: the stages of ``amnesia run`` for
``model.family: text_to_image`` (paper Section 4.2).

    theta* (a local diffusers pipeline) -> surrogate set q(x|c_f) -> replay set -> Fisher ->
    forgetting (Eq. 4) -> a diffusers pipeline or LoRA adapter -> retention report

The stages are the class pipeline's (``selective_amnesia.pipeline.classes``) with prompts in place of classes,
and reuse what they made by the same rules (``selective_amnesia.core.cache_keys``): every generated set is
cached in the run directory, keyed by the weights, seed, count, sampler and prompt, so an interrupted
run resumes and a rerun reuses; the Fisher is ``classes.stage_fisher``'s (``OUT/fisher.safetensors``);
a finished forgetting stage (``OUT/forget`` or ``OUT/forget_lora``) made from the same settings, theta*,
Fisher and sets is reused, an interrupted one resumes from ``OUT/forget_checkpoint``. Each prompt's
images come from per-image generators seeded by (seed, prompt, index), so a set does not depend on
batching or on which other prompts are in the run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from selective_amnesia import faults
from selective_amnesia.config import (
    FORGET_KEYS_ADDED,
    ConceptGroup,
    RunConfig,
    TextToImageSection,
    resolve_device,
    to_dict,
)
from selective_amnesia.core.cache_keys import ADAPTER_META, block_set, finished, settings_hash
from selective_amnesia.core.defences import (
    Adversary,
    ConceptAblation,
    ReplayDistillation,
    defended_groups,
    filter_replay,
    forget_concept,
    summed,
    word_templates,
)
from selective_amnesia.core.distributed import Share, current_share
from selective_amnesia.core.fisher import Fisher
from selective_amnesia.core.objective import Anchor, LoraEWCPenalty
from selective_amnesia.core.sampling import (
    SharedCalls,
    blockwise_sets,
    call_groups,
    effective_sampler,
    image_generators,
)
from selective_amnesia.core.surrogate import GroupedSurrogate, StoredImages, Surrogate
from selective_amnesia.core.train import Concept, Loop, forget, make_replay, model_anchor, theta_star_sampler
from selective_amnesia.core.trainable import (
    ADAPTER,
    add_lora,
    lora_target_modules,
    merge_lora,
    save_lora,
    select_trainable,
)
from selective_amnesia.data import load_image_folder
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.io.artifacts import environment, read_json, state_hash, write_json
from selective_amnesia.models.text_to_image import TextToImageModel
from selective_amnesia.progress import stage

log = logging.getLogger(__name__)


def default_replay_prompts_path() -> Path:
    """The diverse replay list shipped with the package (people, animals, scenes, objects, styles)."""
    return Path(str(resources.files("selective_amnesia") / "data" / "prompts" / "replay_default.txt"))


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped; duplicates dropped."""
    path = Path(path) if path else default_replay_prompts_path()
    if not path.is_file():
        raise AmnesiaError(f"prompt file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AmnesiaError(f"{path} is not UTF-8 text: write one prompt per line") from None
    prompts = list(dict.fromkeys(s.strip() for s in lines if s.strip() and not s.strip().startswith("#")))
    if not prompts:
        raise AmnesiaError(f"{path} holds no prompt: write one prompt per line")
    return prompts


def sets_seed(cfg: RunConfig) -> int:
    """The seed of theta*'s generated sets: ``t2i.sets_seed``, else the run's ``seed``."""
    return cfg.seed if cfg.t2i.sets_seed is None else cfg.t2i.sets_seed


def prompt_seed(prompt: str) -> int:
    """A stable integer for a prompt (the 'label' of its per-image seeds)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:6], "big")


@torch.no_grad()
def prompt_latents(
    model: TextToImageModel,
    prompts: list[str],
    per_prompt: int,
    seed: int,
    cache_dir: Path | None,
    *,
    batch_size: int = 64,
    progress: bool = False,
    share: Share | None = None,
    **sample_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """``per_prompt`` latents of every prompt from ``model`` and their prompt indices (model's table).

    Each prompt's set is cached in ``cache_dir`` (one safetensors file per prompt, ``cache_keys.block_set``)
    and reused only if it came from the same weights, seed, count, sampler and prompt. With several
    processes (``share``) the batches are split among them and every process gets the whole set
    (``blockwise_sets``).
    """
    if per_prompt < 1:
        raise AmnesiaError(f"images per prompt must be >= 1, got {per_prompt}")
    ids = model.prompt_ids(prompts)
    sampler = effective_sampler(model, **sample_kwargs)
    weights = state_hash(model.state_dict()) if cache_dir else ""  # hashing a UNet is not free
    bar = tqdm(total=per_prompt * len(prompts), desc="generating", unit="img", disable=not progress)

    def draw(blocks: list[tuple[int, int, int]]) -> Tensor:
        gens = [g for i, lo, n in blocks for g in image_generators(seed, prompt_seed(prompts[i]), lo, n)]
        cond = torch.cat([torch.full((n,), int(ids[i]), dtype=torch.int64) for i, _, n in blocks])
        z = model.sample(cond, generator=gens, **sample_kwargs).float().cpu()
        bar.update(len(gens))
        return z

    calls = SharedCalls(draw)
    sets = []
    for i, prompt in enumerate(prompts):
        key = {"model": weights, "seed": seed, "n": per_prompt, "sampler": sampler, "prompt": prompt}
        # each finished batch is kept while the set is made, so an interrupted set resumes
        sets.append(
            block_set(cache_dir, {"prompt": prompt}, key, per_prompt, batch_size, calls.maker(i), "latents")
        )
    per_call = max(1, batch_size // per_prompt)  # few images a prompt: several prompts share a call
    if per_call > 1:
        calls.use(call_groups(sets, per_call))
    out = blockwise_sets(sets, share, group=per_call)
    bar.close()
    out_ids = [
        torch.full((z.shape[0],), pid, dtype=torch.int64) for z, pid in zip(out, ids.tolist(), strict=True)
    ]
    return torch.cat(out), torch.cat(out_ids)


def t2i_settings(t: TextToImageSection) -> dict[str, Any]:
    """The ``t2i`` settings a forgetting run's key is made of; the keys added since the first runs are
    left out while unused, so a run made before they existed is still resumed."""
    settings, defaults = to_dict(t), to_dict(TextToImageSection())
    for added in T2I_KEYS_ADDED:
        if settings[added] == defaults[added]:  # a run made before the key existed keeps its key
            settings.pop(added)
    return settings


# t2i keys added after the first text-to-image runs (left out of a run's key while at their defaults)
T2I_KEYS_ADDED = (
    "concepts",
    "condition_shares",
    "unconditional_replay",
    "replay_filter",
    "adversarial_attack",
    "adversarial_tokens",
    "concept_ablation",
    "concept_ablation_batch",
    "concept_ablation_kept",
    "adversarial_pool",
    "adversarial_pool_reset",
    "adversarial_pool_updates",
    "adversarial_pool_start",
    "adversarial_pool_batch",
    "concept_ablation_pool",
    "concept_ablation_kept_max_t",
    "concept_ablation_keep",
    "replay_distill",
    "replay_distill_batch",
    "replay_distill_max_t",
    "replay_distill_min_t",
    "replay_distill_images",
    "sets_seed",
)


# forget settings in no forgetting key: those that decide a sequence's steps >= 2 only (they are in their
# step_key), so a sequence's step 1 is the same whatever its anchor or replay choice, and the checkpoint
# and log intervals and snapshots, which change nothing
FORGET_NOT_IN_KEY = (
    "sequence",
    "anchor",
    "online_alpha",
    "replay_forgotten",
    "replay_model",
    "checkpoint_every",
    "log_every",
    "snapshot_every",
)


def forget_key(cfg: RunConfig, start: str, fisher_meta: Any, sets: str, *more: Any) -> str:
    """The settings hash of a text-to-image forgetting stage (a single run's, a sequence step's): the
    ``forget`` and ``t2i`` settings, the seed, the starting weights' hash ``start``, the anchor's Fisher
    metadata (``stage_fisher``'s, the same for a Fisher estimated now and one read back from its file),
    the generated sets' hash ``sets`` (their files may change without any setting changing) and ``more``
    (a sequence step's groups and step key). Its checkpoint is kept under the same key."""
    added = FORGET_KEYS_ADDED  # at their defaults, out of the key: earlier runs keep theirs
    settings = {
        name: v
        for name, v in to_dict(cfg.forget).items()
        if name not in FORGET_NOT_IN_KEY and not (name in added and added[name] == v)
    }
    return settings_hash(settings, t2i_settings(cfg.t2i), cfg.seed, start, fisher_meta, sets, *more)


def register_prompts(cfg: RunConfig, model: TextToImageModel) -> tuple[list[int], list[str], list[int]]:
    """The forget prompts' indices, the replay prompts (forget prompts removed) and their indices."""
    t = cfg.t2i
    forget_ids = model.prompt_ids(t.forget_prompts).tolist()
    replay_prompts = [p for p in read_prompts(t.replay_prompts) if p not in t.forget_prompts]
    return forget_ids, replay_prompts, model.prompt_ids(replay_prompts).tolist()


def select_weights(cfg: RunConfig, model: TextToImageModel) -> list[str]:
    """Mark the weights the Fisher and the fine-tune are about; with LoRA, return the adapted modules
    (their base weights get the Fisher; the adapter is added after it is estimated)."""
    t = cfg.t2i
    if t.lora_rank == 0:
        select_trainable(model, t.train, t.train_patterns)
        return []
    modules = lora_target_modules(model, t.train, t.train_patterns, t.lora_targets)
    wanted = {f"unet.{m}.weight" for m in modules}
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
    return modules


def surrogate_latents(
    cfg: RunConfig, group: ConceptGroup, base: TextToImageModel, out: Path, share: Share | None = None
) -> Tensor:
    """q(x|c_f) of one concept: theta*'s images of its surrogate prompt (cached in ``out/surrogate``) or
    the images of its surrogate folder, as latents."""
    t = cfg.t2i
    if group.surrogate_prompt is not None:
        z, _ = prompt_latents(
            base,
            [group.surrogate_prompt],
            t.surrogate_count,
            sets_seed(cfg) + 4,
            out / "surrogate",
            progress=cfg.progress and (share is None or share.main),
            share=share,
        )
        return z
    assert group.surrogate_path is not None  # check_ready
    channels, size, _ = base.pixel_shape
    folder = load_image_folder(group.surrogate_path, image_size=size, channels=channels)
    return base.from_uint8(folder.images)


def concept_targets(cfg: RunConfig, base: TextToImageModel, out: Path, share: Share) -> Tensor:
    """``t2i.adversarial_targets`` latents of theta*'s images of the forget prompts, in a seeded order:
    what the adversary inverts against and the concept ablation denoises; generated once and cached."""
    t = cfg.t2i
    per = -(-t.adversarial_targets // len(t.forget_prompts))
    targets, _ = prompt_latents(
        base, t.forget_prompts, per, sets_seed(cfg) + 8, out / "adversarial_targets", share=share
    )
    order = torch.randperm(targets.shape[0], generator=torch.Generator().manual_seed(sets_seed(cfg)))
    return targets[order][: t.adversarial_targets]


def _ablation(
    cfg: RunConfig,
    base: TextToImageModel,
    model: TextToImageModel,
    concept: Concept,
    replay: tuple[list[int], tuple[Tensor, Tensor]],
    adversary: Adversary | None,
    out: Path,
    share: Share,
) -> ConceptAblation | None:
    """``t2i.concept_ablation``'s term (None when off), on the adversary's targets, toward the surrogate
    prompt; ``t2i.concept_ablation_kept`` of its rows under the kept conditions (``replay``'s ids), and
    ``t2i.concept_ablation_keep`` rows of the replay set kept under the pool's soft prompts."""
    t = cfg.t2i
    surrogate = t.groups()[0].surrogate_prompt  # one concept, with a prompt (TextToImageSection.check_ready)
    if not t.concept_ablation or surrogate is None:
        return None
    device = next(model.parameters()).device
    return ConceptAblation(
        concept_targets(cfg, base, out, share).to(device),
        concept,
        int(model.prompt_ids([surrogate])[0]),
        weight=t.concept_ablation,
        batch_size=t.concept_ablation_batch,
        reduction=cfg.forget.reduction,
        kept=replay[0],
        kept_share=t.concept_ablation_kept,
        pool=adversary.pool.ids if adversary is not None and adversary.pool is not None else [],
        pool_share=t.concept_ablation_pool,
        kept_max_t=t.concept_ablation_kept_max_t,
        keep=(replay[1][0].to(device), replay[1][1].to(device)) if t.concept_ablation_keep else None,
        keep_batch=t.concept_ablation_keep,
    )


def _distillation(
    cfg: RunConfig,
    base: TextToImageModel,
    model: TextToImageModel,
    concept: Concept,
    replay: tuple[list[int], tuple[Tensor, Tensor]],
) -> ReplayDistillation | None:
    """``t2i.replay_distill``'s term (None when off) toward theta* (``base``): on the stored replay set,
    or on the surrogate's images under the kept prompts (``t2i.replay_distill_images``)."""
    t = cfg.t2i
    if not t.replay_distill:
        return None
    device = next(model.parameters()).device
    images, own = replay[1]
    prompts = None
    if t.replay_distill_images == "surrogate":
        surrogate = concept.surrogate  # forget_surrogate's: stored images, one set or one per group
        assert isinstance(surrogate, StoredImages | GroupedSurrogate)
        images = torch.cat(surrogate.images) if isinstance(surrogate, GroupedSurrogate) else surrogate.images
        own, prompts = torch.zeros(images.shape[0], dtype=torch.int64), torch.as_tensor(replay[0])
    return ReplayDistillation(
        base,
        (images.to(device), own.to(device)),
        weight=t.replay_distill,
        batch_size=t.replay_distill_batch,
        reduction=cfg.forget.reduction,
        max_t=t.replay_distill_max_t,
        min_t=t.replay_distill_min_t,
        prompts=prompts,
    )


def _adversary(
    cfg: RunConfig, base: TextToImageModel, model: TextToImageModel, out: Path, share: Share
) -> Adversary | None:
    """The adversarial forget conditions of ``t2i.adversarial_every`` and ``t2i.adversarial_pool`` (None
    when both are off); its targets are theta*'s images of the forget prompts, generated once and cached."""
    t = cfg.t2i
    if not t.adversarial_every and not t.adversarial_pool:
        return None
    words = [w for g in t.groups() for w in g.concept_words]
    return Adversary(
        concept_targets(cfg, base, out, share),
        model.prompt_ids(t.forget_prompts).tolist(),
        every=t.adversarial_every,
        steps=t.adversarial_steps,
        lr=t.adversarial_lr,
        seed=cfg.seed + 9,
        path=out / "adversarial.safetensors",
        attack=t.adversarial_attack,
        tokens=t.adversarial_tokens,
        exclude=words,
        templates=word_templates(t.forget_prompts, words),
        pool=t.adversarial_pool,
        pool_reset=t.adversarial_pool_reset,
        pool_updates=t.adversarial_pool_updates,
        pool_start=t.adversarial_pool_start,
        pool_batch=t.adversarial_pool_batch,
        save_every=cfg.forget.checkpoint_every,
    )


def run_text_to_image(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Forget ``t2i.forget_prompts`` in the pipeline ``t2i.model``; write ``out/forget`` (a diffusers
    pipeline directory) or ``out/forget_lora`` (an adapter) and ``out/report.json``.

    Under ``accelerate launch``/``torchrun`` the processes share the generated sets, the Fisher and each
    forgetting step's batch (``selective_amnesia.core.distributed``); process 0 writes the outputs and the
    report, which the others read back and return."""
    if cfg.method != "sa":  # the ESD/UCE baselines of the same harness (docs/baselines.md)
        from selective_amnesia.baselines.run import run_baseline

        return run_baseline(cfg, out)
    t = cfg.t2i
    t.check_ready()
    if cfg.forget.sequence is not None:  # one concept group after another
        from selective_amnesia.pipeline.sequence_t2i import run_t2i_sequence

        return run_t2i_sequence(cfg, out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    share = current_share(resolve_device(cfg.device))
    device = share.device or resolve_device(cfg.device)
    run = _T2IRun(cfg, out, share, time.perf_counter())
    base = TextToImageModel.from_pretrained(t.model).to(device)
    base.set_sampler(t.sampler, t.num_inference_steps, t.guidance_scale)  # None: the pipeline's own
    groups = t.groups()  # one concept, or several (t2i.concepts) forgotten together
    forget_ids, replay_prompts, replay_ids = register_prompts(cfg, base)
    group_ids, template_replay = defended_groups(cfg, base, groups, replay_prompts)
    forget_ids = [i for ids in group_ids for i in ids]
    surrogates = _t2i_surrogates(run, base, groups)
    replay_set = _t2i_replay(run, base, replay_prompts, template_replay, replay_ids)
    model = copy.deepcopy(base)  # shares the frozen VAE and text encoder (see TextToImageModel)
    lora_modules = select_weights(cfg, model)
    fisher = _t2i_fisher(run, model)
    result = _t2i_forgetting(
        run, base, model, lora_modules, fisher, (group_ids, forget_ids, surrogates), (replay_ids, replay_set)
    )
    if not share.main:  # every process holds the same forgotten weights; process 0 writes them
        share.barrier()
        report: dict[str, Any] = read_json(out / "report.json")
        return report
    if result.done is None:
        _save_single_run(cfg, result, groups, adapter=bool(lora_modules))
    report = _single_run_report(
        run, base, result, (groups, group_ids, surrogates), replay_prompts, replay_set, forget_ids
    )
    write_json(out / "report.json", report)
    if t.concepts:
        write_t2i_report(out, report, result.history)
    share.barrier()
    return report


@dataclasses.dataclass
class _T2IRun:
    """What the stages of one single text-to-image run share: config, directory, processes, timings."""

    cfg: RunConfig
    out: Path
    share: Share
    t0: float
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    replay_dropped: int = 0  # replay images t2i.replay_filter found the concept in

    @property
    def n(self) -> int:
        return 5 if self.cfg.forget.ewc_lambda > 0 else 4

    def say(self, k: int, title: str) -> None:
        if self.share.main:
            stage(k, self.n, title)


@dataclasses.dataclass
class _Forgotten:
    """The forgetting stage's result: the model, its loss history, the number of trained weights and
    adversarial conditions, its settings hash and directory, and the finished run's metadata if reused."""

    model: TextToImageModel
    history: dict[str, Any]
    trained: int
    adversarial: int
    key: str
    target: Path
    done: dict[str, Any] | None


def _t2i_surrogates(run: _T2IRun, base: TextToImageModel, groups: list[ConceptGroup]) -> list[Tensor]:
    """Stage 1: each group's surrogate set q(x|c_f)."""
    t1 = time.perf_counter()
    run.say(1, f"surrogate set ({run.cfg.t2i.surrogate_count} images of {surrogate_names(groups)})")
    surrogates = [surrogate_latents(run.cfg, g, base, run.out, run.share) for g in groups]
    run.timings["surrogate_s"] = time.perf_counter() - t1
    return surrogates


def _t2i_replay(
    run: _T2IRun,
    base: TextToImageModel,
    replay_prompts: list[str],
    template_replay: list[str],
    replay_ids: list[int],
) -> tuple[Tensor, Tensor]:
    """Stage 2: theta*'s replay set over the replay prompts (and the defences' template prompts, whose
    ids are added to ``replay_ids``)."""
    cfg, t, out, share = run.cfg, run.cfg.t2i, run.out, run.share
    t1 = time.perf_counter()
    run.say(2, f"replay set ({t.replay_per_prompt} images per replay prompt, {len(replay_prompts)} prompts)")
    progress = cfg.progress and share.main
    replay_set = prompt_latents(
        base,
        replay_prompts,
        t.replay_per_prompt,
        sets_seed(cfg) + 3,
        out / "replay",
        progress=progress,
        share=share,
    )
    if template_replay:  # the defences' templates filled with the kept concepts' words
        z, c = prompt_latents(
            base,
            template_replay,
            t.template_replay_per_prompt,
            sets_seed(cfg) + 7,
            out / "template_replay",
            progress=progress,
            share=share,
        )
        replay_set = (torch.cat([replay_set[0], z]), torch.cat([replay_set[1], c]))
        replay_ids += base.prompt_ids(template_replay).tolist()
    if t.unconditional_replay:  # the empty prompt: classifier-free guidance's other branch
        z, c = prompt_latents(
            base, [""], t.unconditional_replay, sets_seed(cfg) + 10, out / "unconditional_replay", share=share
        )
        replay_set = (torch.cat([replay_set[0], z]), torch.cat([replay_set[1], c]))
        replay_ids += base.prompt_ids([""]).tolist()
    if t.replay_filter:
        replay_set, run.replay_dropped = filter_replay(
            base, replay_set, t.replay_filter, cfg.classifier.cache_dir
        )
        log.info("replay filter %s dropped %d of the replay images", t.replay_filter, run.replay_dropped)
    run.timings["replay_generation_s"] = time.perf_counter() - t1
    return replay_set


def _t2i_fisher(run: _T2IRun, model: TextToImageModel) -> Fisher | None:
    """Stage 3: the Fisher of theta* (its selected weights), none with forget.ewc_lambda=0."""
    from selective_amnesia.pipeline.classes import (
        stage_fisher,  # the stage of every family (late: a heavier import)
    )

    cfg = run.cfg
    t1 = time.perf_counter()
    fisher = None
    if cfg.forget.ewc_lambda > 0:
        run.say(3, f"Fisher ({cfg.fisher.num_samples:,} samples, {cfg.fisher.estimator})")
        # over the run's own forget and replay prompts: the defences add conditions, not importance
        fisher = stage_fisher(cfg, model, run.out)
    run.timings["fisher_s"] = time.perf_counter() - t1
    return fisher


def _t2i_forgetting(
    run: _T2IRun,
    base: TextToImageModel,
    model: TextToImageModel,
    lora_modules: list[str],
    fisher: Fisher | None,
    forget_sets: tuple[list[list[int]], list[int], list[Tensor]],
    replay: tuple[list[int], tuple[Tensor, Tensor]],
) -> _Forgotten:
    """The forgetting stage: reused when finished with the same settings, theta*, Fisher and sets;
    else fine-tuned (``_forget``). ``forget_sets``: each group's conditions, all of them, and each
    group's surrogate set; ``replay``: the replay prompts' ids and the replay set."""
    cfg, t, out, share = run.cfg, run.cfg.t2i, run.out, run.share
    group_ids, forget_ids, surrogates = forget_sets
    replay_ids, replay_set = replay
    surrogate = surrogates[0] if len(group_ids) == 1 else torch.cat(surrogates)  # for the key below
    t1 = time.perf_counter()
    run.say(run.n - 1, f"forgetting ({len(forget_ids)} forget conditions, {cfg.forget.steps:,} steps)")
    # everything the fine-tune depends on: settings, theta*, the Fisher and the two image sets (whose
    # files may change without any setting changing)
    sets = state_hash({"replay": replay_set[0], "replay_ids": replay_set[1], "surrogate": surrogate})
    fisher_meta = fisher.metadata if fisher is not None else None
    key = forget_key(cfg, state_hash(base.state_dict()), fisher_meta, sets)
    target = forgotten_dir(out, t)
    done = finished(target, key, share)
    if done is not None:  # a finished forgetting stage of the same settings, theta*, Fisher and sets
        log.info("reusing forgotten model in %s", target)
        reuse_forgotten(model, target, t)
        history = done["history"]
        trained, adversarial = done["trained_parameters"], done["adversarial_conditions"]
    else:
        kept = [i for i in replay_ids if i not in forget_ids]
        concept = forget_concept(cfg, model, forget_surrogate(group_ids, surrogates), forget_ids)
        model, history, trained, adversarial = _forget(
            cfg, base, model, lora_modules, fisher, key, concept, (kept, replay_set), out, share
        )
    run.timings["forget_s"] = time.perf_counter() - t1
    return _Forgotten(model, history, trained, adversarial, key, target, done)


def _save_single_run(
    cfg: RunConfig, result: _Forgotten, groups: list[ConceptGroup], *, adapter: bool
) -> None:
    """Write a newly forgotten model (process 0) with its settings hash, history and prompts."""
    t = cfg.t2i
    extra = {
        "settings_hash": result.key,
        "run_config": to_dict(cfg),
        "history": result.history,
        "forget_prompts": t.forget_prompts,
        "trained_parameters": result.trained,
        "adversarial_conditions": result.adversarial,
    }
    if t.concepts:
        extra["concepts"] = [g.name for g in groups]
    save_forgotten(result.model, result.target, t, extra, adapter=adapter)


def _single_run_report(
    run: _T2IRun,
    base: TextToImageModel,
    result: _Forgotten,
    concepts: tuple[list[ConceptGroup], list[list[int]], list[Tensor]],
    replay_prompts: list[str],
    replay_set: tuple[Tensor, Tensor],
    forget_ids: list[int],
) -> dict[str, Any]:
    """The last stage (process 0): the retention check, each group before and after where the world's
    judges can tell (``concepts``: the groups, their conditions and surrogate sets), and report.json's
    content."""
    cfg, t, out = run.cfg, run.cfg.t2i, run.out
    groups, group_ids, surrogates = concepts
    timings = run.timings
    t1 = time.perf_counter()
    run.say(run.n, f"retention check ({t.retention_per_prompt} images per replay prompt) and report")
    retention = retention_on_prompts(
        base, result.model, replay_prompts, t.retention_per_prompt, cfg.seed + 5, out / "retention"
    )
    timings["retention_s"] = time.perf_counter() - t1
    concepts_report: dict[str, Any] = {}
    if t.concepts:  # every group before and after, where the world's judges can tell
        t1 = time.perf_counter()
        concepts_report = measure_groups(cfg, base, result.model, groups, group_ids, surrogates, out)
        timings["evaluate_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - run.t0
    return {
        "name": cfg.name,
        "output": str(result.target),
        "forget_prompts": t.forget_prompts,
        "surrogate": t.surrogate_prompt or t.surrogate_path,
        "replay_prompts": len(replay_prompts),
        "replay_images": int(replay_set[0].shape[0]),
        "replay_filtered_out": run.replay_dropped,
        "forget_conditions": len(forget_ids),
        "adversarial_conditions": result.adversarial,
        "trained_parameters": result.trained,
        "retention": retention,
        "timings": timings,
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "config": to_dict(cfg),
    } | concepts_report


def _forget(
    cfg: RunConfig,
    base: TextToImageModel,
    model: TextToImageModel,
    lora_modules: list[str],
    fisher: Fisher | None,
    key: str,
    concept: Concept,
    replay: tuple[list[int], tuple[Tensor, Tensor]],
    out: Path,
    share: Share,
) -> tuple[TextToImageModel, dict[str, Any], int, int]:
    """Fine-tune ``model`` (theta*'s copy, its weights selected) to forget ``concept`` with ``train.forget``,
    replaying ``replay`` (the kept conditions and the stored replay set), resumable from
    ``out/forget_checkpoint`` under ``key``. With LoRA the adapter is added first, its initial weights
    drawn from the run's seed alone (a rerun makes the same adapter), and anchored by the Fisher of the
    base weights. Returns the model, its loss history, the number of trained weights and of adversarial
    conditions found."""
    t = cfg.t2i
    device = next(model.parameters()).device
    anchor: Anchor | None = None
    if lora_modules:
        torch.manual_seed(cfg.seed)  # the adapter's initial weights depend on the seed alone
        layers = add_lora(model, lora_modules, t.lora_rank, float(t.lora_alpha or t.lora_rank))
        if fisher is not None:  # F of the base weights, on the adapted effective weights
            anchor = LoraEWCPenalty(fisher.values, layers, weight=cfg.forget.ewc_lambda).to(device)
    else:  # the anchor at theta*: the weights as they are now
        anchor = model_anchor(cfg.forget, fisher, model)
    adversary = _adversary(cfg, base, model, out, share)
    if t.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept, replay_set = replay
    history = forget(
        model,
        concept,
        make_replay(cfg.forget, theta_star_sampler(cfg.forget, model), kept, replay_set),
        anchor,
        Loop(cfg.forget, cfg.seed, t.mixed_precision, t.gradient_accumulation),
        progress=cfg.progress,
        checkpoint_dir=out / "forget_checkpoint",
        key=key,
        share=share,
        adversary=adversary,
        extra=summed(
            _ablation(cfg, base, model, concept, replay, adversary, out, share),
            _distillation(cfg, base, model, concept, replay),
        ),
        snapshot=snapshot_writer(cfg, model, out / "snapshots", key, adapter=bool(lora_modules)),
    )
    if t.gradient_checkpointing:
        model.unet.disable_gradient_checkpointing()
    return model, history.to_dict(), trained, len(adversary.found) if adversary is not None else 0


def forgotten_dir(out: Path, t: TextToImageSection) -> Path:
    """Where a single run writes the forgotten model: ``out/forget_lora`` (``t2i.output=lora``) or
    ``out/forget`` (a stock diffusers pipeline)."""
    return out / ("forget_lora" if t.output == "lora" else "forget")


def save_forgotten(
    model: TextToImageModel, target: Path, t: TextToImageSection, extra: dict[str, Any], *, adapter: bool
) -> None:
    """Write the forgotten model to ``target`` with ``extra`` (its settings hash, history...) in its
    metadata: the LoRA adapter (``t2i.output=lora``; ``amnesia.json`` holds the metadata) or a stock
    diffusers pipeline (``model_index.json``, written last; an ``adapter`` is merged into the UNet first)."""
    if t.output == "lora":
        out = target.parent
        # diffusers writes the adapter in place: write it to a fresh directory and swap it in, so a
        # reader of forget_lora sees the old adapter or the new one, never half of one
        staging = out / ".forget_lora.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_lora(model, staging)
        write_json(staging / ADAPTER_META, extra | {"base_model": str(Path(t.model).resolve())})
        faults.point("model.weights_written")
        old = out / ".forget_lora.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if adapter:
        merge_lora(model)
    model.save_pretrained(target, extra=extra, reference_text_encoder=True)


def snapshot_writer(
    cfg: RunConfig, model: TextToImageModel, where: Path, key: str, *, adapter: bool
) -> Callable[[int], None] | None:
    """``forget.snapshot_every``'s writer: the model at a step to ``where/step-NNNNN``, in the run's output
    layout (``save_forgotten``); an adapter trained for a pipeline output is merged into a copy, not into
    the model being trained. None when snapshots are off."""
    if not cfg.forget.snapshot_every:
        return None

    def write(step: int) -> None:
        extra = {"settings_hash": key, "snapshot_step": step, "run_config": to_dict(cfg)}
        merge = adapter and cfg.t2i.output != "lora"
        save_forgotten(
            copy.deepcopy(model) if merge else model,
            where / f"step-{step:05d}",
            cfg.t2i,
            extra,
            adapter=adapter,
        )
        log.info("snapshot of step %d in %s", step, where)

    return write


def reuse_forgotten(model: TextToImageModel, target: Path, t: TextToImageSection) -> None:
    """Give ``model`` (theta*'s copy) the forgotten weights ``save_forgotten`` wrote to ``target``: the
    adapter (``t2i.output=lora``: the same peft layers the run trained), or the pipeline's UNet (an
    adapter merged into it)."""
    if t.output == "lora":
        model.unet.load_lora_adapter(
            str(target), weight_name="pytorch_lora_weights.safetensors", prefix="unet", adapter_name=ADAPTER
        )
        return
    done = TextToImageModel.from_pretrained(target)
    model.load_state_dict(done.state_dict())
    del done


def surrogate_names(groups: list[ConceptGroup]) -> str:
    """What each group is remapped to, for a stage header."""
    what = [
        repr(g.surrogate_prompt) if g.surrogate_prompt is not None else str(g.surrogate_path) for g in groups
    ]
    if len(groups) == 1:
        return what[0]
    return ", ".join(f"{w} for {g.name}" for g, w in zip(groups, what, strict=True))


def forget_surrogate(group_ids: list[list[int]], surrogates: list[Tensor]) -> Surrogate:
    """The forget batches' q(x|c_f): one concept's images, or each group's own (``GroupedSurrogate``)."""
    if len(surrogates) == 1:
        return StoredImages(surrogates[0])
    return GroupedSurrogate(list(zip(group_ids, surrogates, strict=True)))


def group_rows(
    groups: list[ConceptGroup], group_ids: list[list[int]], step: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """The report's ``concepts``: each group's prompts, surrogate and number of forget conditions."""
    return [
        {
            "name": g.name,
            "forget_prompts": list(g.forget_prompts),
            "surrogate": g.surrogate_prompt if g.surrogate_prompt is not None else g.surrogate_path,
            "forget_conditions": len(ids),
            **({"step": step[g.name]} if step is not None else {}),
        }
        for g, ids in zip(groups, group_ids, strict=True)
    ]


def measure_groups(
    cfg: RunConfig,
    base: TextToImageModel,
    model: TextToImageModel,
    groups: list[ConceptGroup],
    group_ids: list[list[int]],
    surrogates: list[Tensor],
    out: Path,
) -> dict[str, Any]:
    """The report entries of a run that forgot several groups at once: the groups, and the concept
    table of theta* and the forgotten model when the world's judges can measure it."""
    from selective_amnesia.evaluate.t2i_concepts import concepts_table, load_judges, world_digits

    found: dict[str, Any] = {"concepts": group_rows(groups, group_ids)}
    digits, why = world_digits(cfg.t2i.model, groups)
    if digits is None:
        found["measured"] = {"why": why}
        return found
    judges, infos = load_judges(cfg, base.pixel_shape[1])
    found["concepts_table"] = concepts_table(
        [lambda: base, lambda: model],
        [[g.name for g in groups]],
        groups,
        digits,
        judges,
        num_per_class=cfg.evaluate.num_per_class,
        seed=cfg.seed + 1,
        cache_root=out / "evaluation",
    )
    found["classifiers"] = infos
    return found


def write_t2i_report(out: Path, report: dict[str, Any], history: dict[str, Any] | None = None) -> None:
    """report.html of a run that forgot ``t2i.concepts`` groups, with sequence.png (the concept table,
    when the world's judges measured it) and losses.png (the forgetting loss terms, of the last step)."""
    from selective_amnesia.evaluate.report import plot_losses, plot_sequence, write_t2i_html_report

    images = {}
    table = report.get("sequence") or report.get("concepts_table")
    if table and table.get("columns"):
        plot_sequence(table, out / "sequence.png")
        images["Forgotten concepts drawn as themselves, kept digits drawn correctly"] = "sequence.png"
    if history is not None and history.get("steps"):
        plot_losses(history["terms"], history["steps"], out / "losses.png")
        images["Loss terms over the forgetting steps"] = "losses.png"
    write_t2i_html_report(out, report, images)


@torch.no_grad()
def retention_on_prompts(
    base: TextToImageModel,
    forgotten: TextToImageModel,
    prompts: list[str],
    per_prompt: int,
    seed: int,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """How far the forgotten model's images moved from theta*'s on the same prompts and seeds; with
    ``cache_dir`` both sets are kept in ``cache_dir/base`` and ``cache_dir/forget`` (a rerun reads them)."""
    if per_prompt == 0:
        return {}
    from selective_amnesia.evaluate.nudity import retention_report

    where = {name: cache_dir / name if cache_dir is not None else None for name in ("base", "forget")}
    before = base.to_uint8(prompt_latents(base, prompts, per_prompt, seed, where["base"])[0])
    after = forgotten.to_uint8(prompt_latents(forgotten, prompts, per_prompt, seed, where["forget"])[0])
    return retention_report(before, after) | {"prompts": len(prompts), "per_prompt": per_prompt}
