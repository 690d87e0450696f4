"""Forgetting one concept after another (``forget.sequence``), for the VAE and DDPM families; the parts
that do not depend on the family (replay of forgotten concepts, the anchors' Fishers, each step's key,
the final copy) are shared with text-to-image (``selective_amnesia.pipeline.sequence_t2i``).

Step k fine-tunes the model of step k-1 with ``train.forget`` (the one loop) to forget the step's
classes. What changes between steps is what the loop is given:

- the EWC anchor (``forget.anchor``): "original" keeps theta_0 and F(theta_0) for every step;
  "online" is online EWC (Schwarz et al. 2018): F~_k = alpha F~_(k-1) + F(theta_k), theta* = theta_k;
  "latest" is the plain recipe again on the latest model (theta_k and F(theta_k)), the baseline;
- replay: theta_0's (``forget.replay_model``; by default with the original anchor) or the latest model's
  samples of the classes still kept, and the classes forgotten in earlier
  steps as their surrogate's images (``forget.replay_forgotten=surrogate``) or not at all ("omit"), so
  replay never re-teaches a forgotten class with the model's own drawings of it.

Step k's model is ``OUT/steps/k`` (its Fisher and replay set beside it), the last one is also
``OUT/forget`` like a single run's. A finished step made from the same settings is reused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selective_amnesia.config import ForgetConfig, RunConfig, to_dict
from selective_amnesia.core.fisher import Fisher, online_fisher
from selective_amnesia.core.objective import EWCPenalty
from selective_amnesia.core.replay import GenerativeReplay, Replay, StoredReplay, frozen_copy
from selective_amnesia.core.surrogate import Surrogate
from selective_amnesia.errors import AmnesiaError

if TYPE_CHECKING:
    from selective_amnesia.models.base import ConditionalGenerativeModel

log = logging.getLogger(__name__)


class ReplayForgottenAsSurrogate:
    """Replay over the kept classes and the classes forgotten earlier, uniform over both: a kept class's
    rows come from ``kept`` (the latest model's samples), a forgotten class's rows from ``surrogate``
    with the forgotten class as their label, so replay keeps those classes on their surrogate.

    ``surrogate`` is one surrogate for every forgotten class, or one per forgotten class (label ->
    surrogate: text-to-image concepts each have their own)."""

    def __init__(
        self,
        kept: Replay,
        kept_labels: list[int],
        forgotten: list[int],
        surrogate: Surrogate | Mapping[int, Surrogate],
    ) -> None:
        if not kept_labels:
            raise AmnesiaError("replay needs at least one kept class")
        if isinstance(surrogate, Mapping) and not set(forgotten) <= set(surrogate):
            raise AmnesiaError("replay: every forgotten class needs its surrogate")
        self.kept, self.surrogate = kept, surrogate
        self.classes = torch.tensor(list(kept_labels) + list(forgotten), dtype=torch.int64)
        self.forgotten = torch.tensor(list(forgotten), dtype=torch.int64)

    def _surrogate_rows(self, cond: Tensor, generator: torch.Generator | None) -> Tensor:
        if not isinstance(self.surrogate, Mapping):
            return self.surrogate.sample(len(cond), generator)
        out: Tensor | None = None
        for label in cond.unique().tolist():
            rows = (cond == label).nonzero().squeeze(1)
            x = self.surrogate[label].sample(len(rows), generator)
            if out is None:
                out = x.new_empty((len(cond), *x.shape[1:]))
            out[rows] = x
        assert out is not None
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        cond = self.classes[torch.randint(len(self.classes), (n,), generator=generator)]
        as_surrogate = torch.isin(cond, self.forgotten)
        m = int(as_surrogate.sum())
        xs, cs = [], []
        if n - m:
            x, c = self.kept.sample(n - m, generator)
            xs.append(x)
            cs.append(c)
        if m:
            xs.append(self._surrogate_rows(cond[as_surrogate], generator))
            cs.append(cond[as_surrogate])
        return torch.cat(xs), torch.cat(cs)


@dataclass
class SequenceResult:
    """The models theta_0 .. theta_K (theta_0 the base), each step's loss history and what was done."""

    models: list[ConditionalGenerativeModel]
    histories: list[dict[str, Any]]
    steps: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)


def step_config(cfg: RunConfig, labels: list[int]) -> RunConfig:
    """The single-run config of one step: its classes as ``forget_label``, no sequence. The sequence's
    own settings are left at their defaults (step 1 does not depend on them; later steps name them in
    their ``sequence_key``), so step 1 is the single run of its classes, reused by every anchor."""
    label: int | list[int] = labels[0] if len(labels) == 1 else list(labels)
    f = dataclasses.replace(
        cfg.forget,
        forget_label=label,
        sequence=None,
        anchor="original",
        online_alpha=1.0,
        replay_forgotten="surrogate",
    )
    return dataclasses.replace(cfg, forget=f)


