"""Hostile and careless input to ``Regularizer`` (issue 18, item 4 and the ``names=[]`` line).

A model with one frozen ``Linear`` (``requires_grad=False``): ``reg.accumulate_grad()`` and
the autograd path ``(task + reg()).backward()`` must agree on every parameter, frozen ones
included (no ``.grad`` created, not moved by an optimiser with weight decay), for weight
decay, spectral norm and weighted alpha (fitted and tracked). Rows: ``(id, penalty factory,
check)``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bayes_spectral.penalties import (
    L1,
    NuclearNorm,
    Regularizer,
    SpectralNorm,
    WeightDecay,
    WeightedAlpha,
)

PENALTIES = {
    "weight_decay": lambda: WeightDecay(0.1),
    "spectral_norm": lambda: SpectralNorm(0.1, n_iter=3, seed=0),
    "weighted_alpha": lambda: WeightedAlpha(0.1),
    "weighted_alpha_tracked": lambda: WeightedAlpha(0.1, tracked=True),
    "l1": lambda: L1(0.01),
    "nuclear_norm": lambda: NuclearNorm(0.01),
}


def frozen_model() -> nn.Module:
    """Linear(16, 24) - ReLU - Linear(24, 20) [frozen] - ReLU - Linear(20, 18), float64."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(),
                      nn.Linear(20, 18)).double()
    m[2].requires_grad_(False)
    return m


def task_loss(m: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g, dtype=torch.float64)
    return m(x).square().mean()


def _step(path: str, make_penalty):
    """One SGD step (lr 0.1, weight decay 0.01) by ``path``; returns (model, grads before
    the step, the penalty's value)."""
    m = frozen_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = Regularizer(m, make_penalty())
    opt = torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01)
    opt.zero_grad(set_to_none=True)
    if path == "autograd":
        value = reg()
        (task_loss(m) + value).backward()
    else:
        task_loss(m).backward()
        value = reg.accumulate_grad()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    return m, grads, float(value)


def check_frozen_grad_none(make):
    _, grads, _ = _step("accumulate", make)
    assert grads["2.weight"] is None and grads["2.bias"] is None


def check_frozen_not_moved(make):
    m, _, _ = _step("accumulate", make)
    assert torch.equal(m[2].weight, frozen_model()[2].weight)


def check_grads_agree(make):
    _, ga, _ = _step("autograd", make)
    _, gb, _ = _step("accumulate", make)
    assert sorted(ga) == sorted(gb)
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-10, atol=1e-12, msg=n)


def check_params_agree(make):
    ma, _, va = _step("autograd", make)
    mb, _, vb = _step("accumulate", make)
    assert vb == pytest.approx(va, rel=1e-12)
    for (n, a), (_, b) in zip(ma.named_parameters(), mb.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=n)


CHECKS = {"frozen_grad_none": check_frozen_grad_none,
          "frozen_not_moved": check_frozen_not_moved,
          "grads_agree": check_grads_agree,
          "params_agree": check_params_agree}

FROZEN = [(f"{p}-{c}", PENALTIES[p], CHECKS[c]) for p in PENALTIES for c in CHECKS]


@pytest.mark.parametrize("make, check", [c[1:] for c in FROZEN], ids=[c[0] for c in FROZEN])
def test_frozen_weights_both_paths_agree(make, check):
    check(make)


def test_frozen_penalty_still_counts_in_the_value():
    """The frozen layer's weight decay is part of the returned value: 0.05 * sum W^2 over
    the three weights (biases are not rows)."""
    m = frozen_model()
    reg = Regularizer(m, WeightDecay(0.1))
    want = sum(0.05 * float(m[i].weight.square().sum()) for i in (0, 2, 4))
    assert float(reg.accumulate_grad()) == pytest.approx(want, rel=1e-12)
    assert reg.history["2"][-1] == pytest.approx(0.05 * float(m[2].weight.square().sum()))


BAD_SELECTIONS = [
    ("names-empty-list", {"names": []}, r"names=\[\] .*select no weight"),
    ("names-empty-tuple", {"names": ()}, r"names=\(\) .*select no weight"),
    ("names-unknown", {"names": ["nope"]}, r"nope"),
    ("pattern-nothing", {"pattern": "zzz.*"}, r"zzz"),
]


@pytest.mark.parametrize("kw, pattern", [c[1:] for c in BAD_SELECTIONS],
                         ids=[c[0] for c in BAD_SELECTIONS])
def test_bad_selection_fails_at_construction(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        Regularizer(frozen_model(), WeightDecay(0.1), **kw)
