"""Spectral-norm power iteration riding along with ``nn.Linear``'s own forward/backward.

Two strategies (``SpectralNorm(mode="fused", fuse=...)``), the same step and state:

``fuse="adjacent"`` (:func:`hook_linear_adjacent`): a forward hook computes ``r = W v``
right after the forward GEMM has streamed ``W``; a post-accumulate-grad hook on the weight
adds ``coef r v^T`` to the gradient the backward has just written and sets ``v <- W^T r /
|W^T r|``. Two matrix-vector products and a rank-1 update while their operands are fresh
in cache, nothing changed in the GEMMs.

``fuse="gemm"`` (:func:`hook_linear`), for a linear layer ``Y = X W^T + b`` (``X``:
``N x n`` after flattening leading dims) and the layer's unit right vector ``v``:

* forward: the input gets one extra row, ``[X; v^T]``, so the layer's forward GEMM also
  computes ``r = W v`` (its last output row minus ``b``), which is stripped off again:
  ``sigma = |r|``, ``u = r / sigma``;
* backward: the gradient of that extra output row is set to ``coef * r^T = c u^T``
  (``c = coef * sigma``, the derivative of ``coef/2 sigma^2``), so autograd's own Linear
  backward computes ``dW = G^T X + c u v^T`` (the penalty gradient, inside the weight-
  gradient GEMM) and the extra input row's gradient ``c (W^T u)^T``, caught on its way
  back (and kept out of the real input gradient): the next ``v = W^T u / |W^T u|``, one
  power-iteration step per training step (Miyato et al.). The extra row's term of the
  bias gradient is taken back out. When ``X`` needs no gradient (a first layer) the
  backward GEMM of ``X`` is not run, and ``W^T r`` is one matrix-vector product instead.

Hooks act only while the module is training with grad enabled and the weight requires a
gradient, once per forward/backward (``"gemm"``: a second call of the same layer before the
backward of the first, weight tying, runs plain; ``"adjacent"``: the hook on the weight
runs once per backward); no host sync (``c u = coef * r``). ``"gemm"`` is not for
activation checkpointing (the recomputed forward would run plain).
Every backward adds the penalty gradient: with gradient accumulation over ``k``
micro-batches it counts ``k`` times per optimiser step (use ``coef / k``). Lazily
(``Regularizer(..., every=k)``, :class:`Cadence`) only the due steps' backward does, ``k``
times. The extra row is ~``1/N`` of each GEMM's work, but a kernel that blocks rows by a
tile (a GPU's 64 or 128) pays a whole tile row when ``N`` is a multiple of it; on the
2-core CPU the ``N+1``-row GEMMs and copies alone cost 1.07-1.14x a plain 784-512-512-10
step at batch 128 (``benchmarks/bench_penalties.py``, floor row).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from .fused_rows import buckets, step_rows
from .rank_one import orth2, ritz_pair, top_ritz

__all__ = ["BLOCK", "CATCH_UP", "STRATEGIES", "Cadence", "FusedHooks", "LayerState",
           "RankOneFused", "Rule", "advance", "fusable", "hook_linear", "hook_linear_adjacent",
           "orth2", "top_ritz"]

#: modules carrying fused hooks (refuses a second set: the extra rows would collide)
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: extra power / block steps a due step of ``every=k > 1`` runs first (at most ``k - 1``):
#: the iteration is skipped on the off steps (measured along the digits trajectory, 2-column
#: block, every=8: stable rank within 7.4e-4 relative with 4, 1.4e-3 with 3, 0.21 with none)
CATCH_UP = 4


class Cadence:
    """Which training steps a fused penalty acts on (``Regularizer(..., every=k)``; shared by
    the Regularizer, which counts its calls in ``calls``, and the hooks). The step whose
    forward runs before call ``calls`` is due when ``calls % every == 0`` (Python ints: no
    host sync): its backward adds ``every`` times the penalty gradient. ``off="skip"``
    (default): the off steps' hooks do nothing, and a due step first runs ``catch_up`` extra
    power steps at the current weights (:data:`CATCH_UP`, at most ``every - 1``);
    ``off="iterate"``: every step advances the iteration by one step (two thin products) and
    only the gradient is skipped off step (no catch-up; ``fuse="adjacent"`` hooks only; kept
    for measurement: it cost more, see the Regularizer's docstring)."""

    __slots__ = ("every", "calls", "off", "catch_up")

    def __init__(self, every: int = 1, off: str = "skip") -> None:
        if off not in ("skip", "iterate"):
            raise ValueError(f"Cadence: off must be 'skip' or 'iterate', got {off!r}")
        self.every, self.calls, self.off = int(every), 0, off
        self.catch_up = min(self.every - 1, CATCH_UP)

    def due(self) -> bool:
        """Whether the current step (before call ``calls``) adds the gradient."""
        return self.calls % self.every == 0

    def hook_catch_up(self) -> int:
        """Extra steps the hooks run on a due step (none if they iterate every step)."""
        return self.catch_up if self.off == "skip" else 0


def advance(w2: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` power steps on ``W^T W`` (``w2`` the ``m x n`` matrix): ``v <- W^T W v /
    |W^T W v|`` for a vector, ``V <- orth2(V W^T W)`` for a ``2 x n`` block; no host sync."""
    for _ in range(steps):
        if v.dim() == 1:
            g = torch.mv(w2.t(), torch.mv(w2, v))
            v = g / torch.linalg.vector_norm(g).clamp_min_(1e-30)
        else:
            v = orth2(torch.mm(torch.mm(v, w2.t()), w2))
    return v


def _cadence(cadence: Cadence | None) -> Cadence:
    return Cadence() if cadence is None else cadence


class LayerState:
    """One layer's iteration state: ``v`` (unit right vector, the checkpointed part) and the
    record of the last injecting forward: ``r = W v_used``, ``injected`` (the hooks added
    this step's gradient; cleared by the penalty when it reads the value) and ``gain`` (the
    multiple of the gradient they added: ``every`` on a due step, 0 on an iterate-only
    off step)."""

    __slots__ = ("v", "v_used", "r", "total", "lam", "injected", "gain", "_pending", "_active",
                 "_lead", "_xgrad", "_n", "_armed")

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v
        self.v_used: torch.Tensor | None = None
        self.r: torch.Tensor | None = None
        self.total: torch.Tensor | None = None  # ||W||_F^2 of the step (a Rule's penalties)
        self.lam: torch.Tensor | None = None  # |r|^2 (set by Rule.add)
        self.injected = False
        self.gain = 1
        self._pending: weakref.ref | None = None
        self._active = False
        self._lead: tuple[int, ...] = ()
        self._xgrad = False
        self._n = 0
        self._armed = False

    def pending(self) -> bool:
        """An injected forward whose graph is alive and not yet back-propagated."""
        return self._pending is not None and self._pending() is not None

    def set_v(self, g: torch.Tensor) -> None:
        """``v = g / max(|g|, 1e-30)`` (in ``v``'s dtype; no host sync; three small ops:
        the step is dispatch-bound on small layers)."""
        if g.dtype != self.v.dtype:
            g = g.to(self.v.dtype)
        self.v = g / torch.linalg.vector_norm(g).clamp_min_(1e-30)


class _Token:
    """Lives on the injecting node's context: dead once its graph is freed."""

    __slots__ = ("__weakref__",)


def padded(x2d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[X; v^T]`` (``N + 1`` rows; rounding the rows up to a multiple of 8 with zero
    rows, for the GEMMs' row blocking, measured slower on the CPU)."""
    return torch.cat([x2d, v.unsqueeze(0)])


class _Pad(torch.autograd.Function):
    """``[X; v^T]``; backward: the real rows' gradient, row ``N``'s ``coef W^T r`` sets the
    next ``v``."""

    @staticmethod
    def forward(ctx, x2d, v, state):
        ctx.state, ctx.n = state, x2d.shape[0]
        return padded(x2d, v)

    @staticmethod
    def backward(ctx, grad):
        n = ctx.n
        ctx.state.set_v(grad[n])
        return grad[:n], None, None


class _Inject(torch.autograd.Function):
    """Identity on the layer output (``N+1`` rows); backward: the last row's gradient set to
    ``coef * r`` and ``-coef * r`` for the bias (its extra term taken back out)."""

    @staticmethod
    def forward(ctx, out, bias, weight, state, coef):
        n = state._n
        ctx.n = n
        last, dt = out[n], state.v.dtype
        if last.dtype != dt:
            last = last.to(dt)
        if bias is None:
            r = last.clone()
        else:
            r = last - (bias if bias.dtype == dt else bias.to(dt))
        state.r, state.injected = r, True
        ctx.state, ctx.row, ctx.weight = state, r * coef, weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        token = _Token()
        ctx.token, state._pending = token, weakref.ref(token)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = ctx.n
        row = ctx.row
        if 0 in grad.stride() or not grad.is_contiguous():  # an expanded / foreign layout
            grad = grad.contiguous().clone()
        grad[n] = row.to(grad.dtype)  # the extra row's gradient is always the zeros of the strip
        ctx.state._pending = None
        if ctx.weight is not None:  # X needs no gradient: no backward GEMM to ride in
            ctx.state.set_v(torch.mv(ctx.weight.t(), row.to(ctx.weight.dtype)))
        gb = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            gb = -row.to(ctx.bias_dtype)
        return grad, gb, None, None, None


def fusable(module: nn.Module | None, attr: str) -> bool:
    """Whether a row's weight can ride in its module's GEMMs: the ``weight`` of a plain
    ``nn.Linear`` (its own ``forward``, the weight a parameter, not parametrized)."""
    return (isinstance(module, nn.Linear) and attr == "weight"
            and type(module).forward is nn.Linear.forward
            and isinstance(module._parameters.get("weight"), nn.Parameter))


def hook_linear(module: nn.Linear, state_of: Callable[[], LayerState],
                coef: float, cadence: Cadence | None = None) -> list:
    """Register the pre-hook (pad) and hook (inject, strip) on ``module``; ``state_of()``
    returns the layer's current :class:`LayerState` (looked up per call, so a restored
    state is used). ``cadence``: off steps run plain, a due step catches up and adds
    ``every`` times the gradient. Returns the two hook handles."""
    m = module.out_features
    cadence = _cadence(cadence)

    current: list[LayerState] = []  # the state found by the pre-hook, for the hook

    def pre(mod, args):
        if mod is not module:  # a deep copy of the model carries the hooks: it runs plain
            return None
        st = state_of()
        current[:] = [st]
        st._active = False
        if not (mod.training and torch.is_grad_enabled() and args) or st.pending() \
                or not mod.weight.requires_grad or not cadence.due():
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != mod.in_features:
            return None  # the Linear raises its own error
        st._lead, st._xgrad, st._active = tuple(x.shape[:-1]), x.requires_grad, True
        if cadence.catch_up:
            st.v = advance(mod.weight.detach(), st.v, cadence.catch_up)
        st.v_used, st.gain = st.v, cadence.every
        x2 = x.reshape(-1, x.shape[-1])
        st._n = x2.shape[0]
        v = st.v if st.v.dtype == x.dtype else st.v.to(x.dtype)
        pad = _Pad.apply(x2, v, st) if x.requires_grad else padded(x2, v)
        return (pad, *args[1:])

    def post(mod, args, out):
        if mod is not module or not current or not current[0]._active:
            return None
        st = current[0]
        st._active = False
        w = None if st._xgrad else mod.weight.detach()
        out = _Inject.apply(out, mod.bias, w, st, coef * st.gain)
        y = out[:st._n]
        return y if len(st._lead) == 1 else y.reshape(*st._lead, m)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def hook_linear_adjacent(module: nn.Linear, state_of: Callable[[], LayerState],
                         coef: float | Rule, cadence: Cadence | None = None) -> list:
    """The same step beside the layer's GEMMs instead of inside them (``fuse="adjacent"``):
    a forward hook computes ``r = W v`` right after the forward GEMM streamed ``W``; a
    post-accumulate-grad hook on the weight adds ``coef r v^T`` to the gradient the
    backward just wrote and sets ``v <- W^T r / |W^T r|``. No change to the GEMMs, the
    output or the other gradients; works with activation checkpointing. ``coef`` a
    :class:`Rule`: the forward also records ``||W||_F^2`` (if the rule needs it) and the
    backward adds the rule's ``c r v^T + d W`` instead. ``cadence``
    (:class:`Cadence`): a due step adds ``every`` times the gradient (after its catch-up
    steps), an off step does nothing (``"skip"``) or only the iteration (``"iterate"``).
    Returns the two hook handles."""
    rule = coef if isinstance(coef, Rule) else None
    n_evals = min(module.out_features, module.in_features)
    cadence = _cadence(cadence)

    def post(mod, args, out):
        if mod is not module or not (mod.training and torch.is_grad_enabled()) \
                or not mod.weight.requires_grad:
            return None
        due = cadence.due()
        if not due and cadence.off == "skip":
            return None
        st = state_of()
        w = mod.weight.detach()
        steps = (cadence.hook_catch_up() if due else 0) + (rule.extra if rule else 0)
        if steps:
            st.v = advance(w.reshape(w.shape[0], -1), st.v, steps)
        st.v_used, st.gain = st.v, cadence.every if due else 0
        # recomputed per call: same W, same v (a Rule's layers: R^T = V^T W^T, the block
        # stored as 2 x n rows: the thin side as rows is ~10x faster than as columns on CPU)
        st.r = torch.mv(w, st.v) if st.v.dim() == 1 else torch.mm(st.v, w.t())
        if due and rule is not None and rule.total:  # while W is in cache
            flat = w.reshape(-1)
            st.total = torch.dot(flat, flat)
        st.injected, st._armed = due, True
        return None

    def acc(param):
        st = state_of()
        if param is not module.weight or not st._armed or param.grad is None:
            return
        st._armed = False
        g, w = param.grad, param.detach()
        if not st.gain:  # an off step of off="iterate": the iteration only
            if rule is not None:
                st.v = orth2(torch.mm(st.r.to(w.dtype), w.reshape(w.shape[0], -1)))
            else:
                st.set_v(torch.mv(w.reshape(w.shape[0], -1).t(), st.r.to(w.dtype)))
            return
        if rule is not None:
            rule.add(st, g.view(g.shape[0], -1), w, n_evals, scale=st.gain)
            return
        g.view(g.shape[0], -1).addr_(st.r.to(g.dtype), st.v_used.to(g.dtype),
                                     alpha=coef * st.gain)
        st.set_v(torch.mv(w.t(), st.r.to(param.dtype)))

    return [module.register_forward_hook(post),
            module.weight.register_post_accumulate_grad_hook(acc)]


#: ``fuse=`` strategies: how the step rides along with a Linear's own forward/backward
STRATEGIES = {"adjacent": hook_linear_adjacent, "gemm": hook_linear}


def hook_rows(rows: dict, fuse_min: int, state_of: Callable[[str, torch.Tensor], LayerState],
              coef, fuse: str, records: dict[str, LayerState],
              cadence: Cadence | None = None) -> FusedHooks:
    """Hook every row of ``rows`` that is a plain ``nn.Linear`` weight (:func:`fusable`) of
    ``>= fuse_min`` entries (``state_of(name, weight)``, ``coef`` a float or a :class:`Rule`,
    ``fuse`` ``"adjacent"`` or ``"gemm"``, ``cadence`` the due steps); all or none (a refused
    layer unhooks the others). On removal the layers' ``records`` no longer count as
    injected."""
    hooks = FusedHooks()
    try:
        for name, row in rows.items():
            if row.is_leaf() and fusable(row.module, row.attr) \
                    and row.module.weight.numel() >= fuse_min:
                mod = row.module
                hooks.add(name, mod, lambda n=name, m=mod: state_of(n, m.weight), coef, fuse,
                          cadence)
    except ValueError:
        hooks.remove()
        raise
    names = list(hooks.names)

    def forget() -> None:  # an unhooked layer's record no longer counts
        for n in names:
            if n in records:
                records[n].injected = False
    hooks.on_remove(forget)
    return hooks


class FusedHooks:
    """The hooks of one :class:`~bayes_spectral.penalties.Regularizer` (``names``: the fused
    layers); :meth:`remove` takes them all off (idempotent)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._handles: list = []
        self._modules: list[weakref.ref] = []
        self._on_remove: list[Callable[[], None]] = []

    def add(self, name: str, module: nn.Linear, state_of: Callable[[], LayerState],
            coef: float, fuse: str = "adjacent", cadence: Cadence | None = None) -> None:
        """Hook ``module`` with strategy ``fuse`` (:data:`STRATEGIES`; ValueError if it
        already carries fused hooks) on ``cadence``'s due steps."""
        if module in _HOOKED:
            raise ValueError(f"layer {name!r} already carries the fused penalty hooks of "
                             "another Regularizer: call its remove_hooks() first (or use "
                             "'with Regularizer(...)')")
        self._handles += STRATEGIES[fuse](module, state_of, coef, cadence)
        _HOOKED[module] = self
        self._modules.append(weakref.ref(module))
        self.names.append(name)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._on_remove.append(fn)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for ref in self._modules:
            mod = ref()
            if mod is not None and _HOOKED.get(mod) is self:
                del _HOOKED[mod]
        for fn in self._on_remove:
            fn()
        self._handles, self._modules, self._on_remove, self.names = [], [], [], []


#: columns of a Rule's block (top Ritz pair in closed form: no eigh, no host sync)
BLOCK = 2
#: block-iteration steps when a Rule's layer state is created (as the fast mode's first call)
WARM_STEPS = 16


def _ritz_lam(rb: torch.Tensor) -> torch.Tensor:
    """``|R y|^2``, the top Ritz value of the block product ``R = W V``."""
    r = torch.mv(rb.t(), top_ritz(rb))
    return torch.dot(r, r)


class Rule:
    """How a penalty ``R(lambda, total)`` of ``lambda`` (``sigma_max^2``) and ``total =
    ||W||_F^2`` rides on the hooks. Per layer an orthonormal ``n x 2`` block ``V`` is kept
    (as its ``2 x n`` rows ``V^T``); the forward records ``R = W V`` (as ``V^T W^T``).
    With ``y`` the top Ritz vector of ``R^T R`` (:func:`top_ritz`), ``v = V y``,
    ``r = R y = W v`` and ``lambda = |r|^2`` (a Rayleigh-Ritz value, ``<= lambda_max``):
    ``dR/dW = c r v^T + d W`` (``dlambda/dW = 2 r v^T`` at the held ``v``, so
    ``c = 2 dR/dlambda``, ``d = 2 dR/dtotal``), ``(c, d) = coefs(lambda, total, N)``,
    ``N = min(m, n)``: ``c`` a 0-d tensor (no host sync), ``d`` a tensor, a Python float or
    ``None``; then ``V <- orth(W^T R)``, one block power step. Two columns resolve a
    crossing of the top two singular values, where one vector trails for many steps.
    ``total``: whether the forward hook records ``||W||_F^2``; ``extra``: block power steps
    at the current weights before ``R`` (``V <- orth(W^T W V)``, two thin products each)."""

    def __init__(self, coefs: Callable, total: bool = True, extra: int = 0) -> None:
        self.coefs = coefs
        self.total = bool(total)
        self.extra = int(extra)

    def add(self, st: LayerState, g2d: torch.Tensor, w: torch.Tensor, n: int,
            scale: float = 1.0, advance: bool = True) -> None:
        """``g2d += scale (c r v^T + d W)`` at ``st``'s record (``R = st.r``, ``V =
        st.v_used``, ``total``), then (``advance``) ``V <- orth(W^T R)``; ``w`` the
        detached weight. Sets ``st.lam = |r|^2``."""
        rb, vb = st.r, st.v_used  # R^T, V^T: 2 x m, 2 x n
        r, v, st.lam = ritz_pair(rb, vb)
        c, d = self.coefs(st.lam, st.total, n)
        if scale != 1.0:
            c = c * scale
            d = None if d is None else d * scale
        g2d.addr_((r * c).to(g2d.dtype), v.to(g2d.dtype))
        w2 = w.reshape(g2d.shape)
        if isinstance(d, torch.Tensor):
            g2d.addcmul_(w2, d.to(g2d.dtype))
        elif d is not None:
            g2d.add_(w2, alpha=d)
        if advance:
            st.v = orth2(torch.mm(rb.to(w2.dtype), w2))


class RankOneFused:
    """``mode="fused"`` for a penalty of ``lambda_max = sigma_max^2`` and ``||W||_F^2``
    (mixin; the Frechet prior, stable rank). The subclass gives ``_rank_one_value(lambda,
    total, N)`` (differentiable tensor function) and ``_rank_one_coefs`` (its closed-form
    ``(c, d)``, :class:`Rule`), and calls :meth:`_init_fused`. Per layer an orthonormal
    ``n x 2`` block ``V`` is kept (its ``2 x n`` rows; seeded, :data:`WARM_STEPS` block
    power steps when created); each step ``R = W V``, the top Ritz pair ``v = V y``, ``r = R y``
    (``lambda = |r|^2``), the gradient ``c r v^T + d W`` and ``V <- orth(W^T R)``: in hooks
    beside a plain ``nn.Linear``'s GEMMs (:func:`hook_linear_adjacent`, layers of
    ``>= fuse_min`` entries), else in ``accumulate_grad`` by two thin products (the
    identical step). No host sync."""

    def _init_fused(self, fuse_min: int, label: str, extra: int = 0,
                    total: bool = True) -> None:
        """Check ``fuse_min``, set the empty layer states and the :class:`Rule` (``extra``
        block steps, ``total``: whether the penalty has a ``||W||_F^2`` term)."""
        if isinstance(fuse_min, bool) or not isinstance(fuse_min, int) or fuse_min < 0:
            raise ValueError(f"{label}: fuse_min must be an integer >= 0 (the fewest weight "
                             f"entries a fused layer has), got {fuse_min!r}")
        self.fuse_min = fuse_min
        self._fused: dict[str, LayerState] = {}
        self._rule = Rule(self._rank_one_coefs, total=total, extra=extra)
        self._cadence: Cadence | None = None  # the Regularizer's (every=k), set by attach

    def _catch_up(self) -> int:
        """Block steps before an unhooked row's value: the rule's ``extra`` plus, with
        ``every=k``, the catch-up (that row's iteration does not run on the off steps)."""
        return self._rule.extra + (0 if self._cadence is None else self._cadence.catch_up)

    def _fused_layer(self, name: str | None, weight: torch.Tensor) -> LayerState:
        """Layer ``name``'s state: an orthonormal ``(numel / out) x 2`` block, seeded, then
        :data:`WARM_STEPS` block power steps on ``weight`` (no host sync), on the weight's
        device / dtype."""
        key = self._key(weight, name)
        cols = weight.numel() // weight.shape[0]
        st = self._fused.get(key)
        if st is None or st.v.shape[-1] != cols:
            g = torch.randn(BLOCK, cols, generator=torch.Generator().manual_seed(self.seed))
            w2 = weight.detach().reshape(weight.shape[0], cols)
            vb = orth2(g.to(device=weight.device, dtype=weight.dtype))
            for _ in range(WARM_STEPS):
                vb = orth2(torch.mm(torch.mm(vb, w2.t()), w2))
            st = LayerState(vb)
            self._fused[key] = st
        elif st.v.device != weight.device or st.v.dtype != weight.dtype:
            st.v = st.v.to(device=weight.device, dtype=weight.dtype)
        return st

    def attach(self, rows: dict, cadence: Cadence | None = None) -> FusedHooks | None:
        """Fused mode: hook every selected plain ``nn.Linear`` weight of ``>= fuse_min``
        entries (:func:`hook_linear_adjacent` with this penalty's :class:`Rule`, acting on
        ``cadence``'s due steps)."""
        if self.mode != "fused":
            return None
        self._cadence = cadence
        return hook_rows(rows, self.fuse_min, self._fused_layer, self._rule, "adjacent",
                         self._fused, cadence)

    def _fused_grad(self, weight: torch.Tensor, grad: torch.Tensor, name, scale: float):
        """The hooks' value (and ``(scale - gain)`` times their gradient), or the same step
        (after the catch-up steps) by thin products; returns ``scale R``."""
        st = self._fused_layer(name, weight)
        w = weight.detach()
        n = min(w.shape[0], w.numel() // w.shape[0])
        g2d = grad.view(grad.shape[0], -1)
        if st.injected:
            st.injected = False
            if st.lam is None or st._armed:  # the weight hook did not run (no backward)
                st.lam = _ritz_lam(st.r)
            if scale != st.gain:  # the backward added gain (every) times the gradient
                self._rule.add(st, g2d, w, n, scale - st.gain, advance=False)
        else:
            w2 = w.reshape(w.shape[0], -1)
            st.v = advance(w2, st.v, self._catch_up())
            st.v_used, st.r = st.v, torch.mm(st.v, w2.t())
            if self._rule.total:
                flat = w.reshape(-1)
                st.total = torch.dot(flat, flat)
            self._rule.add(st, g2d, w, n, scale)
        value = self._rank_one_value(st.lam, st.total, n)
        return value if scale == 1.0 else scale * value

    #: whether ``R`` depends on ``N = min(m, n)``: then only a penalty with per-row constants
    #: (``_rank_one_rows_consts``, :mod:`~bayes_spectral.penalties.fused_rows`) batches
    _rank_one_uses_n = True

    @property
    def batches_rows(self) -> bool:
        """Whether :meth:`accumulate_grad_rows` can take any row: the fused mode, with an
        ``R`` independent of ``N`` or per-row constants."""
        return self.mode == "fused" and (not self._rank_one_uses_n
                                         or hasattr(self, "_rank_one_rows_consts"))

    def _batchable(self, weight: torch.Tensor) -> bool:
        """Whether :meth:`_fused_grad` is this row's fused step (one matrix)."""
        return self._one_vector(weight)

    #: the fewest rows a batched pass takes (one row: its own step is ~0.1 ms cheaper)
    _batch_min_rows = 2

    def _row_state(self, name, weight: torch.Tensor) -> LayerState:
        """The state a batched row steps: the 2-column block (:meth:`_fused_layer`)."""
        return self._fused_layer(name, weight)

    def accumulate_grad_rows(self, items: list, scale: float = 1.0, mode: str = "pad") -> dict:
        """The fused step of the rows among ``items`` ``(name, weight, grad or None)`` that
        no hook served this step, in batched passes (:mod:`~bayes_spectral.penalties.
        fused_rows`, ``mode`` ``"pad"`` or ``"shape"``): each row's ``grad += scale (c r v^T
        + d W)`` as :meth:`_fused_grad` (to rounding). Returns ``{name: (scale R, the
        gradient's view)}`` for the rows taken (``grad`` None: only returned); the others
        are left to :meth:`accumulate_grad` (as is a bucket of one row). No host sync."""
        if not self.batches_rows:
            return {}
        todo = []
        for name, w, g in items:
            if not self._batchable(w) or (g is not None and (
                    not g.is_contiguous() or g.shape != w.shape)):
                continue
            st = self._row_state(name, w)
            if st.injected:
                continue
            m = w.shape[0]
            todo.append((name, w.detach().reshape(m, -1), None if g is None else g.view(m, -1),
                         st))
        out = {}
        for group in buckets(todo, mode):
            if len(group) < self._batch_min_rows:  # fewer rows: their own steps are cheaper
                continue
            values, dviews = step_rows(self, group, scale)
            for it, val, d in zip(group, values.unbind(0), dviews, strict=True):
                out[it[0]] = (val, d)
        return out

    def _fused_loss_value(self, weight: torch.Tensor, name):
        """Loss-path value: the hooks' (detached: their gradient is in the backward), or
        ``R(|W v|^2, ||W||_F^2)`` with graph through ``W`` (``v = V y``, the top Ritz vector,
        held) after the same step."""
        st = self._fused_layer(name, weight)
        n = min(weight.shape[0], weight.numel() // weight.shape[0])
        if st.injected:
            st.injected = False
            if st.lam is None or st._armed:  # the weight hook did not run (no backward)
                st.lam = _ritz_lam(st.r)
            return self._rank_one_value(st.lam, st.total, n)
        w2 = weight.reshape(weight.shape[0], -1)
        vb = st.v = advance(w2.detach(), st.v, self._catch_up())
        with torch.no_grad():
            rb = torch.mm(vb, w2.detach().t())
            v = torch.mv(vb.t(), top_ritz(rb))
        r = torch.mv(w2, v)
        total = weight.square().sum() if self._rule.total else None
        value = self._rank_one_value(torch.dot(r, r), total, n)
        st.v = orth2(torch.mm(rb, w2.detach()))
        return value

    def _fused_state(self) -> dict[str, dict]:
        """``{layer: {"v": the block's 2 x n rows}}`` (copies)."""
        return {k: {"v": st.v.detach().clone()} for k, st in self._fused.items()}

    @staticmethod
    def _restored_fused(layers: dict, owner: str) -> dict[str, LayerState]:
        """The layers' states from ``{layer: {"v", ...}}`` (entries without ``v`` skipped)."""
        out = {}
        for key, st in layers.items():
            if "v" not in st:
                continue
            v = st["v"]
            if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] != BLOCK \
                    or not v.is_floating_point():
                raise ValueError(f"{owner}: the fused state of layer {key!r} needs a floating "
                                 f"{BLOCK} x n block 'v', got {v!r:.60}")
            out[key] = LayerState(v.detach().clone())
        return out
