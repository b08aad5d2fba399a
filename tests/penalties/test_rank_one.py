"""``penalties.rank_one``: the fused rank-one step as one autograd function (no hooks).

Checked in float64 for the two penalties with a fused mode (Frechet prior: a float ``d``;
stable rank: a tensor ``d``): the value is ``R(|W v|^2, ||W||_F^2)`` with ``v`` the top
Ritz vector of the block, the closed-form backward equals autograd of that expression with
``v`` held (1e-12), the next block is ``orth(W^T W V)``; after warm calls at fixed weights
the value equals the penalty's exact mode (1e-8); a block of the wrong shape is refused.
"""

from __future__ import annotations

import pytest
import torch

from bayes_spectral import penalties as P
from bayes_spectral.penalties.fused import orth2, top_ritz
from bayes_spectral.penalties.rank_one import rank_one_loss, rank_one_penalty

PENALTIES = {  # name -> (mode -> penalty)
    "frechet": lambda mode="fused": P.FrechetPrior(2.0, 1.0, 0.5, mode=mode),
    "stable rank": lambda mode="fused": P.StableRank(0.3, mode=mode),
}


def _weight(m=12, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) / 4
    w[0] += 1.0  # a top singular value apart from the rest
    return w


@pytest.mark.parametrize("name", list(PENALTIES))
def test_value_gradient_and_next_block_are_the_closed_form_step(name):
    pen = PENALTIES[name]()
    w = _weight()
    vb = orth2(torch.randn(2, 20, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64))
    leaf = w.clone().requires_grad_(True)
    value, nxt = rank_one_penalty(leaf, vb, pen._rank_one_value, pen._rank_one_coefs)
    (g,) = torch.autograd.grad(value, leaf)
    # the same with autograd, v held: v = V y, y the top Ritz vector of (W V)^T (W V)
    ref = w.clone().requires_grad_(True)
    rb = vb @ w.t()
    v = vb.t() @ top_ritz(rb)
    r = ref @ v
    expect = pen._rank_one_value(r @ r, ref.square().sum(), 12)
    (g_ref,) = torch.autograd.grad(expect, ref)
    torch.testing.assert_close(value, expect.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nxt, orth2(rb @ w), rtol=0, atol=0)
    assert not nxt.requires_grad


@pytest.mark.parametrize("name", list(PENALTIES))
def test_warm_calls_converge_to_the_exact_penalty(name):
    pen, exact = PENALTIES[name](), PENALTIES[name]("exact")  # exact: the full spectrum
    w = _weight()
    for _ in range(40):
        value = rank_one_loss(pen, w, "w")
    assert pen._fused["w"].v.shape == (2, 20)
    torch.testing.assert_close(value, exact(w), rtol=1e-8, atol=1e-10)


def test_a_block_of_the_wrong_shape_is_refused():
    pen = PENALTIES["frechet"]()
    with pytest.raises(ValueError, match=r"block must be 2 x 20.*\(12, 20\).*\(2, 19\)"):
        rank_one_penalty(_weight(), torch.zeros(2, 19, dtype=torch.float64),
                         pen._rank_one_value, pen._rank_one_coefs)
