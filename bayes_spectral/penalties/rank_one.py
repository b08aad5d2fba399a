"""Layer 3: the fused rank-one step as one autograd function, without hooks.

For a penalty ``R(lambda, total)`` of ``lambda ~ sigma_max(W)^2`` and ``total = ||W||_F^2``
(the :class:`~bayes_spectral.penalties.fused.Rule` of a ``mode="fused"`` penalty: the Frechet
prior, stable rank) and a kept orthonormal ``n x 2`` block ``V`` (stored as its ``2 x n``
rows ``V^T``), one call of :func:`rank_one_penalty` on an ``m x n`` weight ``W``:

* forward: ``R^T = V^T W^T`` (``2 x m``), ``y`` the top eigenvector of the ``2 x 2``
  ``R^T R`` in closed form (:func:`top_ritz`), ``v = V y``,
  ``r = R y = W v``, ``lambda = |r|^2`` (a Rayleigh-Ritz value, ``<= lambda_max``),
  ``total = ||W||_F^2``; returns ``R(lambda, total)`` and the next block
  ``orth(W^T R)`` (one block power step);
* backward: ``dR/dW = c r v^T + d W``, ``(c, d) = coefs(lambda, total, N)``, ``N =
  min(m, n)`` (``c = 2 dR/dlambda`` at the held ``v``, ``d = 2 dR/dtotal``).

Three passes over ``W`` forward (two thin products, one dot), one or two backward; no
``eigh``, no host sync; differentiable once (a Hessian, e.g. a Laplace approximation's,
needs another path); the same maths as the hooks' :meth:`Rule.add` (which calls
:func:`ritz_pair`; :func:`orth2` / :func:`top_ritz` live here, re-exported by
``fused``). This is the path of weights that no ``nn.Linear`` hook sees: Pyro's
sampled / MAP weights of :func:`~bayes_spectral.bayesian` with ``tracked_mode="fused"``
(:func:`rank_one_loss`, the state kept in the penalty's fused layers, so its
``state_dict`` carries it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .fused import RankOneFused

__all__ = ["RankOnePenalty", "block_step_rows", "orth2", "orth2_rows", "rank_one_loss",
           "rank_one_penalty", "ritz_pair", "top_ritz", "top_ritz_rows"]


def _floor(g1: torch.Tensor, dim=None) -> torch.Tensor:
    """``max(sqrt(eps) |g_1|, 1e-30)``: the smallest norm :func:`orth2` divides the second
    row by (``dim``: per row of a stack)."""
    n = torch.linalg.vector_norm(g1, dim=dim, keepdim=dim is not None)
    return n.mul_(torch.finfo(g1.dtype).eps ** 0.5).clamp_min_(1e-30)


def orth2(g: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the two rows of ``g`` (Gram-Schmidt; no host sync). A second
    row within ``sqrt(eps)`` of the first's span (``W^T R`` of a rank-one ``W``: what is
    left is rounding noise) is divided by ``sqrt(eps) |g_1|`` instead of its norm: it stays
    ``<= 1`` and of rounding size, not a unit vector in a direction set by rounding."""
    a = g[0] / torch.linalg.vector_norm(g[0]).clamp_min(1e-30)
    b = g[1] - a * torch.dot(a, g[1])
    return torch.stack([a, b / torch.linalg.vector_norm(b).clamp_min(_floor(g[1]))])


def top_ritz(rb: torch.Tensor) -> torch.Tensor:
    """Unit top eigenvector ``y = (cos t, sin t)`` of the 2 x 2 ``H = R^T R`` (``rb = R^T =
    V^T W^T``, rows), ``t = atan2(2 h_01, h_00 - h_11) / 2``: the rotation that diagonalises
    ``H``, on the larger eigenvalue's side (``e_1`` for a multiple of the identity); a few
    dispatches, no eigh, no host sync."""
    a, b, _, c = (rb @ rb.t()).reshape(4).unbind()
    t = torch.atan2(b + b, a - c).mul(0.5)
    return torch.stack([t.cos(), t.sin()])


def orth2_rows(g: torch.Tensor) -> torch.Tensor:
    """:func:`orth2` of every ``2 x n`` block of an ``(L, 2, n)`` stack (zero columns, the
    padding of a stack of narrower blocks, stay exactly zero)."""
    g0, g1 = g.unbind(1)
    a = g0 / torch.linalg.vector_norm(g0, dim=1, keepdim=True).clamp_min(1e-30)
    b = torch.addcmul(g1, a, torch.linalg.vecdot(a, g1).unsqueeze(1), value=-1.0)
    nb = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    return torch.stack([a, b / torch.maximum(nb, _floor(g1, 1))], dim=1)


def top_ritz_rows(rb: torch.Tensor) -> torch.Tensor:
    """:func:`top_ritz` of every ``2 x m`` block of an ``(L, 2, m)`` stack: ``(L, 2)``,
    ``y_l = (cos t_l, sin t_l)``, ``t_l = atan2(2 h_01, h_00 - h_11) / 2``."""
    a, b, _, c = torch.bmm(rb, rb.transpose(1, 2)).reshape(-1, 4).unbind(1)
    t = torch.atan2(b + b, a - c).mul(0.5)
    return torch.stack([t.cos(), t.sin()], dim=1)


