"""Penalties on the top of the ESD: weighted alpha and the spectral-prior penalties.

Each has an exact mode (full singular values every call) and ``tracked=True``, which
follows the needed top eigenpairs of every layer with
:class:`~bayes_spectral.spectra.tracking.TailTracker` (three ``m x n x k`` products per call
instead of an SVD; full decomposition every ``refresh_every`` calls or on drift). Block
sizes: ``need`` = the eigenvalues the penalty uses, ``k = need + max(16, need)``
(:func:`~bayes_spectral.spectra.tracking.tail_size`), chosen again at every full decomposition:

* weighted alpha: ``need = num_tail`` of the power-law fit at the last full decomposition
  (tail above xmin plus the xmin eigenvalue); between refreshes the xmin *index* is kept
  fixed (the value of alpha still follows the eigenvalues). Exact mode re-chooses xmin by
  KS every call, so the two can differ where the KS choice jumps; they agree exactly at
  the same xmin index.
  With ``estimator="hill"``: ``need = k + 1`` (``k = floor(tail_fraction N)``), about half
  the spectrum at the paper's ``0.5``: wider than ``TailTracker``'s ``wide = 0.4``, so every
  call decomposes ("wide") and equals the exact mode to rounding.
* power-law prior: ``need`` = number of eigenvalues ``>= xmin`` plus one (with
  ``xmin_quantile``: the ``N - floor(q N)`` top ones; the gradient then also flows through
  the xmin eigenvalue, often inside the bulk where its eigenvector is ill-conditioned, so
  gradients within 1e-3 need ``tol=1e-4``, measured in ``tests/spectra/test_tracking.py``); if
  the tail outgrows the block the call re-decomposes at once (the bulk is handled exactly through
  ``||W||_F^2``, see :func:`~bayes_spectral.spectra.laws.spliced_powerlaw_spectrum_sum`).
* Frechet prior: ``need = 1`` (``lambda_max``) plus ``||W||_F^2``.

``mode="subspace"`` (power-law prior with a fixed ``xmin``, weighted alpha with
``estimator="hill"``; the recommended mode for the power law, and for Hill where accuracy
matters): deterministic, the exact gradient of the Ritz values, no host sync in
``accumulate_grad`` between refreshes.
A fixed-size warm-started block per layer (per slice for pooled conv kernels)
(:class:`~bayes_spectral.spectra.subspace.TailSubspace`): an exact ``eigh`` of the Gram
matrices on the layer's first call sets ``need`` (power law: the eigenvalues ``>= xmin``
plus one; Hill: the top ``k + 1``; per slice, the most any slice holds of the pooled ones)
and the block ``need + margin`` (``margin = max(16, need // 4)`` unless given). Each call
then takes ``power_iters = 1`` shifted power step at the current weights and a
Rayleigh-Ritz step: three products of ``W`` with the ``n x block`` block, a ``block x
block`` ``eigh`` and a QR. The value uses the Ritz values ``theta_i``: power law
``coef (||W||_F^2/tau - sum_i h(theta_i) + N log Z)`` (tail terms over ``theta_i >= xmin``
by ``torch.where``, the bulk exact through ``||W||_F^2`` as in
:func:`~bayes_spectral.spectra.laws.spliced_powerlaw_spectrum_sum`); Hill ``alpha = 1 + k /
sum_{i<=k} ln(theta_(i)/theta_(k+1))`` over the pooled top ``k + 1``, times
``log lambda_max``. Gradient ``2 W U diag(dR/dtheta) U^T`` (plus ``2 (coef/tau) W``)
through the Ritz pairs, the exact eigenvalue gradient where they have converged. Bias:
``theta_i <= lambda_i`` (interlacing), error ``O(sin^2)`` of the block's angle; on the
digits Adam trajectory of ``tests/penalties/test_subspace_mode.py`` (lr 1e-2, 64 x 64
layers): called every step, within 7e-6 relative of exact with gradient cosine >= 0.99999
from step 9 (in the first steps the power law's absolute error was up to 1.1e-3, 6.5e-3 of a
value crossing zero; Hill within 9e-6); called every 8 steps (``Regularizer(...,
every=8)``), within 3.3e-4 / cosine >= 0.9997 (power law) and 2.3e-5 / 0.99994 (Hill) from
step 16, 1.5e-3 / 0.9996 at step 8. On the benchmark's MLP 784-512-512-10 (float32, momentum
SGD, random data, ``every=8``, checked every 64 steps) the power law's absolute error was
3e-4..2.1e-2 on values of 0.3-37 whose terms (~460) cancel (relative 1e-5..1.2e-3, 1.5e-2
where the value crossed zero), cosine >= 0.9998; ``power_iters=2``: <= 4e-3 and 0.99998;
every step: 2.9e-5 relative, cosine 0.99999. Block overflow (the tail grew past half the
margin, or an eigenvalue ``>= xmin`` missing because the block is full) is checked only at
calls ``refresh_every, 2 refresh_every, ...`` (default 16 in this mode; one host sync
there): then the layer re-decomposes (new ``need`` and block); in between the value misses
tail eigenvalues that do not fit. On CUDA the block ``eigh`` checks its error (a host sync
per call: torch has no ``eigh_ex``). Cost (``benchmarks/bench_penalties.py --rows
subspace``, one CPU thread): power law 4.8-5.1x a plain step on the MLP 784-512-512-10 and
7.9-9.9x on 784-1024-1024-10 (``"fast"``: 10.5-11.2x, 9.3-13.7x), with ``every=8`` 1.5-1.6x
and 1.8-2.6x (``"fast"``: 2.1-2.3x, 2.0-2.7x); the floor (two products with a tail-sized
block) is 1.9-2.0x and 2.5-3.6x. Hill weighted alpha: see :class:`WeightedAlpha`.

``mode="fast"`` (``mode`` in ``"exact"``, ``"tracked"`` (= ``tracked=True``), ``"fast"``,
``"subspace"``): a per-call cost that does not grow with the tail, no host sync in
``accumulate_grad``.

* Frechet prior: deterministic. ``lambda_max`` is the top Ritz value of a warm-started
  ``block = 8``-column subspace iteration (:class:`~bayes_spectral.spectra.subspace.TopEigen`,
  ``power_iters = 1`` step and two thin products per call, 16 steps on a layer's first call),
  the rest through ``||W||_F^2``. Bias: ``lambda_max`` is a Ritz value, ``<=`` the true one,
  one power step behind the weights; on a digits trajectory (Adam, lr 1e-2) within 1e-3
  relative of exact with gradient cosine >= 0.99 at every checked step
  (``tests/penalties/test_fast_mode.py``).
* Power-law prior (fixed ``xmin`` only): stochastic. ``R = ||W||_F^2/tau - tr h(G) + N log Z``
  with the bulk exact and ``tr h(G)``, ``h(lambda) = [lambda >= xmin] ((lambda - xmin)/tau -
  alpha ln(lambda/xmin))``, estimated by Hutchinson x Chebyshev
  (:func:`~bayes_spectral.spectra.stochastic.spectral_sum`: ``probes = 16`` Rademacher
  columns, ``degree = 32``, 16 Gram products, on ``[0, b]``, ``b = (1 + bound_margin)
  theta`` with ``theta`` the block iteration's ``lambda_max`` after ``power_iters = 4`` steps
  per call). Eigenvalues above ``b`` are extrapolated by the polynomial, which ruins the
  estimate: with one step per call, a block left 60 Adam steps behind gave ``theta =
  0.29 lambda_max``; 2 steps 0.975, 4 steps 1.000 (measured on the digits trajectory of the
  tests), so keep 4 unless the penalty runs at every step.
  Unbiased for the degree-``d`` interpolant of ``h`` (fresh probes every call, from a seeded
  generator on the weight's device); sd of one call ``<= sqrt(2/probes) ||p(G)||_F``;
  deterministic interpolation bias from the kink of ``h`` at ``xmin`` (5e-4 .. 2e-2 of
  ``|R|`` at ``d = 32`` on the 64- to 1024-wide layers measured with ``probes="exact"``,
  falling as ``O(1/d)``; ``|R|`` is small because its terms cancel). Its gradient is the estimator's
  gradient: unbiased, but a rank-``probes`` sketch of ``2 W h'(G)``, so one call's gradient
  has cosine ~0.3-0.8 with the exact one (``benchmarks/bench_fast_accuracy.py``); SGD
  averages it out (digits accuracy equal to the exact path's, 3 seeds). The cost is
  independent of the tail size but, on CPU, 16 thin products cost several plain steps:
  see ``benchmarks/bench_penalties.py --rows fast``.
* Weighted alpha, ``estimator="hill"`` only: stochastic, ``alpha = 1 + k / S`` with
  ``S = tr h(G)``, ``h(lambda) = max(ln(lambda/xmin), 0)``, by the same Hutchinson x Chebyshev
  estimate, ``xmin`` held between exact refreshes (see :class:`WeightedAlpha`). With
  ``estimator="ks"`` there is none (the KS-chosen xmin index has no stochastic form): use
  ``tracked=True`` with ``Regularizer(..., every=k)``.

Conv kernels: ``conv="pool"`` (default) pools the eigenvalues of the ``kh*kw`` slices into
one ESD (each slice is tracked with the same block size), ``conv="flatten"`` uses
``out x (in*kh*kw)``. ``N`` (number of eigenvalues) is ``slices * min(out, in)``.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_positive, check_weight
from ..spectra.laws import (
    exponential_log_pdf,
    frechet_log_pdf,
    spliced_powerlaw_log_pdf,
    spliced_powerlaw_spectrum_sum,
)
from ..spectra.powerlaw import alpha_at_index, fit_powerlaw, hill_estimator, hill_tail_size
from ..spectra.spectrum import ConvMode, as_matrices, esd
from ..spectra.stochastic import spectral_sum
from ..spectra.subspace import TailSubspace, TopEigen, gram_eigh, oriented
from ..spectra.tracking import TailTracker, tail_size
from .base import Penalty, layer_states, restored_top_eigen
from .fused import RankOneFused

__all__ = ["WeightedAlpha", "PowerLawPrior", "FrechetPrior"]

_LN10 = math.log(10.0)
_ESTIMATORS = ("ks", "hill")
_LOGS = {"log10": (torch.log10, _LN10), "ln": (torch.log, 1.0)}  # (function, ln(base))
_MODES = ("exact", "tracked", "fast", "subspace")


def _mode(mode, tracked, label):
    """``mode`` (``None``: ``"tracked"`` if ``tracked`` else ``"exact"``), checked."""
    if mode is None:
        return "tracked" if tracked else "exact"
    _check_choice(mode, _MODES, "mode", label)
    if tracked and mode != "tracked":
        raise ValueError(f"{label}: tracked=True contradicts mode={mode!r}")
    return mode


def _check_choice(value, allowed, setting, label):
    if value not in allowed:
        raise ValueError(f"{label}: {setting} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _check_fraction(value, label):
    if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{label}: tail_fraction must be in (0, 1], got {value!r}")
    return float(value)


def _where(name):
    return f" (layer {name!r})" if name else ""


def _restored_subspace(st, label, key, n_iter):
    """A subspace-mode layer state (``{"sub", "calls", "need", "shape", "loaded"}``) from
    its ``state_dict`` part, checked: ValueError naming ``label`` and the layer."""
    try:
        V, shape = st["V"], tuple(int(n) for n in st["shape"])
        calls, need = int(st["calls"]), int(st["need"])
        ok = (isinstance(V, torch.Tensor) and V.is_floating_point() and V.dim() == 3
              and len(shape) == 3 and V.shape[0] == shape[0]
              and V.shape[1] == min(shape[1:]) and 1 <= need <= V.shape[2] <= V.shape[1]
              and calls >= 0)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{label}: the subspace state of layer {key!r} needs V, calls, need "
                         f"and shape ({type(err).__name__}: {err})") from err
    if not ok:
        got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
        raise ValueError(f"{label}: the subspace state of layer {key!r} holds a block {got} "
                         f"that does not fit a weight stack {shape} with need {need}")
    sub = TailSubspace(n_iter)
    sub.V = V.detach().clone()
    return {"sub": sub, "calls": calls, "need": need, "shape": shape, "loaded": True}


class _TailPenalty(Penalty):
    """Shared exact / tracked machinery; subclasses give ``_exact``, ``_sizes``, ``_tracked``
    (and for ``mode="subspace"``, ``_ritz_value`` / ``_ritz_grad``)."""

    min_evals = 2
    #: fast-mode settings (``mode="fast"``); set by the subclasses that have one
    power_iters, block, probes, degree, bound_margin, seed = 1, 8, 16, 32, 0.1, 0
    #: whether ``mode="subspace"`` exists (power-law prior, Hill weighted alpha)
    _SUBSPACE = False
    #: ``refresh_every`` when not given: tracked full decompositions / subspace block checks
    _REFRESH = {"subspace": 16}

    def __init__(self, coef, tracked, conv, refresh_every, tol, margin, mode=None):
        self.coef = check_positive(coef, "coef")
        self.mode = _mode(mode, tracked, type(self).__name__)
        if self.mode == "subspace" and not self._SUBSPACE:
            raise ValueError(f"{type(self).__name__}: mode='subspace' is not available")
        self.tracked = self.mode == "tracked"
        self.conv = conv
        if refresh_every is None:
            refresh_every = self._REFRESH.get(self.mode, 100)
        if isinstance(refresh_every, bool) or int(refresh_every) < 1:
            raise ValueError(f"{type(self).__name__}: refresh_every must be an integer >= 1, "
                             f"got {refresh_every!r}")
        self.refresh_every = int(refresh_every)
        self.tol = float(tol)
        self.margin = margin
        self._trackers: dict[str, TailTracker] = {}
        self._pooled_need: dict[str, int] = {}
        self._tops: dict[str, TopEigen] = {}
        self._gens: dict[torch.device, torch.Generator] = {}
        self._pending_gens: dict[str, torch.Tensor] = {}  # loaded, applied at first use
        self._subs: dict[str, dict] = {}  # subspace mode, per layer

    def tracker(self, name: str) -> TailTracker:
        """The :class:`TailTracker` of layer ``name`` (tracked mode)."""
        return self._trackers[name]

    #: the parts of a layer's state (``state_dict()["layers"][name]``)
    _PARTS = ("tracker", "need", "top", "subspace")

    @property
    def stateful(self) -> bool:
        return self.mode != "exact"

    def state_dict(self) -> dict:
        """``{"mode", "layers": {layer: parts}, "generators": {device: state}}``, as tensors
        and plain data (copies). Parts: ``tracker`` (the :class:`TailTracker` state),
        ``need`` (pooled eigenvalues used), ``top`` (the fast mode's warm-started block,
        :class:`TopEigen`), ``subspace`` (``mode="subspace"``: the block ``V``, ``calls``,
        ``need`` and the weight stack's ``shape``), and for weighted alpha's fast mode
        ``hill`` (refresh counters, held ``xmin`` and eigenvector); ``generators``: the
        probe generators' states (``torch.Generator.get_state``), keyed by device."""
        layers: dict[str, dict] = {}
        for key, tr in self._trackers.items():
            layers.setdefault(key, {})["tracker"] = tr.state_dict()
        for key, need in self._pooled_need.items():
            layers.setdefault(key, {})["need"] = int(need)
        for key, top in self._tops.items():
            layers.setdefault(key, {})["top"] = top.state_dict()
        for key, st in self._subs.items():
            layers.setdefault(key, {})["subspace"] = {
                "V": st["sub"].V.detach().clone(), "calls": st["calls"], "need": st["need"],
                "shape": list(st["shape"])}
        gens = {d: t.clone() for d, t in self._pending_gens.items()}
        gens.update({str(d): g.get_state() for d, g in self._gens.items()})
        return {"mode": self.mode, "layers": layers, "generators": gens}

    def _restored(self, state: dict) -> dict:
        """The attributes :meth:`load_state_dict` sets, built from ``state`` (checked); a
        generator's state is applied when the penalty first draws probes on that device."""
        label = type(self).__name__
        mode = state.get("mode") if isinstance(state, dict) else None
        if mode != self.mode:
            raise ValueError(f"{label}: the state is for mode {mode!r}, this penalty's mode is "
                             f"{self.mode!r}")
        out = {"_trackers": {}, "_pooled_need": {}, "_tops": {}, "_gens": {}, "_subs": {}}
        for key, st in layer_states(state, label, self._PARTS).items():
            if "subspace" in st:
                out["_subs"][key] = _restored_subspace(st["subspace"], label, key,
                                                       self.power_iters)
            if "tracker" in st:
                tr = TailTracker(refresh_every=self.refresh_every, tol=self.tol)
                try:
                    tr.load_state_dict(st["tracker"])
                except (ValueError, TypeError, KeyError, AttributeError) as err:
                    raise ValueError(f"{label}: the tracker state of layer {key!r}: {err}") \
                        from err
                out["_trackers"][key] = tr
            if "need" in st:
                out["_pooled_need"][key] = int(st["need"])
            if "top" in st:
                out["_tops"][key] = restored_top_eigen(
                    st["top"], label, key, block=self.block, power_iters=self.power_iters,
                    seed=self.seed)
        gens = state.get("generators", {})
        if not isinstance(gens, dict) or not all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in gens.values()):
            raise ValueError(f"{label}: state['generators'] must map devices to the byte "
                             "tensors of torch.Generator.get_state()")
        out["_pending_gens"] = {str(d): t.detach().cpu().clone() for d, t in gens.items()}
        return out

    def _check_size(self, N, name):
        if N < self.min_evals:
            raise ValueError(
                f"weight{_where(name)} has {N} eigenvalues: too few for the {self.label} "
                f"penalty (a tail fit needs at least {self.min_evals})")

    def _mats(self, weight, name):
        """``(mats, N)``: the ``(B, m, n)`` stack of ``weight`` and its ``N = B min(m, n)``
        eigenvalues, checked against ``min_evals``."""
        if self.conv == "pool" and weight.dim() > 2:
            mats = as_matrices(weight, conv=self.conv, name=name)
        else:  # Linear: no extra pass over the weight
            mats = weight.reshape(1, weight.shape[0], -1)
        B, m, n = mats.shape
        N = B * min(m, n)
        self._check_size(N, name)
        return mats, N

    def _estimate(self, weight, mats, name, graph=True):
        """Tracker call (with the completeness re-check): ``(estimate, tracker, key)``."""
        B, m, n = mats.shape
        dim = min(m, n)
        key = self._key(weight, name)
        tr = self._trackers.get(key)
        if tr is None:
            tr = self._trackers[key] = TailTracker(refresh_every=self.refresh_every,
                                                   tol=self.tol)

        def choose(full):
            pooled = torch.sort(full.reshape(-1)).values
            self._pooled_need[key] = need = self._sizes(pooled, name)
            need = min(need, dim)
            return tail_size(need, dim, self.margin), need

        est = tr(mats, 1, 1, choose=choose, graph=graph)
        if tr.need < dim and not self._complete(est.evals, tr.need):
            tr.reset()
            est = tr(mats, 1, 1, choose=choose, graph=graph)
        return est, tr, key

    def _top(self, lead, key):
        """``(order, top)``: the pooled ``need`` largest tracked eigenvalues, descending, and
        their positions in ``lead.reshape(-1)``."""
        flat = lead.reshape(-1)
        order = torch.sort(flat, descending=True).indices[: self._pooled_need[key]]
        return order, flat[order]

    def _value(self, lead, total, N, key, name):
        return self.coef * self._tracked(self._top(lead, key)[1], total, N, name)

    def _value_and_grad(self, lead, total, N, key, name):
        """``(R, dR/dlead, dR/dtotal)`` without autograd: ``_tracked`` under ``no_grad`` and
        the closed-form ``_tracked_grad`` (a graph over a few eigenvalues costs ~0.3 ms of
        dispatch per layer, more than the tracking products)."""
        order, top = self._top(lead, key)
        with torch.no_grad():
            value = self.coef * self._tracked(top, total, N, name)
        dtop, dtotal = self._tracked_grad(top, total, N)
        c = lead.new_zeros(lead.numel())
        c[order] = self.coef * dtop
        return value, c.view_as(lead), self.coef * dtotal

    def _top_eigen(self, mats, key):
        """``(lam, u, v)`` of every slice of ``mats`` (``(B, m, n)``), no graph: the top
        Ritz pair of a warm-started ``block``-column subspace iteration
        (:class:`~bayes_spectral.spectra.subspace.TopEigen`, ``power_iters`` steps per call,
        16 on a layer's first call); ``lam <= lambda_max``, ``u = W v``."""
        top = self._tops.get(key)
        if top is None:
            top = self._tops[key] = TopEigen(self.block, self.power_iters, seed=self.seed)
        return top(mats)

    # --------------------------------------------------------------- mode="subspace"

    def subspace_state(self, name: str) -> dict:
        """Subspace mode, layer ``name``: ``{"block", "need", "calls"}`` (block columns per
        slice, eigenvalues needed per slice at the last decomposition, calls so far)."""
        st = self._subs[name]
        return {"block": int(st["sub"].V.shape[-1]), "need": st["need"], "calls": st["calls"]}

    def _subspace_block(self, need, dim):
        """Block columns for ``need`` eigenpairs: ``need + margin``, ``margin`` the setting or
        ``max(16, need // 4)``, at most ``dim``."""
        margin = max(16, need // 4) if self.margin is None else int(self.margin)
        return min(need + margin, dim)

    def _subspace_start(self, mats, key, name, calls):
        """Exact decomposition (:func:`~bayes_spectral.spectra.subspace.gram_eigh`, host
        syncs): per slice ``need`` = the most eigenvalues of one slice among the pooled ones
        the penalty uses (``_sizes``), the block its leading ``_subspace_block`` vectors."""
        evals, vecs = gram_eigh(mats)
        pooled = torch.sort(evals.reshape(-1)).values
        used = min(self._sizes(pooled, name), pooled.numel())
        self._subspace_guard(pooled[-used], name)
        need = max(1, int((evals >= pooled[-used]).sum(-1).amax()))
        sub = TailSubspace(self.power_iters)
        sub.start(vecs, self._subspace_block(need, evals.shape[-1]))
        st = self._subs[key] = {"sub": sub, "calls": calls, "need": need,
                                "shape": tuple(mats.shape), "loaded": False}
        return st

    def _subspace_pairs(self, mats, key, name):
        """``(theta, AU, U)`` of the layer's block (:class:`TailSubspace`, no graph), the
        block advanced. Decomposes exactly on the layer's first call (or a new shape); at
        calls ``refresh_every, 2 refresh_every, ...`` checks for overflow (one host sync):
        when a slice's Ritz values at or above the threshold (``_ritz_threshold``) fill more
        than half its margin, it re-decomposes (new ``need`` and block) and redoes the call."""
        st = self._subs.get(key)
        shape = tuple(mats.shape)
        if st is not None and st["shape"] != shape:
            if st["loaded"]:
                raise ValueError(f"{type(self).__name__}: the subspace state of layer {key!r} "
                                 f"is for a weight stack of shape {st['shape']}, this weight's "
                                 f"is {shape}")
            st = None
        if st is None:
            st = self._subspace_start(mats, key, name, 0)
        out = st["sub"](mats)
        if st["calls"] and st["calls"] % self.refresh_every == 0 and self._overflow(out[0], st):
            st = self._subspace_start(mats, key, name, st["calls"])
            out = st["sub"](mats)
        st["calls"] += 1
        st["loaded"] = False
        return out

    def _subspace_guard(self, threshold, name):
        """Raise where the penalty is not finite at the decomposition's threshold."""

    def _overflow(self, theta, st):
        k = theta.shape[-1]
        if k == st["sub"].V.shape[-2]:  # the block is the whole space: exact
            return False
        N = theta.shape[0] * st["sub"].V.shape[-2]
        used = int((theta >= self._ritz_threshold(theta, N)).sum(-1).amax())
        return used > st["need"] + (k - st["need"]) // 2

    def _subspace_mats_grad(self, grad):
        """``grad`` as the ``(B, m, n)`` stack of :meth:`_mats`, as views."""
        if self.conv == "pool" and grad.dim() > 2:
            return grad.view(grad.shape[0], grad.shape[1], -1).permute(2, 0, 1)
        return grad.view(1, grad.shape[0], -1)

    def _subspace_value(self, weight, mats, N, name):
        """The call: ``_ritz_value`` of ``theta_i = |A u_i|^2`` with graph through ``A``
        (``u_i`` the detached Ritz vectors): ``dtheta_i/dA = 2 (A u_i) u_i^T``."""
        _, _, U = self._subspace_pairs(mats, self._key(weight, name), name)
        theta = (oriented(mats) @ U).square().sum(-2)
        return self._ritz_value(theta, weight.square().sum(), N)

    def _subspace_grad(self, w, grad, name, scale):
        """In place, no graph, no host sync between refreshes: ``grad += scale (2 A U
        diag(dR/dtheta) U^T + 2 dR/d||W||^2 W)`` (transposed back for wide slices)."""
        mats, N = self._mats(w, name)
        theta, Y, U = self._subspace_pairs(mats, self._key(w, name), name)
        flat = w.reshape(-1)
        total = torch.dot(flat, flat) if self._RITZ_TOTAL else None
        value = self._ritz_value(theta, total, N)
        c, d = self._ritz_grad(theta, N)
        Yc = Y * (c * (2.0 * scale)).unsqueeze(-2)
        gm = self._subspace_mats_grad(grad)
        wide = mats.shape[-2] < mats.shape[-1]
        if gm.shape[0] == 1:
            left, right = (U[0], Yc[0]) if wide else (Yc[0], U[0])
            gm[0].addmm_(left, right.mT)
        else:
            gm.add_(U @ Yc.mT if wide else Yc @ U.mT)
        if d:
            grad.add_(w, alpha=2.0 * scale * d)
        return scale * value.detach()

    def _generator(self, device):
        """The probes' generator on ``device`` (seeded with ``seed``; one per device)."""
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device).manual_seed(self.seed)
            saved = self._pending_gens.pop(str(device), None)
            if saved is not None:  # loaded by load_state_dict
                gen.set_state(saved)
        return gen

    def _fast(self, weight, mats, N, name):
        raise NotImplementedError

    def _set_fast(self, power_iters, block, probes=16, degree=32, bound_margin=0.1, seed=0):
        """Check and store the fast-mode settings (``power_iters=None``: 4 steps per call in
        ``mode="fast"``, 1 in ``mode="subspace"``)."""
        if power_iters is None:
            power_iters = 1 if self.mode == "subspace" else 4
        if self.mode == "subspace" and int(power_iters) < 1:
            raise ValueError(f"{type(self).__name__}: mode='subspace' needs power_iters >= 1, "
                             f"got {power_iters}")
        if int(power_iters) < 0 or int(block) < 1 or int(degree) < 1 or not (
                isinstance(probes, int) and probes >= 1 or probes == "exact"):
            raise ValueError(f"{type(self).__name__}: mode='fast' needs power_iters >= 0, "
                             f"block >= 1, degree >= 1 and probes >= 1 (or 'exact'), got "
                             f"{power_iters}, {block}, {degree}, {probes!r}")
        self.power_iters, self.block = int(power_iters), int(block)
        self.probes, self.degree = probes, int(degree)
        self.bound_margin = check_positive(bound_margin, "bound_margin")
        self.seed = int(seed)

    def weight_penalty(self, weight, name=None):
        mats, N = self._mats(weight, name)
        if self.mode == "subspace":
            return self._subspace_value(weight, mats, N, name)
        if self.mode == "fast":
            return self.coef * self._fast(weight, mats, N, name)
        if not self.tracked:
            return self.coef * self._exact(esd(weight, conv=self.conv, name=name), name)
        est, tr, key = self._estimate(weight, mats, name)
        return self._value(est.evals[..., : tr.need], weight.square().sum(), N, key, name)

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """Tracked mode: ``grad += scale dR/dW`` in closed form, no graph through ``W``.

        ``R`` depends on ``W`` only through the tracked eigenvalues ``lambda_i = ||W u_i||^2``
        (``u_i`` detached) and ``||W||_F^2``, so ``dR/dW = 2 Y diag(dR/dlambda) U^T +
        2 (dR/d||W||^2) W`` (:meth:`~bayes_spectral.spectra.tracking.TailTracker.add_grad`); the
        ``k``-vector ``dR/dlambda`` and ``dR/d||W||^2`` are closed forms (``_tracked_grad``,
        tested against autograd of ``_tracked``). Same tracker state and update as a call
        (tested equal to autograd of the call).
        Exact mode, or a gradient that is not a view-compatible buffer: the autograd default.
        Fast mode: autograd of the fast value on a detached copy, with no host sync (and so
        no finiteness check: a non-finite weight gives a non-finite value and gradient).
        Subspace mode: the closed form through the Ritz pairs (:meth:`_subspace_grad`),
        equally without a finiteness check.
        """
        if self.mode == "subspace" and grad.is_contiguous() and grad.shape == weight.shape:
            return self._subspace_grad(weight.detach(), grad, name, scale)
        if self.mode == "fast" and hasattr(self, "_fast_grad") and grad.is_contiguous() \
                and grad.shape == weight.shape:
            return self._fast_grad(weight.detach(), grad, name, scale)
        if self.mode == "fast":
            leaf = weight.detach().requires_grad_(True)
            with torch.enable_grad():
                value = self.weight_penalty(leaf, name)
                (g,) = torch.autograd.grad(value, leaf)
            grad.add_(g, alpha=scale)
            return scale * value.detach()
        if not self.tracked or not grad.is_contiguous() or grad.shape != weight.shape:
            return super().accumulate_grad(weight, grad, name=name, scale=scale)
        w = weight.detach()
        if not w.is_floating_point() or w.dim() < 2:
            check_weight(w, name)
        try:
            mats, N = self._mats(w, name)
            est, tr, key = self._estimate(w, mats, name, graph=False)
            flat = w.reshape(-1)
            total = torch.dot(flat, flat)  # ||W||_F^2, one read of W
            value, c, d = self._value_and_grad(est.evals[..., : tr.need], total, N, key, name)
        except RuntimeError:
            check_weight(w, name)
            raise
        value = self._checked_value(value.detach(), w, name)
        if self.conv == "pool" and grad.dim() > 2:  # the slices, as views of grad
            gm = grad.view(grad.shape[0], grad.shape[1], -1).permute(2, 0, 1)
        else:
            gm = grad.view(1, grad.shape[0], -1)
        tr.add_grad(est, c, gm, alpha=scale)
        if d:  # weighted alpha does not depend on ||W||_F^2: no pass over W
            grad.add_(w, alpha=2.0 * scale * d)
        return scale * value

    def _complete(self, evals, need):
        return True


