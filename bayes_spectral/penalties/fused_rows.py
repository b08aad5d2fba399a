"""The fused rank-one step of many unhooked rows in one batched pass (issue 20).

On small nets no weight reaches ``fuse_min``: every row's fused step (Frechet prior, stable
rank, spectral norm ``block=2``: ~58 small ops each; the spectral norm's one vector: ~11)
ran in ``accumulate_grad`` one row at a time, dispatch-bound. Here the rows of one step are
stacked: the weights zero-padded to one ``(L, M, N)`` stack (``"pad"``) or grouped by exact
shape (``"shape"``), the blocks as ``(L, 2, N)`` (the one vectors as ``(L, 1, N)``), and
:func:`~bayes_spectral.penalties.rank_one.block_step_rows` (:func:`vector_step_rows`) runs
the step for all of them. Zero padding keeps the nonzero singular values, and the padded
coordinates of the blocks, products and gradients stay exactly zero, so each row's result
equals its own step to rounding.

The stacks live in a :class:`Bucket` cached on the penalty: the weights are copied into a
persistent padded buffer with one ``_foreach_copy_``, the gradients added back with one
``_foreach_add_`` from a persistent buffer, and each layer's block ``v`` is a view of the
bucket's block buffer (its state stays per layer: ``state_dict`` clones the views). A layer
whose ``v`` is no longer the bucket's view (restored, moved, stepped elsewhere) makes the
bucket rebuild from the layers' states. No host sync.
"""

from __future__ import annotations

import torch

from .rank_one import block_step_rows

__all__ = ["BATCH_MODES", "Bucket", "buckets", "step_rows", "vector_step_rows"]

#: ``Regularizer(batch=...)``: ``True`` = :data:`DEFAULT`, ``"pad"`` one zero-padded stack
#: (per device / dtype, while padding at most doubles the entries), ``"shape"`` one stack
#: per exact shape, ``False`` one row at a time
BATCH_MODES = (True, False, "pad", "shape")
DEFAULT = "pad"
#: padded entries a ``"pad"`` stack may add beyond the rows' own (else grouped by shape)
PAD_SLACK = 65536


class Bucket:
    """Rows stepped together: ``names``, 2-D ``shapes`` ``(m, n)``, ``ns = min(m, n)``, the
    padded weight buffer ``w`` ``(L, M, N)``, the gradient buffer ``delta`` and the block
    buffer ``v`` ``(L, width, N)`` with their per-row views, and a penalty's own per-row
    constants (``consts``: a penalty whose ``R`` depends on ``N`` batches through
    ``_rank_one_rows_consts(ns, like)``, ``_rank_one_rows_coefs(lambda, total, consts)``
    and ``_rank_one_rows_value(lambda, total, consts)``)."""

    def __init__(self, names: tuple, shapes: tuple, like: torch.Tensor,
                 width: int = 2) -> None:
        self.names, self.shapes, self.width = names, shapes, width
        self.ns = [min(s) for s in shapes]
        big_m, big_n = max(s[0] for s in shapes), max(s[1] for s in shapes)
        kw = {"device": like.device, "dtype": like.dtype}
        self.w = torch.zeros(len(names), big_m, big_n, **kw)
        self.delta = torch.zeros_like(self.w)
        self.v = torch.zeros(len(names), width, big_n, **kw)
        self.wviews = [self.w[i, :m, :n] for i, (m, n) in enumerate(shapes)]
        self.dviews = [self.delta[i, :m, :n] for i, (m, n) in enumerate(shapes)]
        # width 1 (the spectral norm's one vector): each layer's v is 1-D
        self.vviews = [self.v[i, :, :n] if width == 2 else self.v[i, 0, :n]
                       for i, (_, n) in enumerate(shapes)]
        self.consts = None  # a penalty's per-row constants (_rank_one_rows_consts), lazily

    def load_blocks(self, states: list) -> None:
        """Copy the layers' blocks in (a rebuild) and make each layer's ``v`` its view."""
        self.v.zero_()
        torch._foreach_copy_(self.vviews, [st.v for st in states])
        for st, view in zip(states, self.vviews, strict=True):
            st.v = view


