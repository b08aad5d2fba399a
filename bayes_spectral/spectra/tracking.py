"""Layer 1: cheap tracking of the top of the ESD of a weight that changes slowly (training).

A full decomposition of ``W^T W`` costs ``O(m n min(m, n))`` per step, several times a
plain SGD step of an MLP. During training ``W`` moves little between steps, so the top-k
eigenvectors of the previous step are an excellent start: :class:`TailTracker` keeps them
and, per call, does

1. basis ``V`` (``k`` columns, from the last call) extended by ``P``, the motion of the
   ``min(momentum, need)`` leading Ritz vectors over the last call (LOBPCG's third
   block; with SGD momentum the eigenvectors move smoothly, so ``span(V, P)`` already
   contains most of the next step);
2. ``Y = W V`` (the only product that carries gradient), ``Z = W^T Y = W^T W V``;
3. Rayleigh-Ritz: ``H = V^T Z``, ``H = S diag(theta) S^T``, the ``k`` leading pairs kept;
4. drift test: relative residuals ``r_i = ||W^T W u_i - theta_i u_i|| / theta_1`` of the
   Ritz vectors ``u_i = V s_i`` over the ``need`` leading pairs;
5. if the test fails, up to ``max_iter`` extra Chebyshev-filtered block power + Ritz steps
   (no gradient), then a full decomposition if it still fails;
6. one filtered power step for the next call: ``V <- qr((W^T W - c) V S)`` (no product).

Cost: three ``m x n x k`` products (two forward, one in backward) plus ``O(n k^2 + k^3)``.
The returned eigenvalues are ``lambda_i = ||W u_i||^2`` with ``u_i`` detached, whose
gradient ``2 W u_i u_i^T`` is the exact eigenvalue gradient when ``u_i`` is an
eigenvector (Hellmann-Feynman); eigenvalue errors of Rayleigh-Ritz are quadratic in the
subspace error, so they are far smaller than the residuals.

A full decomposition (float64 ``eigh`` of the ``n x n`` Gram ``W^T W``, ``n = min(m,
n)``) is redone when there is no state yet, the shape or ``k`` changed, every
``refresh_every`` calls, or when the drift test fails (``max r_i > tol``); the result then
comes from the full decomposition in the same call, so a large jump of ``W`` (a random
perturbation, a learning-rate spike) never returns stale values.

Eigenvalue errors are ~ residual^2 / gap, but gradients ``2 W u u^T`` are only first
order in the eigenvector error, so the gradient sets ``tol``. Penalty values and gradients
against exact (same xmin index) along the trajectory of ``tests/spectra/test_tracking.py`` (MLP
64-256-128-10 on sklearn digits, SGD lr 0.2, 240 steps, float64, after 20 warm-up steps;
relative error of the value / of the gradient norm; extra power steps per call on the
tracked layers; weighted alpha's 64-wide layer is ``wide``, see below):

=========  ==================  ===================  ============
tol        weighted alpha      Frechet (need=1)     iters/call
=========  ==================  ===================  ============
5e-3       6.9e-6 / 1.7e-3     2.6e-6 / 4.4e-3      0.4-0.9
1e-3       6.6e-8 / 4.7e-4     8.6e-8 / 2.6e-4      1.4-2.0
3e-4       4.6e-8 / 2.1e-4     1.2e-9 / 4.0e-5      1.7-2.5
=========  ==================  ===================  ============

Hence the defaults ``tol=1e-3`` (gradients within 1e-3), ``max_iter=8`` (an extra
iteration costs ``2 m n k`` without gradient, far below a decomposition),
``refresh_every=100`` (bounds how long an eigenvector growing into the block from below
can be missed) and a margin of ``max(16, need)`` extra columns (``k = need + margin``,
:func:`tail_size`): a thin margin makes the slowest needed pair converge at
``lambda_{k+1}/lambda_need`` per step, close to 1 in a Marchenko-Pastur bulk (weighted
alpha on the MLP 784-512-512-10 of ``benchmarks/bench_penalties.py`` at init, need 9:
11 drift refreshes in 60 calls with a margin of 9, one with 16). ``tol`` is relative to
``lambda_max``. A perturbation of ``W`` as large as ``W`` fails the drift test even after
``max_iter`` steps and triggers the full decomposition. With a ``choose`` callback (the
penalties) every drift refresh doubles the margin (up to 16x). ``momentum=1`` (the top
pair's motion): on a momentum-SGD trajectory (tested) 2.15 -> 1.43 extra steps per call
at ``tol=3e-4``; on the MLP bench (SGD momentum 0.9, random data) the Frechet penalty's
2.7 -> 0.6 at ``tol=3e-4``.

The block stops paying off when it is wide (``benchmarks/bench_tracking.py``, float32
weights, 2 threads, against the float64 Gram decomposition, 34-60 ms at 512 x 512 and
512 x 784, 1.2-1.4x faster than a float32 ``svd``): one block step costs 0.03-0.08 of it
at k <= 64, 0.15 at k = min(m, n) / 4, 0.26-0.31 at 0.38 min(m, n) and 0.38-0.48 at half,
where a call with its usual extra step costs over half a decomposition and a failing one
(8 steps, then the decomposition) 4-5. Blocks wider than ``wide=0.4`` of ``min(m, n)`` are
not tracked: every call decomposes. This happens at random init, where the KS tail of a
Marchenko-Pastur spectrum holds a third of the eigenvalues, on small layers, and under
SVI, where the weights are sampled afresh at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

__all__ = ["REASONS", "TailTracker", "TailEstimate", "tail_size"]

#: why a call decomposed fully (``TailTracker.last_reason``); its index in ``state_dict``
REASONS = ("init", "shape", "k", "period", "wide", "drift")
_STATE_NUMBERS = ("k", "need", "boost", "since", "num_calls", "num_refreshes", "num_iters",
                  "last_residual", "last_reason")


def tail_size(need: int, dim: int, margin: int | None = None) -> int:
    """Tracked block size ``k = min(dim, need + margin)``, default margin ``max(16, need)``."""
    if margin is None:
        margin = max(16, need)
    return int(min(dim, need + margin))


@dataclass
class TailEstimate:
    """Top of the spectrum of a stack of matrices ``(B, m, n)``.

    ``evals``: ``(B, k)`` descending, ``||W u_i||^2`` (``u_i`` detached); the ``need``
    leading ones (those the drift test certifies) are differentiable, the margin ones are
    detached. ``full_evals``: ``(B, min(m, n))`` ascending and detached when this call did a
    full decomposition, else ``None``. ``refreshed``: whether it did; ``residual``: max
    relative residual of the ``need`` leading Ritz pairs before any refresh (``inf`` if no
    state). ``vectors`` ``U`` and ``images`` ``Y = W U`` (detached, ``W`` the oriented
    matrices, see :meth:`TailTracker.add_grad`): the Ritz pairs behind ``evals``.
    """

    evals: torch.Tensor
    full_evals: torch.Tensor | None
    refreshed: bool
    residual: float
    vectors: torch.Tensor | None = None
    images: torch.Tensor | None = None


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched product ``a @ b`` of a large ``a`` and a thin ``b``.

    A batch of one goes through a plain 2-D GEMM (bmm with a thin, transposed operand is
    several times slower on CPU); a thin ``b`` (fewer than 16 columns) is computed as
    ``(b^T a^T)^T``: MKL's GEMM with fewer than 16 output columns is 2-5x slower than the
    same product with the thin operand on the left (784 x 512 times 512 x 9: ~0.5 ms
    against ~0.13 ms on 2 cores).
    """
    if b.shape[-1] < 16 <= a.shape[-2]:
        return _mm(b.mT, a.mT).mT
    if a.shape[0] == 1:
        return (a[0] @ b[0]).unsqueeze(0)
    return a @ b


