import pytest
import torch

from selective_amnesia.core.fisher import estimate_fisher
from selective_amnesia.core.objective import EWCPenalty, reduce_nelbo, selective_amnesia_loss


def _ewc(model: torch.nn.Module, weight: float = 1.0) -> EWCPenalty:
    f = estimate_fisher(model, num_samples=16, labels=list(range(10)), progress=False)
    return EWCPenalty(f.values, {n: p.detach().clone() for n, p in model.named_parameters()}, weight=weight)


def _batch(n: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        forget_x=torch.rand(n, 1, 28, 28, generator=g),
        forget_c=torch.zeros(n, dtype=torch.int64),
        replay_x=torch.rand(n, 1, 28, 28, generator=g),
        replay_c=torch.arange(1, n + 1) % 9 + 1,
    )


def test_ewc_is_zero_at_theta_star_and_positive_away(tiny_cvae: torch.nn.Module) -> None:
    ewc = _ewc(tiny_cvae)
    assert float(ewc(dict(tiny_cvae.named_parameters())).detach()) == 0.0
    with torch.no_grad():
        for p in tiny_cvae.parameters():
            p.add_(0.01)
    assert float(ewc(dict(tiny_cvae.named_parameters())).detach()) > 0


def test_terms_are_separate_weighted_and_summed(tiny_cvae: torch.nn.Module) -> None:
    ewc = _ewc(tiny_cvae)
    with torch.no_grad():
        tiny_cvae.to_mu.bias.add_(0.1)
    kw = dict(reduction="sum", generator=None)
    torch.manual_seed(0)
    t1 = selective_amnesia_loss(tiny_cvae, **_batch(), anchor=ewc, replay_weight=1.0, **kw)
    ewc.weight = 10.0  # lambda is the anchor's
    torch.manual_seed(0)
    t2 = selective_amnesia_loss(tiny_cvae, **_batch(), anchor=ewc, replay_weight=2.0, **kw)
    assert torch.allclose(t2.ewc, 10 * t1.ewc) and torch.allclose(t2.replay, 2 * t1.replay)
    assert torch.allclose(t1.forget, t2.forget)
    assert torch.allclose(t1.total, t1.forget + t1.replay + t1.ewc)
    t0 = selective_amnesia_loss(tiny_cvae, **_batch(), anchor=None, replay_weight=0.0, reduction="sum")
    assert float(t0.ewc) == 0 and float(t0.replay) == 0


def test_lambda_is_a_plain_factor_outside_the_anchors_state(tiny_cvae: torch.nn.Module) -> None:
    """lambda * the unweighted sum, bit for bit (the loss before lambda moved into the anchor), and the
    state dict (part of a sequence step's settings hash) does not hold it."""
    one, ten = _ewc(tiny_cvae), _ewc(tiny_cvae, weight=10.0)
    with torch.no_grad():
        tiny_cvae.to_mu.bias.add_(0.1)
    params = dict(tiny_cvae.named_parameters())
    assert torch.equal(ten(params), 10.0 * one.penalty(params)) and torch.equal(
        one(params), one.penalty(params)
    )
    assert one.state_dict().keys() == ten.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(one.state_dict().values(), ten.state_dict().values(), strict=True)
    )


def test_naive_objective_flips_the_forget_term(tiny_cvae: torch.nn.Module) -> None:
    kw = dict(anchor=None, replay_weight=0.0, reduction="mean")
    torch.manual_seed(0)
    s = selective_amnesia_loss(tiny_cvae, **_batch(), objective="surrogate", **kw)
    torch.manual_seed(0)
    n = selective_amnesia_loss(tiny_cvae, **_batch(), objective="naive", **kw)
    assert torch.allclose(n.forget, -s.forget) and float(s.forget.detach()) > 0


def test_reduction_is_explicit() -> None:
    v = torch.tensor([1.0, 2.0, 3.0])
    assert float(reduce_nelbo(v, "sum")) == 6.0 and float(reduce_nelbo(v, "mean")) == 2.0
    with pytest.raises(ValueError):
        reduce_nelbo(v, "max")


@pytest.mark.parametrize("term", ["forget", "replay"])
def test_each_term_decreases_when_it_alone_is_minimised(tiny_cvae: torch.nn.Module, term: str) -> None:
    batch = _batch(16)
    opt = torch.optim.Adam(tiny_cvae.parameters(), lr=3e-3)
    values = []
    for _ in range(40):
        t = selective_amnesia_loss(
            tiny_cvae,
            **batch,
            anchor=None,
            replay_weight=1.0,
            reduction="mean",
            generator=torch.Generator().manual_seed(0),
        )
        opt.zero_grad()
        getattr(t, term).backward()
        opt.step()
        values.append(float(getattr(t, term).detach()))
    assert values[-1] < 0.97 * values[0]


def test_ewc_gradient_pulls_back_to_theta_star(tiny_cvae: torch.nn.Module) -> None:
    ewc = _ewc(tiny_cvae)
    star = {n: p.detach().clone() for n, p in tiny_cvae.named_parameters()}
    with torch.no_grad():
        for p in tiny_cvae.parameters():
            p.add_(0.05)
    opt = torch.optim.SGD(tiny_cvae.parameters(), lr=1e-3)
    before = float(ewc(dict(tiny_cvae.named_parameters())).detach())
    for _ in range(20):
        loss = ewc(dict(tiny_cvae.named_parameters()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(ewc(dict(tiny_cvae.named_parameters())).detach()) < before
    dist = sum(float((p.detach() - star[n]).abs().sum()) for n, p in tiny_cvae.named_parameters())
    assert dist > 0
