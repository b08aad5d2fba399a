"""Spectral norm regularisation (Yoshida & Miyato 2017)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_positive
from ..spectra.spectrum import PowerIteration
from .base import Penalty, layer_states
from .fused import STRATEGIES, Cadence, FusedHooks, LayerState, RankOneFused, advance, hook_rows

__all__ = ["SpectralNorm"]

_MODES = ("inplace", "fused")
_BLOCKS = (1, 2)


class SpectralNorm(RankOneFused, Penalty):
    """``coef/2 * sigma_max(W)^2`` per layer, ``sigma_max`` by persistent power iteration.

    One power-iteration step per call (``n_iter``) with the left vector kept per layer
    (:class:`~bayes_spectral.spectra.spectrum.PowerIteration`), so the estimate converges over
    training at the cost of two matrix-vector products. Conv kernels are reshaped to
    ``out x (in*kh*kw)`` (Yoshida & Miyato). The gradient is ``coef * sigma u v^T``.
    State is keyed by the layer name; :meth:`state_dict` / :meth:`load_state_dict` carry it
    through checkpoints.

    ``mode="fused"`` (used through :class:`~bayes_spectral.penalties.Regularizer`, which
    installs hooks on the selected ``nn.Linear`` layers; :mod:`bayes_spectral.penalties.fused`):
    the iteration and the gradient ride along with each layer's own forward/backward, with
    no host sync. Per layer the right vector ``v`` is kept: the forward computes ``r = W v``
    (``sigma = |r|``, ``u = r/sigma``), the backward adds ``coef * r v^T = coef sigma u v^T``
    to the weight gradient and sets ``v <- W^T u / |W^T u|``. ``fuse="adjacent"`` (default)
    does this with two matrix-vector products and a rank-1 update right after the layer's
    own GEMMs (``W`` and its fresh gradient still in cache; GEMMs, output and other
    gradients untouched); ``fuse="gemm"`` puts ``v`` as one extra input row into the
    layer's GEMMs (no pass over ``W`` of its own; the output is stripped back, bit for bit
    on the CPU; the bias gradient equal to round-off). ``v`` is one step behind: it was
    computed from the weights of the previous step, where the in-place mode's comes from
    this step's (same fixed point, so the same gradient at converged vectors; along 40 SGD
    steps the weights stay within 1e-3 of the in-place run's,
    ``tests/penalties/test_fused_spectral_norm.py``).
    ``Regularizer.accumulate_grad()`` / ``reg()`` then add nothing for those layers and
    return the value ``coef/2 |r|^2`` of the step's forward (call them once per step, or not
    at all). Other rows (conv, recurrent, attention slices, a linear layer not called
    in the step) get the same math in :meth:`accumulate_grad` by two matrix-vector
    products (no host sync either; a non-finite weight is not diagnosed per step), as do
    layers with fewer than ``fuse_min`` weight entries: there the hooks' fixed cost exceeds
    what they save (``benchmarks/bench_penalties.py``). Every backward adds the gradient:
    with gradient accumulation over ``k`` micro-batches use ``coef / k``. ``n_iter`` must
    be 1. ``Regularizer(..., every=k)``: the hooks act on calls ``0, k, 2k, ...`` only (both
    strategies), where ``min(k - 1, 4)`` power steps at the current weights come first and
    the backward adds ``k`` times the gradient; off steps run plain
    (:class:`~bayes_spectral.penalties.fused.Cadence`).

    ``block=2`` (fused mode, ``fuse="adjacent"`` only): a kept orthonormal 2-column block
    ``V`` instead of one vector (:class:`~bayes_spectral.penalties.fused.RankOneFused`, the
    Frechet prior's / stable rank's step): after the forward GEMM ``n_iter - 1`` block steps
    ``V <- orth(W^T W V)`` at the current weights, then ``R = W V``; after the backward the
    top Ritz pair in closed form (``v = V y``, ``r = R y``, ``lambda = |r|^2 <= sigma_max^2``),
    ``grad += coef r v^T``, value ``coef/2 lambda`` and ``V <- orth(W^T R)``; no host sync.
    ``n_iter`` defaults to 2 there. The state is ``{"mode": "fused", "block": 2, "layers":
    {layer: {"v": 2 x n}}}``; a state of the other block width is refused.
    One vector (``block=1``, the default) trails where the top two singular values cross.
    Along the digits Adam trajectory (``tests/penalties/test_fused_spectral_block.py``,
    every due step from step 20; worst relative value error / smallest gradient cosine
    against ``coef/2 ||W||_2^2``):

    ============================  =================  =================
    fused                         every=1            every=8
    ============================  =================  =================
    block=1                       0.11 / 0.011       0.069 / 0.081
    block=2, n_iter=1             2.4e-3 / 0.9931    7.5e-4 / 0.9975
    block=2, n_iter=2             4.3e-4 / 0.9986    4.0e-4 / 0.9987
    block=2, n_iter=3             1.2e-4 / 0.9996    2.1e-4 / 0.9993
    ============================  =================  =================

    Cost, ratio over a plain step (``benchmarks/bench_penalties.py --quick --threads 1 --rows
    spectral --interleave``, 2-core CPU, 3 runs, ``[grad]``; MLP 784-512-512-10 /
    784-1024-1024-10): block=1 1.09-1.12x / 1.02-1.09x, block=2 n_iter=1 1.19-1.20x /
    1.12-1.13x, block=2 n_iter=2 1.27-1.30x / 1.18-1.20x, block=2 every=8 1.07-1.08x /
    1.07x. A 2-row product with ``W`` costs twice a matrix-vector product on this CPU and
    the closed-form Ritz / Gram-Schmidt steps are dispatch-bound, so block=2 meets the
    1e-3 / 0.99 accuracy but not 1.1x a plain step: block=1 stays the default (use
    ``block=2`` where the value must be right, or with ``every=8``).
    """

    label = "spectral norm"

    def __init__(self, coef: float = 1.0, n_iter: int | None = None, seed: int = 0,
                 mode: str = "inplace", fuse_min: int = 65536,
                 fuse: str = "adjacent", block: int = 1) -> None:
        self.coef = check_positive(coef, "coef")
        self.seed = int(seed)
        if mode not in _MODES:
            raise ValueError(f"SpectralNorm: mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.block = self._checked_block(block, mode, fuse)
        self.n_iter = self._checked_n_iter(n_iter)
        if fuse not in STRATEGIES:
            raise ValueError(f"SpectralNorm: fuse must be one of {sorted(STRATEGIES)}, got "
                             f"{fuse!r}")
        self.fuse = fuse
        self._iters: dict[str, PowerIteration] = {}
        # fuse_min, _fused (layer states), _cadence (the Regularizer's, set by attach), _rule
        # (block=2: n_iter - 1 extra block steps, no ||W||_F^2 term)
        self._init_fused(fuse_min, "SpectralNorm", extra=self.n_iter - 1 if self.block == 2
                         else 0, total=False)

    @staticmethod
    def _checked_block(block, mode: str, fuse: str) -> int:
        """``block`` (1 or 2; 2 only for ``mode="fused"`` with ``fuse="adjacent"``)."""
        if isinstance(block, bool) or block not in _BLOCKS:
            raise ValueError(f"SpectralNorm: block must be 1 (one vector) or 2 (a 2-column "
                             f"block, mode='fused'), got {block!r}")
        if block == 2 and mode != "fused":
            raise ValueError(f"SpectralNorm: block=2 is the fused mode's 2-column block, "
                             f"mode={mode!r} keeps one vector (block=1)")
        if block == 2 and fuse != "adjacent":
            raise ValueError(f"SpectralNorm: block=2 rides beside the GEMMs (fuse='adjacent'); "
                             f"fuse={fuse!r} carries one vector as an extra GEMM row")
        return int(block)

    def _checked_n_iter(self, n_iter) -> int:
        """Power steps per call: default 1 (block=2: 2 block steps per training step); the
        fused mode's one vector needs 1, its 2-column block >= 1."""
        if n_iter is None:
            return 2 if self.block == 2 else 1
        n = int(n_iter)
        if self.mode == "fused" and self.block == 1 and n != 1:
            raise ValueError(f"SpectralNorm: mode='fused' runs one power-iteration step per "
                             f"training step, n_iter must be 1, got {n_iter}")
        if self.block == 2 and n < 1:
            raise ValueError(f"SpectralNorm: block=2 needs n_iter >= 1 block steps per "
                             f"training step, got {n_iter}")
        return n

    def _iteration(self, weight: torch.Tensor, name: str | None) -> PowerIteration:
        key = self._key(weight, name)
        it = self._iters.get(key)
        if it is None or it.u.shape[0] != weight.shape[0]:
            gen = torch.Generator().manual_seed(self.seed)
            it = PowerIteration(weight.shape, n_iter=self.n_iter, generator=gen)
            self._iters[key] = it
        if it.u.device != weight.device or it.u.dtype != weight.dtype:
            it.to(device=weight.device, dtype=weight.dtype)
        return it

    def sigma(self, weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Differentiable power-iteration estimate of ``sigma_max`` (advances the state)."""
        return self._iteration(weight, name)(weight)

    def _layer(self, name: str | None, weight: torch.Tensor) -> LayerState:
        """The fused mode's state of layer ``name``: a seeded unit ``v`` (``in`` or
        ``in*k*k`` long) on the weight's device / dtype."""
        key = self._key(weight, name)
        cols = weight.numel() // weight.shape[0]  # no tensor op: this runs per forward
        st = self._fused.get(key)
        if st is None or st.v.shape[0] != cols:
            v = torch.randn(cols, generator=torch.Generator().manual_seed(self.seed))
            st = LayerState((v / v.norm()).to(device=weight.device, dtype=weight.dtype))
            self._fused[key] = st
        elif st.v.device != weight.device or st.v.dtype != weight.dtype:
            st.v = st.v.to(device=weight.device, dtype=weight.dtype)
        return st

    def attach(self, rows: dict, cadence: Cadence | None = None) -> FusedHooks | None:
        """Fused mode: hook every selected row that is a plain ``nn.Linear`` weight
        (:func:`~bayes_spectral.penalties.fused.fusable`), acting on ``cadence``'s due steps;
        ``None`` in place mode."""
        if self.mode != "fused":
            return None
        if self.block == 2:
            return super().attach(rows, cadence)
        self._cadence = cadence
        return hook_rows(rows, self.fuse_min, self._layer, self.coef, self.fuse, self._fused,
                         cadence)

    #: the block=2 rule does not depend on ``N`` (batched rows: no per-``N`` masks; block=1
    #: rows batch through :func:`~bayes_spectral.penalties.fused_rows.vector_step_rows`)
    _rank_one_uses_n = False

    def _batchable(self, weight):
        """Every row's fused step batches: block=2 :meth:`_fused_grad`, block=1
        :meth:`_vector_grad` (:func:`~bayes_spectral.penalties.fused_rows.vector_step_rows`)."""
        return True

    @property
    def _batch_min_rows(self) -> int:
        """block=1: 4 (a vector's own step is ~11 small ops: one ``accumulate_grad`` alone,
        1 thread, per row / batched: dropout MLP 2 rows 0.20 / 0.30 ms, LSTM 3 rows 0.46 /
        0.46 ms, transformer 8 rows 1.45 / 0.57 ms); block=2: 2."""
        return 4 if self.block == 1 else 2

    def _row_state(self, name, weight):
        """block=1: the one vector (:meth:`_layer`); block=2: the 2-column block."""
        return self._layer(name, weight) if self.block == 1 else self._fused_layer(name, weight)

    def _rank_one_value(self, lam, total, n):
        """block=2: ``coef/2 lambda`` (``lambda = |W v|^2``, ``v`` the top Ritz vector)."""
        return (0.5 * self.coef) * lam

    def _rank_one_coefs(self, lam, total, n):
        """``(2 dR/dlambda, no ||W||_F^2 term) = (coef, None)``."""
        return self.coef, None

    def _vector_grad(self, weight, grad, name, scale):
        """Fused mode's ``accumulate_grad``: the hooks' value, or the same step by two
        matrix-vector products (``r = W v``, ``grad += scale coef r v^T``, ``v <- W^T r /
        |W^T r|``; ``every=k``: after the catch-up power steps)."""
        st = self._layer(name, weight)
        if st.injected:
            st.injected = False
            r = st.r
            if scale != st.gain:  # the backward added gain (every) times the gradient
                grad.view(grad.shape[0], -1).addr_(r.to(grad.dtype), st.v_used.to(grad.dtype),
                                                   alpha=(scale - st.gain) * self.coef)
            return (0.5 * scale * self.coef) * r.dot(r)
        w = weight.detach().reshape(weight.shape[0], -1)
        v = st.v = advance(w, st.v, self._catch_up())
        r = torch.mv(w, v)
        grad.view(grad.shape[0], -1).addr_(r, v, alpha=scale * self.coef)
        st.set_v(torch.mv(w.t(), r))
        return (0.5 * scale * self.coef) * r.dot(r)

    def _vector_value(self, weight, name):
        """Fused mode's loss-path value: the hooks' (detached: their gradient is already
        in the backward), or ``coef/2 (u^T W v)^2`` with graph after the same step."""
        st = self._layer(name, weight)
        if st.injected:
            st.injected = False
            return (0.5 * self.coef) * st.r.dot(st.r)
        w = weight.reshape(weight.shape[0], -1)
        with torch.no_grad():
            st.v = advance(w.detach(), st.v, self._catch_up())
            u = nn.functional.normalize(torch.mv(w.detach(), st.v), dim=0)
        v = st.v
        st.set_v(torch.mv(w.detach().t(), u))
        return 0.5 * self.coef * torch.dot(u, torch.mv(w, v)).square()

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """``grad += scale coef sigma u v^T`` (one rank-1 update in place, after the same
        power-iteration step as a call); returns ``scale coef/2 sigma^2``. Fused mode: see
        the class docstring (no host sync)."""
        if self.mode == "fused":
            if self.block == 2:
                return self._fused_grad(weight, grad, name, scale)
            return self._vector_grad(weight, grad, name, scale)
        w = weight.detach()
        sigma, u, v = self._iteration(w, name).estimate(w)
        s = float(sigma)  # the one device sync of the call
        if not math.isfinite(s):
            self._checked_value(sigma, w, name)  # raises, naming the layer
        grad.view(grad.shape[0], -1).addr_(u, v, alpha=scale * self.coef * s)
        return sigma.new_tensor(scale * 0.5 * self.coef * s * s)

    def weight_penalty(self, weight, name=None):
        if self.mode == "fused":
            if self.block == 2:
                return self._fused_loss_value(weight, name)
            return self._vector_value(weight, name)
        return 0.5 * self.coef * self.sigma(weight, name).square()

    stateful = True

    def state_dict(self) -> dict:
        """``{"layers": {layer: {"u": left vector}}}`` (copies); fused mode
        ``{"mode": "fused", "layers": {layer: {"v": right vector}}}``; block=2 ``{"mode":
        "fused", "block": 2, "layers": {layer: {"v": the block's 2 x n rows}}}``."""
        if self.mode == "fused" and self.block == 2:
            return {"mode": "fused", "block": 2, "layers": self._fused_state()}
        if self.mode == "fused":
            return {"mode": "fused",
                    "layers": {k: {"v": st.v.detach().clone()} for k, st in self._fused.items()}}
        return {"layers": {k: {"u": it.u.detach().clone()} for k, it in self._iters.items()}}

    def _restored(self, state: dict) -> dict:
        """``{"_iters": the power iterations of state}`` (built without touching the
        global RNG); fused mode ``{"_fused": the layers' states}``."""
        mode = state.get("mode", "inplace") if isinstance(state, dict) else self.mode
        if mode != self.mode:
            raise ValueError(f"SpectralNorm: the state is for mode {mode!r}, this penalty's "
                             f"mode is {self.mode!r}")
        if self.mode == "fused":
            saved = state.get("block", 1) if isinstance(state, dict) else 1
            if saved != self.block:
                raise ValueError(f"SpectralNorm: the fused state is for block={saved!r}, this "
                                 f"penalty's block is {self.block}")
            if self.block == 2:
                return {"_fused": self._restored_fused(
                    layer_states(state, "SpectralNorm", ("v",)), "SpectralNorm")}
            return {"_fused": self._restored_vectors(state)}
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k != "mode"}
        out: dict[str, PowerIteration] = {}
        for key, st in layer_states(state, "SpectralNorm", ("u",)).items():
            u = st.get("u")
            if not isinstance(u, torch.Tensor) or u.dim() != 1 or not u.is_floating_point():
                raise ValueError(f"SpectralNorm: the state of layer {key!r} needs a 1-D "
                                 f"floating 'u', got {u!r:.60}")
            gen = torch.Generator().manual_seed(self.seed)
            it = PowerIteration((u.shape[0], 1), n_iter=self.n_iter, generator=gen)
            it.u = u.detach().clone()
            out[key] = it
        return {"_iters": out}

    @staticmethod
    def _restored_vectors(state: dict) -> dict[str, LayerState]:
        """The fused mode's layer states from ``state`` (``{"layers": {layer: {"v"}}}``)."""
        out = {}
        for key, st in layer_states(state, "SpectralNorm", ("v",)).items():
            v = st.get("v")
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
                raise ValueError(f"SpectralNorm: the fused state of layer {key!r} needs a 1-D "
                                 f"floating 'v', got {v!r:.60}")
            out[key] = LayerState(v.detach().clone())
        return out