def _ritz_grad(U: torch.Tensor, Y: torch.Tensor, coef: torch.Tensor, transposed: bool,
               out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """``alpha * d/dM sum_i coef_i ||W u_i||^2 = 2 alpha Y diag(coef) U^T`` for ``W = M``
    (``M^T`` when ``transposed``: then ``2 alpha U diag(coef) Y^T``), ``Y = W U``; added to
    ``out`` in place when given (``(B, m, n)``, may be a strided view)."""
    left, right = (U, Y) if transposed else (Y, U)
    if left.shape[-1] == 1:  # rank one: an outer product
        left = left * (2 * alpha * coef.unsqueeze(-2))
        if out is None:
            return left * right.mT
        for b in range(out.shape[0]):  # contiguous vectors: a strided one is 10x slower
            out[b].addr_(left[b, :, 0].contiguous(), right[b, :, 0].contiguous())
        return out
    left = left * coef.unsqueeze(-2)
    if out is None:
        return (2 * alpha) * (left @ right.mT)
    if out.shape[0] == 1:
        out[0].addmm_(left[0], right[0].mT, alpha=2 * alpha)
    else:
        out.baddbmm_(left, right.mT, alpha=2 * alpha)
    return out


class _RitzValues(torch.autograd.Function):
    """``lambda_i = ||W u_i||^2`` with ``u_i`` detached, from a precomputed ``Y = W U``;
    backward ``2 Y diag(g) U^T`` in the orientation of ``mats`` (one GEMM of inner size
    ``k``, a rank-one update for ``k = 1``)."""

    @staticmethod
    def forward(ctx, mats, U, Y, transposed):
        ctx.save_for_backward(U, Y)
        ctx.transposed = transposed
        return Y.square().sum(-2)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        U, Y = ctx.saved_tensors
        return _ritz_grad(U, Y, g, ctx.transposed), None, None, None


class TailTracker:
    """Track the top-``k`` eigenpairs of ``W^T W`` for a stack ``(B, m, n)`` across calls.

    ``refresh_every`` (K): full decomposition at least every K calls. ``tol``: drift test
    threshold on the relative residual. ``max_iter``: extra block power + Rayleigh-Ritz
    steps tried (no gradient, ``2 m n k`` each) while the drift test fails, before falling
    back to a full decomposition. ``wide``: a block wider than ``wide * min(m, n)`` is not
    tracked, every call decomposes (a Marchenko-Pastur spectrum at random init can put a
    third of the eigenvalues in the KS tail, and weights sampled afresh at every SVI step
    cannot be tracked at all; the block steps would only add to the decomposition's cost).
    See the module docstring for the algorithm and the measurements behind the defaults.
    Statistics: ``num_calls``, ``num_refreshes``, ``last_reason`` (``"init"``, ``"shape"``,
    ``"k"``, ``"period"``, ``"wide"``, ``"drift"``, or ``None``).
    """

    def __init__(self, refresh_every: int = 100, tol: float = 1e-3, max_iter: int = 8,
                 jump: float = 0.1, wide: float = 0.4, momentum: int = 1) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {max_iter}")
        if not jump > 0:
            raise ValueError(f"jump must be > 0, got {jump}")
        if not 0 < wide <= 1:
            raise ValueError(f"wide must be in (0, 1], got {wide}")
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        self.momentum = int(momentum)
        self.refresh_every = int(refresh_every)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.jump = float(jump)
        self.wide = float(wide)
        self.num_iters = 0
        self.V: torch.Tensor | None = None
        self.X: torch.Tensor | None = None  # the Ritz vectors returned by the last call
        self.P: torch.Tensor | None = None  # their motion over that call
        self.k = 0
        self.need = 0
        self.boost = 1  # margin multiplier, doubled at every drift refresh (max 16)
        self._since = 0
        self.num_calls = 0
        self.num_refreshes = 0
        self.last_reason: str | None = None
        self.last_residual = float("inf")

    def reset(self) -> None:
        """Forget the tracked subspace (the next call decomposes fully)."""
        self.V = self.X = self.P = None

    def state_dict(self) -> dict:
        """The tracking state as tensors and plain numbers: the block ``V``, the last call's
        Ritz vectors ``X`` and their motion ``P`` (each left out while ``None``), the block
        sizes ``k`` / ``need``, the margin ``boost``, ``since`` (calls since the last full
        decomposition) and the statistics (``last_reason`` as its index in
        :data:`REASONS`, ``-1`` for ``None``). The settings (``refresh_every``, ``tol``, ...)
        are the constructor's, not state."""
        out = {"k": self.k, "need": self.need, "boost": self.boost, "since": self._since,
               "num_calls": self.num_calls, "num_refreshes": self.num_refreshes,
               "num_iters": self.num_iters, "last_residual": float(self.last_residual),
               "last_reason": -1 if self.last_reason is None
               else REASONS.index(self.last_reason)}
        for name in ("V", "X", "P"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.detach().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the tensors are copied; a block on another device
        than the next call's weight is decomposed afresh, ``last_reason == "shape"``)."""
        missing = [k for k in _STATE_NUMBERS if k not in state]
        if missing:
            raise ValueError(f"TailTracker.load_state_dict: the state lacks {missing} (not "
                             "a TailTracker.state_dict())")
        reason = int(state["last_reason"])
        if not -1 <= reason < len(REASONS):
            raise ValueError(f"TailTracker.load_state_dict: last_reason index {reason} is "
                             f"not in [-1, {len(REASONS)})")
        self.k, self.need, self.boost = int(state["k"]), int(state["need"]), int(state["boost"])
        self._since = int(state["since"])
        self.num_calls, self.num_refreshes = int(state["num_calls"]), int(state["num_refreshes"])
        self.num_iters = int(state["num_iters"])
        self.last_residual = float(state["last_residual"])
        self.last_reason = None if reason < 0 else REASONS[reason]
        for name in ("V", "X", "P"):
            t = state.get(name)
            setattr(self, name, None if t is None else t.detach().clone())

    @staticmethod
    def _orient(mats: torch.Tensor) -> torch.Tensor:
        # Track eigenvectors on the smaller side: W W^T and W^T W share their non-zero
        # eigenvalues, and the QR / Ritz work is O(min(m, n) k^2).
        return mats.mT if mats.shape[-2] < mats.shape[-1] else mats

    def _full(self, W: torch.Tensor, k: int, need: int, reason: str, choose):
        # float64 eigh of the small-side Gram W^T W (n x n): faster than a float32 svd(W)
        # (module docstring) and accurate to ~1e-16 lambda_max; a float32 Gram loses
        # eigenvalues below ~1e-6 lambda_max and moved the KS / quantile choice of the tail
        # (tests/spectra/test_tracking.py, rank-5-plus-noise weight)
        with torch.no_grad():
            W64 = W.to(torch.float64)
            full, vecs = torch.linalg.eigh(W64.mT @ W64)
        full, vecs = full.clamp_min(0).to(W.dtype), vecs.to(W.dtype)
        if choose is not None:
            k, need = choose(full)
            if reason == "drift":  # the block converged too slowly: widen its margin
                self.boost = min(2 * self.boost, 16)
            k = need + (k - need) * self.boost
        k = int(min(max(int(k), 1), vecs.shape[-1]))
        need = int(min(max(int(need), 1), k))
        self.k, self.need = k, need
        V = vecs[..., -k:].flip(-1).contiguous()
        self.V = self.X = V
        self.P = None
        self._since = 0
        self.num_refreshes += 1
        self.last_reason = reason
        return V, _mm(W, V), full

    def _estimate(self, mats, U, Y, need, full, refreshed, residual, graph) -> TailEstimate:
        if not graph:
            return TailEstimate(Y.square().sum(-2), full, refreshed, residual, U, Y)
        lead = _RitzValues.apply(mats, U[..., :need], Y[..., :need], self._transposed)
        if need < Y.shape[-1]:  # the margin columns: detached
            lead = torch.cat([lead, Y[..., need:].square().sum(-2)], -1)
        return TailEstimate(lead, full, refreshed, residual, U, Y)

    def add_grad(self, est: TailEstimate, coef: torch.Tensor, out: torch.Tensor,
                 alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * d/dM sum_i coef_i evals_i`` in place, ``M`` the ``(B, m, n)``
        stack given to the call that returned ``est`` (``out`` has its shape, and may be a
        strided view of a gradient). ``coef``: ``(B, j)`` for the ``j <= k`` leading
        columns. The closed form ``2 Y diag(coef) U^T`` of the eigenvalue gradient: what
        autograd through ``est.evals`` gives, without a graph."""
        j = coef.shape[-1]
        return _ritz_grad(est.vectors[..., :j], est.images[..., :j], coef, self._transposed,
                          out=out, alpha=alpha)

    def __call__(self, mats: torch.Tensor, k: int, need: int | None = None,
                 choose=None, graph: bool = True) -> TailEstimate:
        """Top-``k`` eigenvalues of ``W^T W`` for every matrix of ``mats`` (``(B, m, n)``).

        ``need`` (default ``k``): how many leading pairs the drift test checks; the other
        ``k - need`` columns are a margin that speeds up convergence of the needed ones.
        ``choose``: optional ``full_evals -> (k, need)`` called at every full decomposition
        with the ascending ``(B, min(m, n))`` spectrum (e.g. to re-fit a power-law tail and
        size the block from its ``num_tail``); the chosen sizes are kept until the next
        full decomposition (``self.k``, ``self.need``) and override the arguments.
        ``graph=False``: all ``evals`` detached (for :meth:`add_grad`, no autograd node).
        """
        W, k, need = self._check_call(mats, k, need, choose)
        self.num_calls += 1
        self._since += 1
        reason = self._refresh_reason(W, k)
        Wd = W.detach()
        if reason is not None:
            V, Y, full = self._full(Wd, k, need, reason, choose)
            self.last_residual = float("inf")
            return self._estimate(mats, V, Y, self.need, full, True, float("inf"), graph)
        step = self._refine(Wd, self._start_block(Wd), k, need)
        self.num_iters += step.apps
        self.last_residual = step.residual
        if not step.residual <= self.tol:  # the drift test (also catches NaN)
            V, Y, full = self._full(Wd, k, need, "drift", choose)
            return self._estimate(mats, V, Y, self.need, full, True, step.residual, graph)
        U, Y = self._advance(step, need)
        self.last_reason = None
        return self._estimate(mats, U, Y, need, None, False, step.residual, graph)

    def _check_call(self, mats: torch.Tensor, k: int, need: int | None, choose):
        """Validate a call; returns the oriented ``W`` and the block sizes ``(k, need)``
        (those of the last full decomposition when ``choose`` sizes the block)."""
        if mats.dim() != 3:
            raise ValueError(f"TailTracker expects a stack (B, m, n), got {tuple(mats.shape)}")
        W = self._orient(mats)
        self._transposed = W is not mats
        n = W.shape[-1]
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] for matrices {tuple(mats.shape[-2:])}")
        need = k if need is None else int(need)
        if not 1 <= need <= k:
            raise ValueError(f"need must be in [1, k={k}], got {need}")
        if choose is not None and self.V is not None:
            k, need = self.k, self.need
        return W, k, need

    def _refresh_reason(self, W: torch.Tensor, k: int) -> str | None:
        """Why this call must decompose fully (``None``: track the block)."""
        V, n = self.V, W.shape[-1]
        if V is None:
            return "init"
        if V.shape[:-1] != W.shape[:-2] + (n,) or V.device != W.device:
            return "shape"
        if V.shape[-1] != k:
            return "k"
        if self._since >= self.refresh_every:
            return "period"
        if k > self.wide * n:
            return "wide"  # a block this wide costs as much as the decomposition
        return None

    def _start_block(self, Wd: torch.Tensor) -> torch.Tensor:
        """The block of the last call, extended by ``P`` when momentum is on:
        ``qr([V, P])`` (LOBPCG's third block; ``P`` the motion of the leading Ritz vectors
        over the last call, smooth when training steps have momentum)."""
        V = self.V.to(Wd.dtype)
        if self.P is not None:  # set only with momentum > 0
            V = torch.linalg.qr(torch.cat([V, self.P.to(Wd.dtype)], -1)).Q
        return V

    def _refine(self, Wd: torch.Tensor, V: torch.Tensor, k: int, need: int) -> _RitzStep:
        """Rayleigh-Ritz on ``V``, then Chebyshev-filtered block power steps until the drift
        test passes, ``max_iter`` extra applications of ``W^T W`` are spent, or the first
        residual exceeds ``jump`` (the subspace is lost: a perturbation as large as ``W``
        gives ~0.2, training steps < 0.035; the caller then decomposes at once)."""
        apps = 0  # extra applications of W^T W (beyond the first Ritz step)
        with torch.no_grad():
            while True:
                step = _ritz_step(Wd, V, k, need)
                step.apps = apps
                if step.residual <= self.tol or apps >= self.max_iter or (
                        apps == 0 and not step.residual <= self.jump):
                    return step
                d = self._chebyshev_degree(step, need, apps)
                if d > 1:
                    step.F = _chebyshev_filter(Wd, step, d)
                apps += d
                V = torch.linalg.qr(step.F).Q

    def _chebyshev_degree(self, step: _RitzStep, need: int, apps: int) -> int:
        """Degree ``d`` of the next filter: it divides the error of pair ``need`` by
        ``T_d(x)``, ``x = 2 theta_need / theta_k - 1``; the smallest degree expected to pass
        the test (with a factor 2 of safety), within the ``max_iter`` budget, at most 4."""
        d = 1
        if step.c is None:  # no margin: plain power steps
            return d
        theta = step.theta
        ratio = float((theta[..., need - 1] / theta[..., -1]).amin())
        x = max(2.0 * ratio - 1.0, 1.0)
        want = 2.0 * step.residual / self.tol
        budget = self.max_iter - apps
        while d < budget and d < 4 and math.cosh(d * math.acosh(x)) < want:
            d += 1
        return d

    def _advance(self, step: _RitzStep, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the free power step ``qr(F)`` for the next call, the Ritz vectors ``U = V S``
        and their new direction ``P`` (the part of the ``min(momentum, need)`` leading ones
        outside the span of the last call's); returns ``(U, Y S)``."""
        X_old = self.X
        with torch.no_grad():
            self.V = torch.linalg.qr(step.F).Q  # the free power step, for the next call
            U, Y = step.VS, step.Y @ step.S
            p = min(self.momentum, need)
            if p and X_old is not None and X_old.shape == U.shape:
                lead = U[..., :p]
                self.P = lead - X_old @ (X_old.mT @ lead)  # the part new to span(X_old)
            else:
                self.P = None
            self.X = U
        return U, Y


@dataclass
class _RitzStep:
    """One Rayleigh-Ritz step on a block ``V``: ``Y = W V``, the ``k`` leading Ritz values
    ``theta`` and rotation ``S``, ``ZS = W^T W V S``, ``VS = V S``, the drift residual, the
    next (filtered) block ``F``, the filter centre ``c`` (``None`` without a margin) and the
    extra applications of ``W^T W`` spent before this step (``apps``)."""

    Y: torch.Tensor
    theta: torch.Tensor
    S: torch.Tensor
    ZS: torch.Tensor
    VS: torch.Tensor
    residual: float
    F: torch.Tensor
    c: torch.Tensor | None
    apps: int = 0


def _ritz_step(Wd: torch.Tensor, V: torch.Tensor, k: int, need: int) -> _RitzStep:
    """``Z = W^T W V``, ``H = V^T Z = S diag(theta) S^T`` (``k`` leading pairs), relative
    residuals ``r_i = ||Z s_i - theta_i V s_i|| / theta_1`` over the ``need`` leading ones.

    Next block: degree-one Chebyshev filter for the unwanted interval ``[0, theta_k]``
    (centre and half width ``c = theta_k / 2``), ``(W^T W - c) V S``, free from ``Z``: per
    step the error of pair ``i`` shrinks by ``theta_k / (2 theta_i - theta_k)`` instead of
    ``lambda_{k+1} / lambda_i`` (0.82 instead of 0.9 at a Marchenko-Pastur edge).
    """
    Y = _mm(Wd, V)
    Z = _mm(Wd.mT, Y)  # W^T W V
    theta, S = torch.linalg.eigh(V.mT @ Z)  # reads the lower triangle only
    theta, S = theta.flip(-1)[..., :k], S.flip(-1)[..., :k]
    ZS, VS = Z @ S, V @ S
    R = ZS[..., :need] - VS[..., :need] * theta[..., :need].unsqueeze(-2)
    top = theta[..., :1].clamp_min(torch.finfo(theta.dtype).tiny)
    residual = float((R.norm(dim=-2) / top).amax())
    c = None
    if need < k:
        c = 0.5 * theta[..., -1:].unsqueeze(-1)
        F = ZS - VS * c
    else:
        F = ZS
    return _RitzStep(Y, theta, S, ZS, VS, residual, F, c)


def _chebyshev_filter(Wd: torch.Tensor, step: _RitzStep, d: int) -> torch.Tensor:
    """Degree-``d`` Chebyshev filter of ``V S`` by the recurrence
    ``X_{j+1} = 2 (W^T W - c) X_j / c - X_{j-1}`` from ``X_0 = V S``, ``X_1 = F / c``."""
    c = step.c
    X_prev, X = step.VS, step.F / c
    for _ in range(d - 1):
        AX = _mm(Wd.mT, _mm(Wd, X))
        X_prev, X = X, 2.0 * (AX - X * c) / c - X_prev
    return X
