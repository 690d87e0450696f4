"""Behaviour: a short forgetting run makes a tiny model stop drawing the forgotten digit."""

from typing import Any

import pytest
import torch

from selective_amnesia.config import ForgetConfig, PretrainConfig
from selective_amnesia.core.fisher import estimate_fisher
from selective_amnesia.core.train import Loop, class_forgetting, forget, model_anchor, pretrain
from selective_amnesia.data import load_dataset
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.evaluate.classifier import ClassifierRecipe, train_classifier
from selective_amnesia.models import build_model

LABELS = list(range(10))


def _forget(model: Any, fisher: Any, cfg: ForgetConfig, seed: int) -> Any:
    """A class run as the pipeline's: the surrogate and replay of theta*, the anchor at the model."""
    concept, replay = class_forgetting(cfg, model, LABELS)
    anchor = model_anchor(cfg, fisher, model)
    return forget(model, concept, replay, anchor, Loop(cfg, seed), progress=False)


def _weights_after(model: torch.nn.Module, **kw: Any) -> dict[str, torch.Tensor]:
    """The state of a copy of ``model`` forgotten with ForgetConfig(batch_size=8, **kw) at seed 1, on a
    small Fisher of ``model`` (estimated alike for each call, so the runs differ only in ``kw``)."""
    import copy

    fisher = estimate_fisher(model, num_samples=32, labels=LABELS, progress=False)
    copied = copy.deepcopy(model)
    _forget(copied, fisher, ForgetConfig(batch_size=8, **kw), seed=1)
    return copied.state_dict()


def _p_label(model: torch.nn.Module, clf: torch.nn.Module, label: int) -> float:
    cond = torch.full((300,), label, dtype=torch.int64)
    x = model.sample(cond, generator=torch.Generator().manual_seed(5))
    return float(clf.predict_proba(x)[:, label].mean())


def test_short_forgetting_run_lowers_p_forget() -> None:
    """A judge trained for seconds is weak (it calls flat gray images fairly zero-like), so the bar is a
    clear drop for the forgotten digit while a remembered digit keeps its score, not the paper's numbers."""
    train = load_dataset("mnist", "train")
    recipe = ClassifierRecipe(epochs=1, lr=3e-3, max_train_images=6000)
    clf = train_classifier(recipe, train, seed=0, progress=False)
    torch.manual_seed(0)
    model = build_model("cvae", hidden_dims=[128], latent_dim=4)
    pretrain(model, train, PretrainConfig(steps=1500, batch_size=128, lr=2e-3), seed=0, progress=False)
    before, kept_before = _p_label(model, clf, 0), _p_label(model, clf, 1)
    fisher = estimate_fisher(model, num_samples=512, labels=LABELS, progress=False)
    cfg = ForgetConfig(steps=400, batch_size=64, lr=2e-3, ewc_lambda=100.0, log_every=100)
    history = _forget(model, fisher, cfg, seed=0)
    after, kept_after = _p_label(model, clf, 0), _p_label(model, clf, 1)
    assert before > 0.6, f"the tiny base model should draw zeros (P={before:.2f})"
    assert after < before - 0.15, (before, after)
    assert kept_after > kept_before - 0.1, (kept_before, kept_after)
    assert history.steps[-1] == 400 and len(history.terms["ewc"]) == 4


def test_forget_label_must_be_a_model_class(tiny_cvae: torch.nn.Module) -> None:
    with pytest.raises(AmnesiaError, match="not one of the model's classes"):
        class_forgetting(ForgetConfig(forget_label=11, ewc_lambda=0.0), tiny_cvae, LABELS)
    with pytest.raises(AmnesiaError, match="needs a Fisher"):
        model_anchor(ForgetConfig(), None, tiny_cvae)
    assert model_anchor(ForgetConfig(ewc_lambda=0.0), None, tiny_cvae) is None


def test_replay_weight_needs_replay_and_loop_settings_are_checked(tiny_cvae: torch.nn.Module) -> None:
    cfg = ForgetConfig(ewc_lambda=0.0, steps=1, batch_size=2)
    concept, _ = class_forgetting(cfg, tiny_cvae, LABELS)
    with pytest.raises(AmnesiaError, match="needs replay samples"):
        forget(tiny_cvae, concept, None, None, Loop(cfg, 0), progress=False)
    with pytest.raises(AmnesiaError, match="accumulation must be >= 1"):
        Loop(cfg, 0, accumulation=0)


def test_one_seed_makes_forgetting_reproducible(tiny_cvae: torch.nn.Module) -> None:
    import copy

    from selective_amnesia.core.fisher import estimate_fisher

    fisher = estimate_fisher(tiny_cvae, num_samples=32, labels=LABELS, progress=False)
    cfg = ForgetConfig(steps=5, batch_size=8, log_every=1)
    a, b = copy.deepcopy(tiny_cvae), copy.deepcopy(tiny_cvae)
    ha, hb = _forget(a, fisher, cfg, seed=3), _forget(b, fisher, cfg, seed=3)
    assert ha.terms == hb.terms
    for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), n


def test_a_last_step_at_learning_rate_zero_leaves_the_weights(tiny_cvae: torch.nn.Module) -> None:
    """forget.lr_decay_steps reaches the optimizer: decayed to 0 over the last step, a 3-step run ends
    with the weights of the same run stopped after 2 (no EMA, no weight decay); without the decay, not."""
    two = _weights_after(tiny_cvae, steps=2)
    decayed = _weights_after(tiny_cvae, steps=3, lr_decay_steps=1, lr_decay_to=0.0)
    three = _weights_after(tiny_cvae, steps=3)
    assert all(torch.equal(two[n], decayed[n]) for n in two)
    assert not all(torch.equal(two[n], three[n]) for n in two)


def test_average_from_saves_the_mean_of_the_late_weights(tiny_cvae: torch.nn.Module) -> None:
    """forget.average_from=2 on a 4-step run saves the mean of the weights after steps 2, 3 and 4: the
    same runs stopped after 2, 3 and 4 steps (no EMA) give them one by one."""
    late = [_weights_after(tiny_cvae, steps=n) for n in (2, 3, 4)]
    averaged = _weights_after(tiny_cvae, steps=4, average_from=2)
    for n, p in averaged.items():
        if p.is_floating_point():
            torch.testing.assert_close(p, sum(w[n] for w in late) / 3, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(late[-1][n], averaged[n]) for n in averaged if averaged[n].is_floating_point())
