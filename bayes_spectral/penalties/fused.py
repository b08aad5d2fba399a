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
micro-batches it counts ``k`` times per optimiser step (use ``coef / k``). The extra row is
~``1/N`` of each GEMM's work, but a kernel that blocks rows by a tile (a GPU's 64 or 128)
pays a whole tile row when ``N`` is a multiple of it; on the 2-core CPU the ``N+1``-row
GEMMs and copies alone cost 1.07-1.14x a plain 784-512-512-10 step at batch 128
(``benchmarks/bench_penalties.py``, floor row).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["STRATEGIES", "FusedHooks", "LayerState", "fusable", "hook_linear",
           "hook_linear_adjacent"]

#: modules carrying fused hooks (refuses a second set: the extra rows would collide)
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerState:
    """One layer's iteration state: ``v`` (unit right vector, the checkpointed part) and the
    record of the last injecting forward: ``r = W v_used`` and ``injected`` (the hooks added
    this step's gradient; cleared by the penalty when it reads the value)."""

    __slots__ = ("v", "v_used", "r", "injected", "_pending", "_active", "_lead", "_xgrad",
                 "_n", "_armed")

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v
        self.v_used: torch.Tensor | None = None
        self.r: torch.Tensor | None = None
        self.injected = False
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
                coef: float) -> list:
    """Register the pre-hook (pad) and hook (inject, strip) on ``module``; ``state_of()``
    returns the layer's current :class:`LayerState` (looked up per call, so a restored
    state is used). Returns the two hook handles."""
    m = module.out_features

    current: list[LayerState] = []  # the state found by the pre-hook, for the hook

    def pre(mod, args):
        if mod is not module:  # a deep copy of the model carries the hooks: it runs plain
            return None
        st = state_of()
        current[:] = [st]
        st._active = False
        if not (mod.training and torch.is_grad_enabled() and args) or st.pending() \
                or not mod.weight.requires_grad:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != mod.in_features:
            return None  # the Linear raises its own error
        st._lead, st._xgrad, st._active = tuple(x.shape[:-1]), x.requires_grad, True
        st.v_used = st.v
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
        out = _Inject.apply(out, mod.bias, w, st, coef)
        y = out[:st._n]
        return y if len(st._lead) == 1 else y.reshape(*st._lead, m)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def hook_linear_adjacent(module: nn.Linear, state_of: Callable[[], LayerState],
                         coef: float) -> list:
    """The same step beside the layer's GEMMs instead of inside them (``fuse="adjacent"``):
    a forward hook computes ``r = W v`` right after the forward GEMM streamed ``W``; a
    post-accumulate-grad hook on the weight adds ``coef r v^T`` to the gradient the
    backward just wrote and sets ``v <- W^T r / |W^T r|``. No change to the GEMMs, the
    output or the other gradients; works with activation checkpointing. Returns the two
    hook handles."""

    def post(mod, args, out):
        if mod is not module or not (mod.training and torch.is_grad_enabled()) \
                or not mod.weight.requires_grad:
            return None
        st = state_of()
        st.v_used = st.v
        st.r = torch.mv(mod.weight.detach(), st.v)  # recomputed per call: same W, same v
        st.injected = st._armed = True
        return None

    def acc(param):
        st = state_of()
        if param is not module.weight or not st._armed or param.grad is None:
            return
        st._armed = False
        g = param.grad
        g.view(g.shape[0], -1).addr_(st.r.to(g.dtype), st.v_used.to(g.dtype), alpha=coef)
        st.set_v(torch.mv(param.detach().t(), st.r.to(param.dtype)))

    return [module.register_forward_hook(post),
            module.weight.register_post_accumulate_grad_hook(acc)]


#: ``fuse=`` strategies: how the step rides along with a Linear's own forward/backward
STRATEGIES = {"adjacent": hook_linear_adjacent, "gemm": hook_linear}


class FusedHooks:
    """The hooks of one :class:`~bayes_spectral.penalties.Regularizer` (``names``: the fused
    layers); :meth:`remove` takes them all off (idempotent)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._handles: list = []
        self._modules: list[weakref.ref] = []
        self._on_remove: list[Callable[[], None]] = []

    def add(self, name: str, module: nn.Linear, state_of: Callable[[], LayerState],
            coef: float, fuse: str = "adjacent") -> None:
        """Hook ``module`` with strategy ``fuse`` (:data:`STRATEGIES`; ValueError if it
        already carries fused hooks)."""
        if module in _HOOKED:
            raise ValueError(f"layer {name!r} already carries fused spectral-norm hooks of "
                             "another Regularizer: call its remove_hooks() first (or use "
                             "'with Regularizer(...)')")
        self._handles += STRATEGIES[fuse](module, state_of, coef)
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