class WeightedAlpha(_TailPenalty):
    """``coef * alpha * log10(lambda_max)`` (Martin & Mahoney; Xiao et al. as a penalty).

    ``estimator="ks"`` (default): ``alpha`` is the differentiable power-law exponent at the
    KS-chosen xmin index (chosen without gradient,
    :func:`~bayes_spectral.spectra.powerlaw.fit_powerlaw`); ``fit_kwargs`` go to the fit
    (e.g. ``min_tail``). ``estimator="hill"``: Xiao et al.'s Hill estimator at a fixed tail,
    ``fit_powerlaw(evals, xmin="hill", tail_fraction=f)`` (``hill_estimator``): with the
    ``N`` eigenvalues descending ``lambda_(1) >= ... >= lambda_(N)``, ``k = floor(f N)``
    (clipped to ``[1, N-1]``) and ``xmin = lambda_(k+1)`` (not in the sum),
    ``alpha = 1 + k / sum_{i<=k} ln(lambda_(i)/xmin)``; the xmin index is fixed, gradients
    flow through all ``k + 1`` eigenvalues; ``f = 0.5``: xmin at the (lower) median, the
    tail never jumps. ``log``: ``"log10"`` (default, WeightWatcher) or ``"ln"`` (``ln 10``
    times larger) in ``alpha * log lambda_max``; reimplementations of the paper differ.

    ``tracked=True``: see the module docstring. With the Hill estimator the tracked block
    holds ``k + 1 ~ N/2`` eigenpairs, wider than the tracker's ``wide = 0.4`` of the
    spectrum, so every call decomposes (no saving over the exact mode; expected).

    ``mode="fast"`` (``estimator="hill"`` only; with ``"ks"`` it raises): a cost that does
    not grow with ``k``. ``xmin = lambda_(k+1)`` from an exact ``eigh`` of the Gram matrices
    at a layer's calls ``0, refresh, 2 refresh, ...`` (``refresh = 50``; calls are penalty
    evaluations, so under ``Regularizer(..., every=j)`` every ``50 j`` steps), held as a
    constant in between (no host sync there). ``S = sum_{lambda >= xmin} ln(lambda/xmin) =
    tr h(G)`` by :func:`~bayes_spectral.spectra.stochastic.spectral_sum` (``probes = 16``
    Rademacher columns, ``degree = 32``, on ``[0, (1 + bound_margin) theta]``, ``theta`` the
    block iteration's ``lambda_max`` after ``power_iters = 4`` steps, as for the power-law
    prior); ``lambda_max = |W v|^2`` from that block's Ritz vector. Gradient: autograd
    through the estimate, plus the xmin eigenvalue's own term (the exact Hill gradient's
    largest: ``dalpha/dxmin = k^2/(S^2 xmin)``, ``k`` times any tail eigenvalue's) along the
    eigenvector ``u`` held from the refresh (``xmin + q - q.detach()``, ``q = |W u|^2``:
    the value keeps the held xmin). Bias: (i) Chebyshev interpolation of ``h`` at its kink at
    ``xmin``, ``O(b/d)`` per eigenvalue near it (``probes="exact"``: < 2e-3 relative at
    ``degree=256``); (ii) ``k/S`` is convex in the unbiased ``S``: ``E[alpha] - alpha ~
    k Var(S)/S^3`` (delta method; ~1e-3 relative at the measured sd); (iii) ``xmin`` (and
    ``u``) held between refreshes: the value is then the Hill alpha at the old threshold.
    sd of one call: ``|log lambda_max| k sd(S)/S^2`` with ``sd(S) <= sqrt(2/probes)
    ||h(G)||_F`` (measured 0.80-0.86 of that bound, 2.6-3.1% of the value on 256 x 128
    matrices, ``tests/penalties/test_weighted_alpha_fast.py``). Right after a refresh the
    mean of 8 gradients has cosine 0.995-0.997 with the exact one (one call 0.96-0.98;
    without the xmin term 0.06-0.41). Between refreshes the held ``u``, a bulk
    eigenvector with tiny gaps, goes stale: along a digits Adam trajectory (lr 1e-2, 64-wide
    layers) one call's cosine had median 0.52 / 0.93 (two layers) with ``refresh=50``,
    0.97 with ``refresh=10``, as low as ~0 in the first fast-moving steps (0.06-0.08
    median without the xmin term); values within 10% relative throughout. A refresh costs
    one ``n x n`` ``eigh`` (``n = min(m, n)``).

    ``mode="subspace"`` (``estimator="hill"`` only): the top ``k + 1`` eigenpairs by a
    warm-started block of ``k + 1 + margin`` columns (module docstring), deterministic, the
    exact Hill gradient through the Ritz pairs (the xmin eigenvalue's term included), no
    host sync between the block checks every ``refresh_every = 16`` calls; ``power_iters``
    (default 1) shifted power steps per call. The recommended mode where accuracy matters:
    on the digits trajectory within 9e-6 relative of exact (gradient cosine 0.99999) where
    one ``"fast"`` call's cosine was ~0.5. Its cost grows with the block, about half the
    spectrum: on the MLP 784-512-512-10 it costs what ``"fast"`` does (9.7-10.0x a plain
    step against 10.3-11.1x; ``every=8`` 2.1-2.2x against 2.2-2.3x), on 784-1024-1024-10
    about 1.6x more (15.9-22.1x against 9.5-13.6x; ``every=8`` 2.7-3.9x against 1.9-2.8x)
    (``benchmarks/bench_penalties.py --rows subspace``).
    """

    label = "weighted alpha"

    def __init__(self, coef: float = 1.0, tracked: bool = False, conv: ConvMode = "pool",
                 refresh_every: int | None = None, tol: float = 1e-3,
                 margin: int | None = None, estimator: str = "ks", tail_fraction: float = 0.5,
                 log: str = "log10", mode: str | None = None, refresh: int = 50,
                 probes: int = 16, degree: int = 32, power_iters: int | None = None,
                 block: int = 8, bound_margin: float = 0.1, seed: int = 0,
                 **fit_kwargs) -> None:
        super().__init__(coef, tracked, conv, refresh_every, tol, margin, mode)
        self.estimator = _check_choice(estimator, _ESTIMATORS, "estimator", "WeightedAlpha")
        if self.mode == "subspace" and estimator != "hill":
            raise ValueError("WeightedAlpha: mode='subspace' needs estimator='hill' (the "
                             "KS-chosen tail has no fixed size); use tracked=True for 'ks'")
        if self.mode == "fast" and estimator != "hill":
            raise ValueError("WeightedAlpha: mode='fast' with estimator='ks' is not available "
                             "(the KS-chosen xmin index has no stochastic form); use "
                             "estimator='hill', or tracked=True with Regularizer(..., every=k)")
        self._set_fast(power_iters, block, probes, degree, bound_margin, seed)
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ValueError(f"WeightedAlpha: refresh (calls between exact xmin refreshes in "
                             f"mode='fast') must be an integer >= 1, got {refresh!r}")
        self.refresh = refresh
        self._hill: dict[str, dict] = {}  # fast mode, per layer: calls, refreshes, xmin
        self.tail_fraction = _check_fraction(tail_fraction, "WeightedAlpha")
        self.log = _check_choice(log, _LOGS, "log", "WeightedAlpha")
        if estimator == "hill" and fit_kwargs:
            raise ValueError(f"WeightedAlpha: estimator='hill' takes no KS fit settings, got "
                             f"{sorted(fit_kwargs)}")
        self.fit_kwargs = fit_kwargs
        self.min_evals = max(2, int(fit_kwargs.get("min_tail", 2)))

    _PARTS = ("tracker", "need", "top", "hill", "subspace")
    _SUBSPACE, _RITZ_TOTAL = True, False

    def _ritz_top(self, theta, N):
        """``(top, idx, k)``: the ``k + 1`` largest pooled Ritz values, descending, and their
        positions in ``theta.reshape(-1)`` (``k = floor(tail_fraction N)``, Hill)."""
        k = hill_tail_size(N, self.tail_fraction)
        top, idx = torch.topk(theta.reshape(-1), k + 1)
        return top, idx, k

    def _ritz_threshold(self, theta, N):
        return self._ritz_top(theta, N)[0][-1]

    def _subspace_guard(self, threshold, name):
        if not bool(threshold > 0):
            raise ValueError(f"weighted alpha{_where(name)}: the Hill threshold eigenvalue is "
                             "zero; lower tail_fraction")

    def _ritz_value(self, theta, total, N):
        """``coef alpha log(lambda_max)``, ``alpha = 1 + k / S``, ``S = sum_{i<=k}
        ln(theta_(i) / theta_(k+1))`` over the pooled Ritz values (Hill, xmin index
        ``k + 1`` as in the exact mode)."""
        top, _, k = self._ritz_top(theta, N)
        logs = torch.log(top)
        S = logs[:k].sum() - k * logs[k]
        return (1.0 + k / S) * logs[0] * (self.coef / _LOGS[self.log][1])

    def _ritz_grad(self, theta, N):
        """``(dR/dtheta, 0)``: :meth:`_tracked_grad`'s closed form on the pooled top
        ``k + 1`` (the xmin term ``k^2 log(lambda_max)/(S^2 xmin)``), scattered back to
        ``theta``'s shape; tensors only (no host sync)."""
        top, idx, k = self._ritz_top(theta, N)
        logs = torch.log(top)
        S = logs[:k].sum() - k * logs[k]
        ln_base = _LOGS[self.log][1]
        log_max = logs[0] / ln_base
        d = (-k / (S * S) * log_max) / top
        d[k] = (k * k) * log_max / (S * S * top[k])
        d[0] = d[0] + (1.0 + k / S) / (top[0] * ln_base)
        c = torch.zeros_like(theta).reshape(-1).index_copy_(0, idx, d * self.coef)
        return c.view_as(theta), 0.0

    def _log_max(self, lam_max):
        return _LOGS[self.log][0](lam_max)

    def state_dict(self) -> dict:
        out = super().state_dict()
        for key, st in self._hill.items():
            if st.get("vec") is None:  # no refresh yet: nothing held
                continue
            out["layers"].setdefault(key, {})["hill"] = {
                "calls": st["calls"], "refreshes": st["refreshes"],
                "xmin": st["xmin"].detach().clone(), "vec": st["vec"].detach().clone(),
                "slice": st["slice"], "shape": list(st["where"][0])}
        return out

    def _restored(self, state: dict) -> dict:
        out = super()._restored(state)
        out["_hill"] = {}
        for key, st in state.get("layers", {}).items():
            hill = st.get("hill")
            if hill is None:
                continue
            try:
                xmin, vec = hill["xmin"].detach().clone(), hill["vec"].detach().clone()
                out["_hill"][key] = {
                    "calls": int(hill["calls"]), "refreshes": int(hill["refreshes"]),
                    "xmin": xmin, "vec": vec, "slice": int(hill["slice"]),
                    "where": (tuple(int(n) for n in hill["shape"]), xmin.device, xmin.dtype)}
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                raise ValueError(f"WeightedAlpha: the fast-mode state of layer {key!r} needs "
                                 "calls, refreshes, xmin, vec, slice and shape "
                                 f"({type(err).__name__}: {err})") from err
        return out

    def fast_state(self, name: str) -> dict:
        """Fast mode, layer ``name``: ``{"calls", "refreshes", "xmin"}`` (``xmin`` a
        0-d tensor on the weight's device, held between refreshes)."""
        return {n: self._hill[name][n] for n in ("calls", "refreshes", "xmin")}

    def _fast_xmin(self, mats, N, key, name):
        """``(xmin, k)``: the Hill threshold ``lambda_(k+1)`` (pooled over the slices) from
        an exact ``eigh`` of the Gram matrices at calls ``0, refresh, 2 refresh, ...`` of
        this layer (host syncs there), held in between (Python counting only). The value
        is the held constant; its gradient flows along the held eigenvector ``u``
        (``xmin + q - q.detach()``, ``q = |W u|^2``): exact at a refresh."""
        st = self._hill.setdefault(key, {"calls": 0, "refreshes": 0, "xmin": None})
        k = hill_tail_size(N, self.tail_fraction)
        wide = mats.shape[-2] < mats.shape[-1]
        where = (tuple(mats.shape), mats.device, mats.dtype)
        if st["calls"] % self.refresh == 0 or st.get("where") != where:  # or a new shape
            with torch.no_grad():
                W = mats.detach()
                evals, vecs = torch.linalg.eigh(W @ W.mT if wide else W.mT @ W)
                flat = evals.reshape(-1)
                pos = int(torch.sort(flat).indices[N - k - 1])
                b, j = divmod(pos, evals.shape[-1])
            xmin = flat[pos]
            if not bool(xmin > 0):
                raise ValueError(f"weighted alpha{_where(name)}: the Hill threshold "
                                 f"eigenvalue lambda_({k + 1}) is zero; lower tail_fraction")
            st.update(xmin=xmin, vec=vecs[b, :, j].clone(), slice=b, where=where,
                      refreshes=st["refreshes"] + 1)
        st["calls"] += 1
        Wb = mats[st["slice"]]
        q = ((Wb.mT if wide else Wb) @ st["vec"]).square().sum()
        return st["xmin"] + (q - q.detach()), k

    def _fast(self, weight, mats, N, name):
        """Hill, ``alpha = 1 + k / S`` at the held ``xmin``: ``S = tr h(G)``,
        ``h(lambda) = max(ln(lambda/xmin), 0)``, by
        :func:`~bayes_spectral.spectra.stochastic.spectral_sum` on ``[0, b]``,
        ``b = (1 + bound_margin) lambda_max``; value ``alpha log(lambda_max)`` with
        ``lambda_max = |W v|^2`` (block iteration's Ritz vector ``v``, gradient through it)."""
        key = self._key(weight, name)
        xmin, k = self._fast_xmin(mats, N, key, name)
        lams, _, v = self._top_eigen(mats, key)
        lam = (mats @ v.unsqueeze(-1)).square().sum((-2, -1)).amax()

        def h(x):
            return torch.log((x / xmin).clamp_min(1.0))

        S = spectral_sum(mats, h, lams * (1.0 + self.bound_margin), self.degree, self.probes,
                         generator=self._generator(mats.device)).sum()
        return (1.0 + k / S) * self._log_max(lam)

    def _exact(self, evals, name):
        if self.estimator == "hill":
            fit = fit_powerlaw(evals, xmin="hill", tail_fraction=self.tail_fraction, name=name)
        else:
            fit = fit_powerlaw(evals, name=name, **self.fit_kwargs)
        return fit.alpha * self._log_max(evals[-1])

    def _sizes(self, pooled, name):
        if self.estimator == "hill":  # the top k and the xmin eigenvalue
            return hill_tail_size(pooled.shape[-1], self.tail_fraction) + 1
        return int(fit_powerlaw(pooled, name=name, **self.fit_kwargs).num_tail)

    def _tracked(self, top, total, N, name):
        if self.estimator == "hill":  # top: the k largest and xmin, descending
            alpha = hill_estimator(top.flip(-1), top.shape[-1] - 1, name=name).alpha
        else:
            alpha = alpha_at_index(top.flip(-1), 0)
        return alpha * self._log_max(top[0])

    def _tracked_grad(self, top, total, N):
        """``alpha = 1 + c/S``, ``S = sum_j ln lambda_j - n ln xmin`` over the ``n`` tracked
        values (``xmin = top[-1]``; ``c = n`` for KS's fixed index, ``c = n - 1 = k`` for
        Hill, whose xmin term is zero in ``S`` but not counted):
        ``d alpha/d lambda_j = -c/(S^2 lambda_j)``, for ``xmin`` ``+c (n-1)/(S^2 xmin)``;
        ``d R = log(lambda_max) d alpha + alpha/(lambda_max ln b) d lambda_max`` (base b)."""
        n = top.shape[-1]
        c = n - 1 if self.estimator == "hill" else n
        logs = torch.log(top)
        S = float(logs.sum()) - n * float(logs[-1])
        if not S > 0:  # a flat tail: alpha is infinite and the call raises, naming the layer
            return torch.full_like(top, math.nan), 0.0
        alpha = 1.0 + c / S
        ln_base = _LOGS[self.log][1]
        log_max = float(logs[0]) / ln_base
        d = (-c / (S * S) * log_max) / top
        d[-1] = c * (n - 1) / (S * S * float(top[-1])) * log_max
        d[0] += alpha / (float(top[0]) * ln_base)
        return d, 0.0