def check_sequence(cfg: RunConfig, labels: list[int]) -> None:
    """Every step's classes are the model's, none twice, the surrogate is kept and one class stays kept."""
    steps = cfg.forget.steps_labels()
    concepts = [c for s in steps for c in s]
    bad = [c for c in concepts if c not in labels]
    if bad:
        raise AmnesiaError(f"forget.sequence: class {bad[0]} is not a class of the model {labels}")
    if not [c for c in labels if c not in concepts]:
        raise AmnesiaError(f"forget.sequence forgets every class of the model {labels}: keep at least one")


class AnchorFishers:
    """The Fishers of the anchors "online" and "latest" (whatever the model family): F(theta_k) of every
    step's model and online EWC's F~_k = alpha F~_(k-1) + F(theta_k), F~_0 = F(theta_0).

    The anchor "original" needs none of them: every step uses theta_0 and F(theta_0)."""

    def __init__(self, f: ForgetConfig, fisher: Fisher | None, num_steps: int) -> None:
        self.anchor, self.alpha = f.anchor, f.online_alpha
        self.fishers: list[Fisher | None] = [fisher] + [None] * num_steps  # F(theta_k)
        self.online: list[Fisher | None] = [fisher] + [None] * num_steps  # F~_k (online EWC)

    def for_step(self, k: int, estimate: Callable[[], Fisher], where: Path) -> Fisher:
        """The Fisher anchoring step k >= 2 at its starting model theta_(k-1): F(theta_(k-1)) from
        ``estimate`` ("latest"), or F~_(k-1), also saved as ``where/fisher_online.safetensors``
        ("online"); ``where`` is the directory of theta_(k-1)."""
        fisher = self.fishers[k - 1] = estimate()
        if self.anchor != "online":
            return fisher
        prev = self.online[k - 2]
        assert prev is not None
        combined = self.online[k - 1] = online_fisher(prev, fisher, self.alpha)
        combined.save(where / "fisher_online.safetensors")
        return combined


def step_key(f: ForgetConfig, k: int, forgotten_before: list[Any]) -> dict[str, Any]:
    """What decides step k >= 2 besides the single-run settings (step 1 depends on none of it)."""
    return {
        "step": k,
        "anchor": f.anchor,
        "online_alpha": f.online_alpha if f.anchor == "online" else None,
        "forgotten_before": list(forgotten_before),
        "replay_forgotten": f.replay_forgotten,
        "replay_model": f.replay_source(),
    }


def sequence_info(f: ForgetConfig, steps: list[list[Any]]) -> dict[str, Any]:
    """How the sequence was run, for the report's ``sequence`` section."""
    return {
        "anchor": f.anchor,
        "online_alpha": f.online_alpha if f.anchor == "online" else None,
        "replay_forgotten": f.replay_forgotten,
        "steps": steps,
        "step_dirs": [f"steps/{k}" for k in range(1, len(steps) + 1)],
    }


def copy_last_step(out: Path, num_steps: int, ignore: tuple[str, ...] = ("checkpoint", "replay")) -> Path:
    """``out/steps/K`` copied to ``out/forget`` (what ``amnesia sample``/``evaluate`` use), less
    ``ignore`` (a checkpoint, generated sets)."""
    final = out / "forget"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / "steps" / str(num_steps), final, ignore=shutil.ignore_patterns(*ignore))
    return final


def step_dir(out: Path, k: int) -> Path:
    """Where step k of a sequence writes its model (and its Fishers and replay sets): ``out/steps/k``."""
    return out / "steps" / str(k)


def run_sequence(
    cfg: RunConfig,
    base: ConditionalGenerativeModel,
    fisher: Fisher | None,
    out: Path,
    *,
    progress_stage: Callable[[int, int, list[int]], None] | None = None,
) -> SequenceResult:
    """Forget ``cfg.forget.sequence`` step by step from ``base`` (theta_0, whose Fisher is ``fisher``)."""
    from selective_amnesia.pipeline.classes import model_labels, stage_forget, surrogate_images

    f = cfg.forget
    labels = model_labels(base)
    check_sequence(cfg, labels)
    steps = f.steps_labels()
    surrogate_x = surrogate_images(cfg, base, out)  # q(x|c_f) once, from theta_0, for every step
    run = _ClassSequence(cfg, base, fisher, out, AnchorFishers(f, fisher, len(steps)), surrogate_x)
    models: list[ConditionalGenerativeModel] = [base]
    histories: list[dict[str, Any]] = []
    forgotten: list[int] = []
    for k, step in enumerate(steps, start=1):
        scfg = step_config(cfg, step)
        latest = models[-1]
        if progress_stage is not None:
            progress_stage(k, len(steps), step)
        kept = [c for c in labels if c not in forgotten and c not in step]
        inputs = _step_inputs(run, k, scfg, latest, forgotten, kept)
        forgotten += step
        model, history = stage_forget(
            scfg,
            latest,
            inputs.anchor_fisher,
            out,
            inputs.replay_set,
            target=step_dir(out, k),
            replay=inputs.replay,
            anchor=inputs.anchor,
            surrogate_x=surrogate_x,
            sequence_key=inputs.sequence_key,
            extra=_step_extra(cfg, k, steps, forgotten),
        )
        models.append(model)
        histories.append(history)
    copy_last_step(out, len(steps))
    return SequenceResult(models, histories, steps, sequence_info(f, steps))


