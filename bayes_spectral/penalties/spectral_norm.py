"""Spectral norm regularisation (Yoshida & Miyato 2017)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_positive
from ..spectra.spectrum import PowerIteration
from .base import Penalty, layer_states
from .fused import STRATEGIES, Cadence, FusedHooks, LayerState, advance, hook_rows

__all__ = ["SpectralNorm"]

_MODES = ("inplace", "fused")


class SpectralNorm(Penalty):
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
    (:class:`~bayes_spectral.penalties.fused.Cadence`). One vector trails where the top two
    singular values cross: along the digits Adam trajectory of
    ``tests/penalties/test_fused_every.py`` the value is 7-11% off with every=1 or every=8
    alike (the 2-column block of ``FrechetPrior`` / ``StableRank`` resolves that).
    """

    label = "spectral norm"

    def __init__(self, coef: float = 1.0, n_iter: int = 1, seed: int = 0,
                 mode: str = "inplace", fuse_min: int = 65536,
                 fuse: str = "adjacent") -> None:
        self.coef = check_positive(coef, "coef")
        self.n_iter = int(n_iter)
        self.seed = int(seed)
        if mode not in _MODES:
            raise ValueError(f"SpectralNorm: mode must be one of {_MODES}, got {mode!r}")
        if mode == "fused" and self.n_iter != 1:
            raise ValueError(f"SpectralNorm: mode='fused' runs one power-iteration step per "
                             f"training step, n_iter must be 1, got {n_iter}")
        self.mode = mode
        if isinstance(fuse_min, bool) or not isinstance(fuse_min, int) or fuse_min < 0:
            raise ValueError(f"SpectralNorm: fuse_min must be an integer >= 0 (the fewest "
                             f"weight entries a fused layer has), got {fuse_min!r}")
        self.fuse_min = fuse_min
        if fuse not in STRATEGIES:
            raise ValueError(f"SpectralNorm: fuse must be one of {sorted(STRATEGIES)}, got "
                             f"{fuse!r}")
        self.fuse = fuse
        self._iters: dict[str, PowerIteration] = {}
        self._fused: dict[str, LayerState] = {}
        self._cadence: Cadence | None = None  # the Regularizer's (every=k), set by attach

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
        self._cadence = cadence
        return hook_rows(rows, self.fuse_min, self._layer, self.coef, self.fuse, self._fused,
                         cadence)

    def _catch_up(self) -> int:
        return 0 if self._cadence is None else self._cadence.catch_up

    def _fused_grad(self, weight, grad, name, scale):
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

    def _fused_value(self, weight, name):
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
            return self._fused_grad(weight, grad, name, scale)
        w = weight.detach()
        sigma, u, v = self._iteration(w, name).estimate(w)
        s = float(sigma)  # the one device sync of the call
        if not math.isfinite(s):
            self._checked_value(sigma, w, name)  # raises, naming the layer
        grad.view(grad.shape[0], -1).addr_(u, v, alpha=scale * self.coef * s)
        return sigma.new_tensor(scale * 0.5 * self.coef * s * s)

    def weight_penalty(self, weight, name=None):
        if self.mode == "fused":
            return self._fused_value(weight, name)
        return 0.5 * self.coef * self.sigma(weight, name).square()

    stateful = True

    def state_dict(self) -> dict:
        """``{"layers": {layer: {"u": left vector}}}`` (copies); fused mode
        ``{"mode": "fused", "layers": {layer: {"v": right vector}}}``."""
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
            return {"_fused": self._restored_fused(state)}
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
    def _restored_fused(state: dict) -> dict[str, LayerState]:
        """The fused mode's layer states from ``state`` (``{"layers": {layer: {"v"}}}``)."""
        out = {}
        for key, st in layer_states(state, "SpectralNorm", ("v",)).items():
            v = st.get("v")
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
                raise ValueError(f"SpectralNorm: the fused state of layer {key!r} needs a 1-D "
                                 f"floating 'v', got {v!r:.60}")
            out[key] = LayerState(v.detach().clone())
        return out