class PowerLawPrior(_TailPenalty):
    """``-coef * sum_i log f(lambda_i)``, ``f`` the spliced exponential / power-law law.

    The negative penalty-measure log-density of ``PowerLawSpectrum(alpha, tau, ...,
    xmin, xmin_quantile, measure="penalty")``, computed by
    :mod:`bayes_spectral.spectra.laws` (the same function the distribution uses). Give
    ``xmin`` (a value, default ``tau``) or ``xmin_quantile`` (``xmin = lambda_(floor(q N))``
    of the current ascending ESD: the index is chosen without gradient, the gradient flows
    through that eigenvalue, exactly as in ``PowerLawSpectrum``).

    Caution with ``xmin_quantile``: ``Z -> 0`` as ``xmin -> 0``, so the penalty decreases
    without bound when the eigenvalues at and below the quantile collapse (rank collapse is
    rewarded: with ``q = 0.5``, shrinking the 12 smallest singular values of a 20 x 20
    Gaussian matrix 1000-fold lowers it from 182 to 27). Prefer a fixed ``xmin``; a
    quantile xmin that is numerically zero raises.

    ``estimator="hill"`` (instead of ``xmin`` / ``xmin_quantile``): xmin is the Hill
    threshold of :class:`WeightedAlpha`'s Hill estimator, the ``(k+1)``-th largest
    eigenvalue, ``k = floor(tail_fraction N)`` clipped to ``[1, N-1]`` (a quantile xmin at
    index ``N - k - 1``; same caution). ``estimator="ks"`` (default) keeps the rule above.
    ``tracked=True`` then holds ``~N/2`` eigenpairs: wider than the tracker's ``wide = 0.4``,
    so every call decomposes (expected).

    ``mode="subspace"`` (fixed ``xmin`` only; the recommended mode, cheaper and far more
    accurate than ``"fast"``): the eigenpairs ``>= xmin`` by a warm-started fixed-size block,
    deterministic, the exact gradient through the Ritz pairs, no host sync between the
    block checks every ``refresh_every = 16`` calls (module docstring). ``mode="fast"``
    (Hutchinson x Chebyshev) stays available.
    """

    label = "power-law prior"

    def __init__(self, alpha: float, tau: float, xmin: float | None = None,
                 xmin_quantile: float | None = None, coef: float = 1.0, tracked: bool = False,
                 conv: ConvMode = "pool", refresh_every: int | None = None,
                 tol: float = 1e-3, margin: int | None = None, estimator: str = "ks",
                 tail_fraction: float = 0.5, mode: str | None = None, probes: int = 16,
                 degree: int = 32, power_iters: int | None = None, block: int = 8,
                 bound_margin: float = 0.1, seed: int = 0) -> None:
        super().__init__(coef, tracked, conv, refresh_every, tol, margin, mode)
        self._set_fast(power_iters, block, probes, degree, bound_margin, seed)
        self.estimator = _check_choice(estimator, _ESTIMATORS, "estimator", "PowerLawPrior")
        self.tail_fraction = _check_fraction(tail_fraction, "PowerLawPrior")
        if estimator == "hill" and (xmin is not None or xmin_quantile is not None):
            raise ValueError("PowerLawPrior: estimator='hill' sets xmin itself; give no xmin "
                             "or xmin_quantile")
        if not float(alpha) > 1:
            raise ValueError(f"alpha must be > 1 for a normalisable tail, got {alpha}")
        self.alpha = float(alpha)
        self.tau = check_positive(tau, "tau")
        if xmin is not None and xmin_quantile is not None:
            raise ValueError("give xmin or xmin_quantile, not both")
        if xmin is None and xmin_quantile is None and estimator != "hill":
            xmin = tau  # PowerLawSpectrum's default
        self.xmin = None if xmin is None else check_positive(xmin, "xmin")
        if xmin_quantile is not None and not 0.0 <= float(xmin_quantile) < 1.0:
            raise ValueError(f"xmin_quantile must be in [0, 1), got {xmin_quantile}")
        self.xmin_quantile = None if xmin_quantile is None else float(xmin_quantile)
        self.min_evals = 2 if estimator == "hill" else 1
        if self.mode in ("fast", "subspace") and self.xmin is None:
            raise ValueError(f"PowerLawPrior: mode={self.mode!r} needs a fixed xmin (a quantile "
                             "or Hill xmin is a counting problem: use tracked=True)")

    _SUBSPACE, _RITZ_TOTAL = True, True

    def _log_z(self):
        """``log Z`` of the spliced law in Python floats (no host-to-device copy)."""
        r = self.xmin / self.tau
        return math.log(self.tau * -math.expm1(-r)
                        + math.exp(-r) * self.xmin / (self.alpha - 1))

    def _ritz_threshold(self, theta, N):
        return self.xmin

    def _ritz_value(self, theta, total, N):
        """``coef (||W||_F^2/tau - sum_i h(theta_i) + N log Z)`` over the Ritz values (the
        bulk exact through ``total = ||W||_F^2``, as ``spliced_powerlaw_spectrum_sum``)."""
        return self.coef * (total / self.tau - self._tail_function(theta).sum()
                            + N * self._log_z())

    def _ritz_grad(self, theta, N):
        """``(dR/dtheta, dR/d||W||^2) = (coef [theta >= xmin] (alpha/theta - 1/tau),
        coef/tau)``."""
        c = torch.where(theta >= self.xmin, self.alpha / theta - 1.0 / self.tau, 0.0)
        return c * self.coef, self.coef / self.tau

    def _tail_function(self, lam):
        """``h(lambda) = [lambda >= xmin] ((lambda - xmin)/tau - alpha ln(lambda/xmin))``:
        ``log f(lambda) = -log Z - lambda/tau + h(lambda)`` (continuous, kink at xmin)."""
        xmin, tau = self.xmin, self.tau
        ratio = (lam / xmin).clamp_min(1.0)
        return torch.where(lam >= xmin, (lam - xmin) / tau - self.alpha * torch.log(ratio), 0.0)

    def _fast(self, weight, mats, N, name):
        """``||W||_F^2/tau - tr h(G) + N log Z``: the bulk exact, ``tr h`` by
        :func:`~bayes_spectral.spectra.stochastic.spectral_sum` on ``[0, b]``,
        ``b = (1 + bound_margin) lambda_max`` (block iteration, no gradient)."""
        upper = self._top_eigen(mats, self._key(weight, name))[0] * (1.0 + self.bound_margin)
        tail = spectral_sum(mats, self._tail_function, upper, self.degree, self.probes,
                            generator=self._generator(mats.device)).sum()
        return weight.square().sum() / self.tau - tail + N * self._log_z()

    def _num_top(self, N):
        """With ``xmin_quantile``: how many of the ``N`` eigenvalues are ``>= xmin``
        (``xmin = lambda_(floor(q N))`` ascending, the ``N - floor(q N)``-th largest);
        Hill: ``k + 1`` (``xmin`` the ``(k+1)``-th largest)."""
        if self.estimator == "hill":
            return hill_tail_size(N, self.tail_fraction) + 1
        return N - int(self.xmin_quantile * N)

    def _xmin_exact(self, evals, name=None):
        if self.xmin is not None:
            return self.xmin
        N = evals.shape[-1]
        xmin = evals[N - self._num_top(N)]
        self._guard_quantile_xmin(xmin, evals[-1], N, name)
        return xmin

    def _guard_quantile_xmin(self, xmin, lam_max, N, name):
        """Raise when the quantile xmin is numerically zero, ``<= lambda_max (N eps)^2``:
        the penalty is unbounded below as ``xmin -> 0`` (rank collapse)."""
        cut = float(lam_max.detach()) * (N * torch.finfo(lam_max.dtype).eps) ** 2
        x = float(xmin.detach())
        rule = ("estimator='hill'" if self.estimator == "hill"
                else f"xmin_quantile={self.xmin_quantile}")
        if not x > cut:
            raise ValueError(
                f"power-law prior{_where(name)}: {rule} picks "
                f"eigenvalue {x:.3g}, numerically zero (<= {cut:.3g}): the rank collapsed "
                "and the penalty is not finite (unbounded below as xmin -> 0); use a fixed "
                "xmin or a smaller xmin_quantile")

    def _exact(self, evals, name):
        xmin = self._xmin_exact(evals, name)
        return -spliced_powerlaw_log_pdf(evals, self.alpha, xmin, self.tau).sum()

    def _sizes(self, pooled, name):
        N = pooled.shape[-1]
        if self.xmin is None:
            return self._num_top(N)
        return int((pooled >= self.xmin).sum()) + 1

    def _complete(self, evals, need):
        # every eigenvalue >= xmin must be inside the certified block of each slice
        return self.xmin is None or bool((evals[..., need - 1] < self.xmin).all())

    def _tracked(self, top, total, N, name):
        if self.xmin is None:
            xmin = top[self._num_top(N) - 1]
            self._guard_quantile_xmin(xmin, top.amax(), N, name)
        else:
            xmin = self.xmin
        return -spliced_powerlaw_spectrum_sum(top, total, N, self.alpha, xmin, self.tau)

    def _tracked_grad(self, top, total, N):
        """Minus the derivatives of ``sum_i log f(lambda_i)`` (spliced law, ``a = alpha``):
        ``-a/lambda_i + 1/tau`` for tail eigenvalues (``>= xmin``), ``-1/tau`` for the total;
        with ``xmin_quantile`` the xmin eigenvalue also moves ``xmin``:
        ``n_tail (a/xmin - 1/tau) - N d log Z/d xmin``, with ``r = xmin/tau`` and
        ``d Z/d xmin = e^{-r} (1 + (1 - r)/(a - 1))``."""
        a, tau = self.alpha, self.tau
        j = None
        if self.xmin is None:
            j = self._num_top(N) - 1
            xmin = float(top[j])
            if not xmin > 0:  # a zero xmin: the value is not finite and the call raises
                return torch.full_like(top, math.nan), 1.0 / tau
        else:
            xmin = self.xmin
        tail = top >= xmin
        d = torch.where(tail, -a / top + 1.0 / tau, 0.0)
        if j is not None:
            r = xmin / tau
            Z = tau * -math.expm1(-r) + math.exp(-r) * xmin / (a - 1)
            dlogZ = math.exp(-r) * (1.0 + (1.0 - r) / (a - 1)) / Z
            d[j] += int(tail.sum()) * (a / xmin - 1.0 / tau) - N * dlogZ
        return -d, 1.0 / tau