def block_step_rows(w: torch.Tensor, vb: torch.Tensor, coefs: Callable, scale: float = 1.0,
                    total: bool = True, steps: int = 0, out: torch.Tensor | None = None):
    """The fused rank-one step of ``L`` layers at once: ``w`` the ``(L, M, N)`` stack of the
    weights (zero-padded), ``vb`` their blocks' rows ``(L, 2, N)``. ``steps`` block steps
    ``V <- orth(V W^T W)``, then ``R^T = V W^T``, ``y = top_ritz(R^T)``, ``r = y^T R^T``,
    ``v = y^T V``, ``lambda = |r|^2``, ``total = ||W||_F^2``, ``(c, d) = coefs(lambda,
    total)`` (``(L,)`` tensors, floats or ``d = None``), both times ``scale``. Returns
    ``(delta = c r v^T + d W, lambda, total, next = orth(W^T R))`` (``delta`` written into
    ``out`` when given); zero padding stays zero in ``delta`` and ``next``. No host sync."""
    wt = w.transpose(1, 2)
    for _ in range(steps):
        vb = orth2_rows(torch.bmm(torch.bmm(vb, wt), w))
    rb = torch.bmm(vb, wt)
    y = top_ritz_rows(rb).unsqueeze(1)
    r, v = torch.bmm(y, rb), torch.bmm(y, vb)  # (L, 1, M), (L, 1, N)
    lam = r.square().sum((1, 2))
    tot = w.square().sum((1, 2)) if total else None
    c, d = coefs(lam, tot)
    if scale != 1.0:
        c = c * scale
        d = None if d is None else d * scale
    cr = r * (c.view(-1, 1, 1) if isinstance(c, torch.Tensor) else c)
    delta = torch.bmm(cr.transpose(1, 2), v, out=out)
    if isinstance(d, torch.Tensor):
        delta.addcmul_(w, d.view(-1, 1, 1))
    elif d is not None:
        delta.add_(w, alpha=d)
    return delta, lam, tot, orth2_rows(torch.bmm(rb, w))


def ritz_pair(rb: torch.Tensor, vb: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r, v, lambda)``: the top Ritz pair of the block product ``R = W V`` (``rb = R^T``,
    ``vb = V^T``, rows): ``y = top_ritz(rb)``, ``r = R y``, ``v = V y``, ``lambda = |r|^2``."""
    y = top_ritz(rb)
    r = torch.mv(rb.t(), y)
    return r, torch.mv(vb.t(), y), torch.dot(r, r)


class RankOnePenalty(torch.autograd.Function):
    """``(R(lambda, total), next block)`` of ``W`` (module docstring); the gradient of the
    value is ``c r v^T + d W``, the block is not differentiable."""

    @staticmethod
    def forward(ctx, weight, vb, value: Callable, coefs: Callable):
        w2 = weight.detach().reshape(weight.shape[0], -1)
        n = min(w2.shape)
        rb = torch.mm(vb, w2.t())  # R^T: the thin side as rows
        r, v, lam = ritz_pair(rb, vb)
        flat = w2.reshape(-1)
        total = torch.dot(flat, flat)
        nxt = orth2(torch.mm(rb, w2))
        ctx.save_for_backward(weight, r, v, lam, total)
        ctx.coefs, ctx.n = coefs, n
        ctx.mark_non_differentiable(nxt)
        return value(lam, total, n), nxt

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _):
        weight, r, v, lam, total = ctx.saved_tensors
        c, d = ctx.coefs(lam, total, ctx.n)
        w2 = weight.reshape(weight.shape[0], -1)
        if d is None:
            out = torch.outer(r * (c * g), v)
        else:
            out = w2 * (g * d)
            out.addr_(r * (c * g), v)
        return out.view(weight.shape), None, None, None


def rank_one_penalty(weight: torch.Tensor, vb: torch.Tensor, value: Callable,
                     coefs: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, next block)`` for the weight ``weight`` (2-D, or flattened to ``m x n``) and
    the block rows ``vb`` (``2 x n``, on ``weight``'s device / dtype); ``value(lambda,
    total, N)`` the penalty, ``coefs(lambda, total, N)`` its closed-form ``(c, d)``
    (:class:`~bayes_spectral.penalties.fused.Rule`). No host sync."""
    n = weight.numel() // weight.shape[0]
    if vb.dim() != 2 or vb.shape[0] != 2 or vb.shape[1] != n:
        raise ValueError(f"rank_one_penalty: the block must be 2 x {n} for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(vb.shape)}")
    return RankOnePenalty.apply(weight, vb, value, coefs)


def rank_one_loss(penalty: RankOneFused, weight: torch.Tensor, name: str | None = None
                  ) -> torch.Tensor:
    """``penalty``'s value at ``weight`` by :func:`rank_one_penalty` on layer ``name``'s
    fused block (created as the hooks' are: seeded, 16 warm block steps), which then
    advances one step; the gradient ``c r v^T + d W`` reaches whatever ``weight`` came from
    (a Pyro sample, ``mu + sigma eps``). ``penalty`` a ``mode="fused"`` penalty
    (:class:`~bayes_spectral.penalties.fused.RankOneFused`)."""
    st = penalty._fused_layer(name, weight)
    value, st.v = rank_one_penalty(weight, st.v, penalty._rank_one_value,
                                   penalty._rank_one_coefs)
    return value