def buckets(items: list, mode: str) -> list[list]:
    """Group ``(name, w2d, ...)`` items: per device / dtype, then one padded stack
    (``"pad"``, while the padding adds at most the rows' entries + :data:`PAD_SLACK`) or one
    stack per exact shape."""
    groups: dict = {}
    for it in items:
        groups.setdefault((it[1].device, it[1].dtype), []).append(it)
    out = []
    for group in groups.values():
        own = sum(it[1].numel() for it in group)
        padded = len(group) * max(it[1].shape[0] for it in group) \
            * max(it[1].shape[1] for it in group)
        if mode == "pad" and padded <= 2 * own + PAD_SLACK:
            out.append(group)
            continue
        by_shape: dict = {}
        for it in group:
            by_shape.setdefault(tuple(it[1].shape), []).append(it)
        out += list(by_shape.values())
    return out


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    """Each row of an ``(L, 1, N)`` stack over ``max(|g_l|, 1e-30)`` (``LayerState.set_v``)."""
    return g / torch.linalg.vector_norm(g, dim=2, keepdim=True).clamp_min_(1e-30)


def vector_step_rows(w: torch.Tensor, v: torch.Tensor, c: float, steps: int = 0,
                     out: torch.Tensor | None = None) -> tuple:
    """The spectral norm's fused one-vector step (``SpectralNorm._vector_grad``) of ``L``
    layers at once: ``w`` ``(L, M, N)`` (zero-padded), ``v`` ``(L, 1, N)``. ``steps`` power
    steps ``v <- W^T W v / |W^T W v|``, then ``r = W v``, ``delta = c r v^T``, ``R = c/2
    |r|^2`` and ``next = W^T r / |W^T r|``. Returns ``(delta, R (L,), next)``; padding stays
    zero. No host sync."""
    wt = w.transpose(1, 2)
    for _ in range(steps):
        v = _unit_rows(torch.bmm(torch.bmm(v, wt), w))
    r = torch.bmm(v, wt)  # (L, 1, M)
    delta = torch.bmm(r.transpose(1, 2).mul(c), v, out=out)
    return delta, r.square().sum((1, 2)).mul_(0.5 * c), _unit_rows(torch.bmm(r, w))


def _bucket(pen, bucket_items: list) -> Bucket:
    """The cached :class:`Bucket` of these rows (built on first use, the layers' states
    loaded in whenever one of them is no longer the bucket's view)."""
    states = [it[3] for it in bucket_items]
    names = tuple(it[0] for it in bucket_items)
    shapes = tuple(tuple(it[1].shape) for it in bucket_items)
    like = bucket_items[0][1]
    width = 1 if states[0].v.dim() == 1 else 2
    key = (names, shapes, like.device, like.dtype, width)
    cache = pen.__dict__.setdefault("_rows_cache", {})
    b = cache.get(key)
    if b is None:
        if len(cache) > 8:
            cache.clear()
        b = cache[key] = Bucket(names, shapes, like, width)
    if any(st.v is not view for st, view in zip(states, b.vviews, strict=True)):
        b.load_blocks(states)
    return b


def _add_grads(bucket_items: list, b: Bucket) -> None:
    """``g += delta`` for every row given a gradient (one ``_foreach_add_``)."""
    pairs = [(it[2], d) for it, d in zip(bucket_items, b.dviews, strict=True)
             if it[2] is not None]
    if pairs:
        torch._foreach_add_([g for g, _ in pairs], [d for _, d in pairs])


def step_rows(pen, bucket_items: list, scale: float) -> tuple:
    """One bucket's step (``pen`` a :class:`~bayes_spectral.penalties.fused.RankOneFused`,
    ``bucket_items`` ``(name, w2d, g2d-or-None, layer state)``): returns ``(values (L,),
    the per-row gradient views)``; the gradients are added to the given ``g2d`` in place."""
    b = _bucket(pen, bucket_items)
    torch._foreach_copy_(b.wviews, [it[1] for it in bucket_items])
    if b.width == 1:  # the spectral norm's one vector
        _, value, nxt = vector_step_rows(b.w, b.v, scale * pen.coef, pen._catch_up(),
                                         out=b.delta)
        b.v.copy_(nxt)
        _add_grads(bucket_items, b)
        return value, b.dviews
    rule, n = pen._rule, b.ns[0]  # n: only where R does not depend on N (_rank_one_uses_n)
    consts = getattr(pen, "_rank_one_rows_consts", None)
    if consts is not None:  # the penalty's own per-row form: (c, d) and R for all N at once
        if b.consts is None:
            b.consts = consts(b.ns, b.w)
        coefs = lambda la, to: pen._rank_one_rows_coefs(la, to, b.consts)  # noqa: E731
    else:
        coefs = lambda la, to: rule.coefs(la, to, n)  # noqa: E731
    delta, lam, total, nxt = block_step_rows(b.w, b.v, coefs, scale, rule.total,
                                             pen._catch_up(), out=b.delta)
    b.v.copy_(nxt)
    _add_grads(bucket_items, b)
    value = pen._rank_one_rows_value(lam, total, b.consts) if consts is not None else \
        pen._rank_one_value(lam, total, n)
    return (value if scale == 1.0 else value * scale), b.dviews