class FrechetPrior(RankOneFused, _TailPenalty):
    """``-coef * [log Frechet(lambda_max; a, s, loc) + sum_{i<N} log Exp(lambda_i; tau)]``.

    The negative penalty-measure log-density of ``FrechetTopEigenvalue(concentration,
    scale, tau, ..., loc, measure="penalty")`` (Frechet on ``lambda_max = sigma_max^2``,
    exponential with mean ``tau`` on the other ``N - 1`` eigenvalues), through
    :func:`~bayes_spectral.spectra.laws.frechet_log_pdf` and ``exponential_log_pdf``.
    The exponential part is linear in the eigenvalues, so it needs only their sum
    ``||W||_F^2 - lambda_max``: ``sum_i log Exp(lambda_i) = (N-1) log Exp(mean lambda_i)``.

    ``mode="fused"`` (through :class:`~bayes_spectral.penalties.Regularizer`;
    :class:`~bayes_spectral.penalties.fused.RankOneFused`): like ``SpectralNorm(mode=
    "fused")``, one block power step per training step rides along with each hooked
    ``nn.Linear``'s forward/backward (layers of ``>= fuse_min`` entries) on a kept
    orthonormal 2-column block ``V`` (16 block steps when a layer's state is created):
    right after the forward GEMM ``R = W V`` and ``total = ||W||_F^2``; after the backward
    the top Ritz pair of ``R^T R`` (2 x 2, closed form) gives ``v = V y``, ``r = R y``,
    ``lambda = |r|^2``, then ``grad += 2 R'(lambda) r v^T + (2 coef/tau) W``
    (``R' = coef ((1+a)/x - a s^a x^{-a-1} - 1/tau)``, ``x = lambda - loc``) and
    ``V <- orth(W^T R)``. No host sync. Bias: ``lambda <= lambda_max`` (a Ritz value one
    step behind the weights), equal at convergence; along a digits Adam trajectory (lr
    1e-2) within 5e-5 relative with gradient cosine >= 0.9998 from step 20 (2.6e-4 /
    0.99 in the first fast-moving steps; ``tests/penalties/test_fused_frechet.py``).
    Other 2-D rows (and ``conv="flatten"`` kernels) get the identical step in
    ``accumulate_grad``; pooled conv kernels the fast mode's block iteration. Every
    backward adds the gradient (with ``k`` accumulated micro-batches use ``coef / k``);
    ``Regularizer(..., every=k)``: only the due steps' backward, ``k`` times, after catch-up
    block steps (:class:`~bayes_spectral.penalties.fused.Cadence`; every=8 along the same
    trajectory: within 3.5e-5, cosine >= 0.9998).
    """

    label = "Frechet prior"
    _PARTS = ("tracker", "need", "top", "v")

    def __init__(self, concentration: float, scale: float, tau: float, loc: float = 0.0,
                 coef: float = 1.0, tracked: bool = False, conv: ConvMode = "pool",
                 refresh_every: int = 100, tol: float = 1e-3,
                 margin: int | None = None, mode: str | None = None,
                 power_iters: int = 1, block: int = 8, seed: int = 0,
                 fuse_min: int = 65536) -> None:
        fused = mode == "fused"
        if fused and tracked:
            raise ValueError("FrechetPrior: tracked=True contradicts mode='fused'")
        super().__init__(coef, tracked, conv, refresh_every, tol, margin,
                         "fast" if fused else mode)
        self._set_fast(power_iters, block, seed=seed)
        if fused:
            self.mode = "fused"
        self._init_fused(fuse_min, "FrechetPrior")
        self.concentration = check_positive(concentration, "concentration")
        self.scale = check_positive(scale, "scale")
        self.tau = check_positive(tau, "tau")
        self.loc = float(loc)
        self.min_evals = 1

    def _log_density(self, lam_max, rest_sum, n_rest):
        out = frechet_log_pdf(lam_max, self.concentration, self.scale, self.loc)
        if n_rest:
            out = out + n_rest * exponential_log_pdf(rest_sum / n_rest, self.tau)
        return out

    def _exact(self, evals, name):
        out = frechet_log_pdf(evals[-1], self.concentration, self.scale, self.loc)
        return -(out + exponential_log_pdf(evals[:-1], self.tau).sum())

    def _sizes(self, pooled, name):
        return 1

    def _fast(self, weight, mats, N, name):
        """``lambda_max = |W v|^2``, ``v`` the top Ritz vector of the warm-started block
        (largest over the slices), the rest through ``||W||_F^2 - lambda_max``; gradient
        ``2 (W v) v^T`` through ``lambda_max``."""
        v = self._top_eigen(mats, self._key(weight, name))[2]
        lam = (mats @ v.unsqueeze(-1)).square().sum((-2, -1)).amax()
        return -self._fast_log_density(lam, weight.square().sum() - lam, N - 1)

    def _fast_log_density(self, lam, rest_sum, n_rest):
        """``_log_density`` with the parameters as Python floats (``frechet_log_pdf`` and
        ``exponential_log_pdf`` move them to the device: a host sync on CUDA); equal to it
        where ``z > 0`` (tested), NaN instead of ``-inf`` elsewhere."""
        a, s = self.concentration, self.scale
        z = (lam - self.loc) / s
        out = math.log(a) - math.log(s) - (1 + a) * torch.log(z) - z.pow(-a)
        if n_rest:
            out = out - n_rest * math.log(self.tau) - rest_sum / self.tau
        return out

    def _fast_grad(self, w, grad, name, scale):
        """Fast mode in place, no graph through ``W`` and no host sync: ``dR/dlambda_max``
        and ``dR/d||W||_F^2`` by autograd on the two scalars, then
        ``grad += scale (2 dR/dlambda (W v) v^T + 2 dR/d||W||^2 W)`` (the slice with the
        largest ``lambda``; ties share)."""
        mats, N = self._mats(w, name)
        lams, u, v = self._top_eigen(mats, self._key(w, name))
        flat = w.reshape(-1)
        top = lams.amax()
        lam, total = top.clone().requires_grad_(True), torch.dot(flat, flat).requires_grad_(True)
        with torch.enable_grad():
            value = -self.coef * self._fast_log_density(lam, total - lam, N - 1)
            d_lam, d_total = torch.autograd.grad(value, (lam, total))
        pick = (lams == top).to(lams.dtype)
        c = (2.0 * scale) * d_lam * pick / pick.sum()  # (B,)
        if mats.shape[0] == 1:
            grad.view(grad.shape[0], -1).addr_(u[0] * c[0], v[0])
        else:  # conv "pool": the slices, as views of grad
            gm = grad.view(grad.shape[0], grad.shape[1], -1).permute(2, 0, 1)
            gm.add_(torch.einsum("b,bm,bn->bmn", c, u, v))
        grad.addcmul_(w, (2.0 * scale) * d_total)  # one pass, d_total stays on the device
        return scale * value.detach()

    def _tracked(self, top, total, N, name):
        return -self._log_density(top[0], total - top[0], N - 1)

    def _rank_one_value(self, lam, total, n):
        """Fused mode: ``R = -coef log density(lambda, total - lambda)``, constants folded
        (few dispatches; ``x = lambda - loc``): ``coef (1+a) ln x + coef s^a x^{-a} +
        (coef/tau)(total - lambda) - coef (ln a + a ln s - (N-1) ln tau)``."""
        a, s, tau = self.concentration, self.scale, self.tau
        x = lam if self.loc == 0.0 else lam - self.loc
        v = torch.add(torch.log(x), x.pow(-a), alpha=s ** a / (1.0 + a))
        const = math.log(a) + a * math.log(s)
        if n > 1:
            v = torch.add(v, total - lam, alpha=1.0 / (tau * (1.0 + a)))
            const -= (n - 1) * math.log(tau)
        return v.mul(self.coef * (1.0 + a)).sub(self.coef * const)

    def _rank_one_coefs(self, lam, total, n):
        """``(2 dR/dlambda, 2 dR/dtotal)``: ``dR/dlambda = coef ((1+a)/x - a s^a x^{-a-1}
        - 1/tau)`` and ``coef/tau`` (``N = 1``: no bulk, no ``1/tau`` terms)."""
        a, s, k = self.concentration, self.scale, 2.0 * self.coef
        x = lam if self.loc == 0.0 else lam - self.loc
        c = torch.add(x.reciprocal(), x.pow(-a - 1.0), alpha=-a * s ** a / (1.0 + a))
        c = c.mul(k * (1.0 + a))
        if n > 1:
            return c.sub(k / self.tau), k / self.tau
        return c, None

    def _rank_one_rows_consts(self, ns: list, like: torch.Tensor) -> dict:
        """Batched rows (:mod:`~bayes_spectral.penalties.fused_rows`) of sizes ``ns``: per
        row ``kd = 2 coef / tau`` (0 where ``N = 1``), the bulk weight ``1/(tau (1+a))``
        (0 where ``N = 1``) and ``coef * const`` (:meth:`_rank_one_value`)."""
        a, s, tau, k = self.concentration, self.scale, self.tau, 2.0 * self.coef
        base = math.log(a) + a * math.log(s)
        kw = {"device": like.device, "dtype": like.dtype}
        return {"kd": torch.tensor([k / tau if n > 1 else 0.0 for n in ns], **kw),
                "bulk": torch.tensor([1.0 / (tau * (1.0 + a)) if n > 1 else 0.0 for n in ns],
                                     **kw),
                "const": torch.tensor([self.coef * (base - (n - 1) * math.log(tau) if n > 1
                                                    else base) for n in ns], **kw)}

    def _rank_one_rows_coefs(self, lam, total, consts):
        """:meth:`_rank_one_coefs` of all rows at once (``lam``, ``total``: ``(L,)``)."""
        a, s, k = self.concentration, self.scale, 2.0 * self.coef
        x = lam if self.loc == 0.0 else lam - self.loc
        c = torch.add(x.reciprocal(), x.pow(-a - 1.0), alpha=-a * s ** a / (1.0 + a))
        return c.mul(k * (1.0 + a)).sub(consts["kd"]), consts["kd"]

    def _rank_one_rows_value(self, lam, total, consts):
        """:meth:`_rank_one_value` of all rows at once."""
        a, s = self.concentration, self.scale
        x = lam if self.loc == 0.0 else lam - self.loc
        v = torch.add(torch.log(x), x.pow(-a), alpha=s ** a / (1.0 + a))
        v = torch.addcmul(v, total - lam, consts["bulk"])
        return v.mul(self.coef * (1.0 + a)).sub(consts["const"])

    def _one_vector(self, weight):
        """Fused mode: whether the row is one matrix (2-D, or ``conv="flatten"``)."""
        return weight.dim() == 2 or self.conv == "flatten"

    def weight_penalty(self, weight, name=None):
        if self.mode == "fused":
            if self._one_vector(weight):
                self._mats(weight, name)  # size check
                return self._fused_loss_value(weight, name)
            mats, N = self._mats(weight, name)
            return self.coef * self._fast(weight, mats, N, name)
        return super().weight_penalty(weight, name)

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """Fused mode: the hooks' value, or the identical step (pooled conv kernels: the
        fast mode's); other modes: :meth:`_TailPenalty.accumulate_grad`."""
        if self.mode == "fused" and grad.is_contiguous() and grad.shape == weight.shape:
            if self._one_vector(weight):
                return self._fused_grad(weight, grad, name, scale)
            return self._fast_grad(weight.detach(), grad, name, scale)
        return super().accumulate_grad(weight, grad, name=name, scale=scale)

    def state_dict(self) -> dict:
        """:meth:`_TailPenalty.state_dict`; fused mode adds ``v`` (the right vector) per
        hooked or one-vector layer."""
        state = super().state_dict()
        for key, part in self._fused_state().items():
            state["layers"].setdefault(key, {}).update(part)
        return state

    def _restored(self, state: dict) -> dict:
        out = super()._restored(state)
        out["_fused"] = self._restored_fused(layer_states(state, "FrechetPrior", self._PARTS),
                                             "FrechetPrior")
        return out

    def _tracked_grad(self, top, total, N):
        """``d/dx log Frechet(x) = (a z^{-a-1} - (1 + a)/z)/s``, ``z = (x - loc)/s``; the
        exponential part ``-(N-1) log tau - (total - lambda_max)/tau`` adds ``1/tau`` to
        ``lambda_max`` and ``-1/tau`` to the total (signs flipped: ``R = -log density``)."""
        a, s = self.concentration, self.scale
        z = (float(top[0]) - self.loc) / s
        d = torch.zeros_like(top)
        # z <= 0: the value is -inf and the call raises, naming the layer
        d[0] = -(a * z ** (-a - 1) - (1 + a) / z) / s if z > 0 else math.nan
        if N > 1:
            d[0] -= 1.0 / self.tau
            return d, 1.0 / self.tau
        return d, 0.0