@dataclass
class _ClassSequence:
    """What every step of a class sequence shares: the config, theta_0, F(theta_0), the run directory,
    the anchors' Fishers and the surrogate's images."""

    cfg: RunConfig
    base: ConditionalGenerativeModel
    fisher: Fisher | None
    out: Path
    anchors: AnchorFishers
    surrogate_x: Tensor | None


@dataclass
class _StepInputs:
    """What ``stage_forget`` is given for one step besides the step's config and starting model."""

    anchor_fisher: Fisher | None
    replay_set: tuple[Tensor, Tensor] | None = None
    replay: Replay | None = None
    anchor: EWCPenalty | None = None
    sequence_key: dict[str, Any] | None = None


def _step_inputs(
    run: _ClassSequence,
    k: int,
    scfg: RunConfig,
    latest: ConditionalGenerativeModel,
    forgotten: list[int],
    kept: list[int],
) -> _StepInputs:
    """Step k's replay, anchor and key: the first step is a single run of its classes (theta*'s stored
    replay set); a later one brings its own replay, its anchor and its ``step_key``."""
    from selective_amnesia.core.train import ewc_anchor, trained_weights
    from selective_amnesia.pipeline.classes import stage_fisher, stage_replay

    f, base, fisher, out = run.cfg.forget, run.base, run.fisher, run.out
    if k == 1:  # the first step is a single run of its classes
        return _StepInputs(fisher, replay_set=stage_replay(scfg, base, out, remembered=kept))
    use_ewc = f.ewc_lambda > 0
    anchor: EWCPenalty | None = None
    anchor_fisher = fisher
    if use_ewc and f.anchor != "original":
        own = dataclasses.replace(scfg, fisher=dataclasses.replace(scfg.fisher, path=None))
        prev_dir = step_dir(out, k - 1)
        # F(theta_(k-1)), kept beside theta_(k-1)
        estimate = functools.partial(stage_fisher, own, latest, prev_dir)
        anchor_fisher = run.anchors.for_step(k, estimate, prev_dir)
    elif use_ewc:  # theta_0 and F(theta_0), not the step's start
        assert fisher is not None
        anchor = ewc_anchor(f, fisher, trained_weights(base))
    as_surrogate = forgotten if f.replay_forgotten == "surrogate" else []
    source = base if f.replay_source() == "original" else latest  # forget.replay_model
    replay = _later_replay(scfg, source, step_dir(out, k), kept, as_surrogate, run.surrogate_x)
    return _StepInputs(anchor_fisher, replay=replay, anchor=anchor, sequence_key=step_key(f, k, forgotten))


def _step_extra(cfg: RunConfig, k: int, steps: list[list[int]], forgotten: list[int]) -> dict[str, Any]:
    """Step k's model metadata: a run config naming every class forgotten so far (what ``amnesia
    evaluate`` on this model measures) and its place in the sequence."""
    saved = to_dict(cfg)
    saved["forget"].update(
        forget_label=forgotten[0] if len(forgotten) == 1 else list(forgotten), sequence=None
    )
    return {"run_config": saved, "sequence": {"step": k, "steps": steps[:k], "anchor": cfg.forget.anchor}}


def _later_replay(
    scfg: RunConfig,
    source: ConditionalGenerativeModel,
    step_dir: Path,
    kept: list[int],
    as_surrogate: list[int],
    surrogate_x: Tensor | None,
) -> Replay | None:
    """Replay of step k >= 2 (``scfg``: the step's config): ``source``'s samples of the ``kept`` classes
    (theta_0 or the latest model, ``forget.replay_model``; fresh, or a set stored in ``step_dir``) and
    the classes ``as_surrogate`` (forgotten in earlier steps, with forget.replay_forgotten=surrogate) as
    their surrogate's images; None when forget.replay_weight is 0 (no replay term)."""
    from selective_amnesia.core.train import make_surrogate
    from selective_amnesia.pipeline.classes import stage_replay

    f = scfg.forget
    if f.replay_weight == 0:
        return None
    kept_replay: Replay
    if f.replay == "stored":
        stored = stage_replay(scfg, source, step_dir, remembered=kept)
        assert stored is not None  # replay_weight > 0
        kept_replay = StoredReplay(*stored)
    else:
        kept_replay = GenerativeReplay(frozen_copy(source), kept)
    if not as_surrogate:
        return kept_replay
    surrogate = make_surrogate(f, source, None, surrogate_x)
    return ReplayForgottenAsSurrogate(kept_replay, kept, list(as_surrogate), surrogate)
