"""Norm penalties: weight decay, L1, nuclear / Schatten-p, stable rank."""

from __future__ import annotations

import math

import torch

from .._checks import check_positive
from ..spectra.spectrum import ConvMode, as_matrices, esd, singular_values
from ..spectra.spectrum import stable_rank as _stable_rank
from ..spectra.subspace import TopEigen
from .base import Penalty, layer_states, restored_top_eigen
from .fused import RankOneFused

__all__ = ["WeightDecay", "L1", "SchattenNorm", "NuclearNorm", "StableRank"]

_MODES = ("exact", "fast")  # and "fused" (hooks installed by a Regularizer)


class WeightDecay(Penalty):
    """``coef/2 * ||W||_F^2`` (gradient ``coef * W``, the usual weight decay)."""

    label = "weight decay"

    def __init__(self, coef: float = 1.0) -> None:
        self.coef = check_positive(coef, "coef")

    def weight_penalty(self, weight, name=None):
        return 0.5 * self.coef * weight.square().sum()

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """``grad += scale coef W``; returns ``scale coef/2 ||W||_F^2``."""
        w = weight.detach()
        flat = w.reshape(-1)
        value = self._checked_value(0.5 * self.coef * torch.dot(flat, flat), w, name)
        grad.add_(w, alpha=scale * self.coef)
        return scale * value


class L1(Penalty):
    """``coef * sum |W_ij|``."""

    label = "L1"

    def __init__(self, coef: float = 1.0) -> None:
        self.coef = check_positive(coef, "coef")

    def weight_penalty(self, weight, name=None):
        return self.coef * weight.abs().sum()

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """``grad += scale coef sign(W)`` (0 at 0, as autograd); returns ``scale coef ||W||_1``."""
        w = weight.detach()
        value = self._checked_value(self.coef * w.abs().sum(), w, name)
        grad.add_(w.sign(), alpha=scale * self.coef)
        return scale * value


class SchattenNorm(Penalty):
    """``coef * ||W||_{S_p} = coef * (sum_i sigma_i^p)^(1/p)``, or its ``p``-th power.

    ``power=True`` returns ``coef * sum_i sigma_i^p`` (smooth in the singular values for
    ``p >= 1``, decoupled across layers). Conv kernels: ``conv="pool"`` (default) takes the
    singular values of all ``kh*kw`` slices together, ``conv="flatten"`` those of
    ``out x (in*kh*kw)``. Computed from singular values directly (not ``sqrt(lambda)``) so
    the gradient stays finite on rank-deficient weights for ``p >= 1``.
    """

    label = "Schatten"

    def __init__(self, p: float, coef: float = 1.0, power: bool = False,
                 conv: ConvMode = "pool") -> None:
        if not (p > 0) or math.isinf(p):
            raise ValueError(f"Schatten p must be a finite number > 0, got {p}")
        self.p = float(p)
        self.coef = check_positive(coef, "coef")
        self.power = bool(power)
        self.conv = conv

    def weight_penalty(self, weight, name=None):
        sv = singular_values(weight, conv=self.conv, name=name).reshape(-1)
        s = sv.pow(self.p).sum()
        return self.coef * (s if self.power else s.pow(1.0 / self.p))


class NuclearNorm(SchattenNorm):
    """``coef * sum_i sigma_i`` (Schatten-1), compare ``torch.linalg.matrix_norm(W, 'nuc')``."""

    label = "nuclear norm"

    def __init__(self, coef: float = 1.0, conv: ConvMode = "pool") -> None:
        super().__init__(1.0, coef=coef, conv=conv)


class StableRank(RankOneFused, Penalty):
    """``coef * sum_i lambda_i / lambda_max = coef * ||W||_F^2 / ||W||_2^2``.

    ``mode="exact"`` (default; ``None`` too): the full ESD every call. ``mode="fast"``:
    ``||W||_F^2 / lambda``, ``lambda = |W v|^2`` with ``v`` the top Ritz vector of a
    warm-started ``block``-column subspace iteration
    (:class:`~bayes_spectral.spectra.subspace.TopEigen`, ``power_iters`` steps per call,
    16 on a layer's first call; pooled conv slices: the largest slice's), gradient
    ``2 W / lambda - 2 ||W||_F^2 (W v) v^T / lambda^2`` by autograd at the detached ``v``.
    Deterministic; bias: ``lambda <= lambda_max`` (a Ritz value of a block a power step
    behind), so the value is ``>=`` the exact one, equal once the block has converged. The
    value's relative error is ``lambda``'s (unlike the Frechet prior's, where it is diluted
    by the bulk term), hence ``power_iters = 2`` by default: along a digits Adam trajectory
    (lr 1e-2, called every step) the worst relative error was 1.3e-4 (2.5e-3 with one step,
    in the first 10 steps), gradient cosine >= 0.99 (``tests/penalties/test_fast_mode.py``).
    Cost: ``2 power_iters`` thin ``m x n x block`` products with ``W`` per call.

    ``mode="fused"`` (through :class:`~bayes_spectral.penalties.Regularizer`;
    :class:`~bayes_spectral.penalties.fused.RankOneFused`): ``power_iters`` block power
    steps per training step on a kept orthonormal 2-column block ``V`` ride along with each
    hooked ``nn.Linear`` (``>= fuse_min`` entries): right after the forward GEMM
    ``power_iters - 1`` steps ``V <- orth(W^T W V)`` at the current weights, then ``R = W V``
    and ``total = ||W||_F^2``; after the backward the top Ritz pair (``v = V y``, ``r = R y``,
    ``lambda = |r|^2``), ``grad += -2 coef total/lambda^2 r v^T + (2 coef/lambda) W`` and
    ``V <- orth(W^T R)``; no host sync. Bias: ``lambda <= lambda_max`` (a Ritz value of a
    block that trails the moving weights), so the value is ``>=`` the exact one, equal at
    convergence; the relative error is ``lambda``'s (the Frechet prior's is diluted by its
    bulk term). Along the digits Adam trajectory (steps 20-119, every step checked):
    ``power_iters=2`` (default) within 4.3e-4 relative, gradient cosine >= 0.998 (2.9e-4 /
    0.9992 at steps 20, 30, ...); ``power_iters=1`` (one step per training step, two thin
    products fewer) 2.4e-3 / 0.992: the top singular values there are within 4-10% of each
    other, so a 2-column block one step behind converges slowly (``lambda_3/lambda_1``
    ~0.6-0.75 per step) while Adam moves it. Other 2-D rows (and ``conv="flatten"``) get
    the identical step in ``accumulate_grad``, pooled conv kernels the fast mode's block.
    ``Regularizer(..., every=k)``: on calls ``0, k, ...`` only, ``k`` times the gradient,
    after catch-up block steps (:class:`~bayes_spectral.penalties.fused.Cadence`).
    """

    label = "stable rank"

    def __init__(self, coef: float = 1.0, conv: ConvMode = "pool", mode: str | None = "exact",
                 power_iters: int = 2, block: int = 8, seed: int = 0,
                 fuse_min: int = 65536) -> None:
        self.coef = check_positive(coef, "coef")
        self.conv = conv
        self.mode = "exact" if mode is None else mode
        if self.mode not in (*_MODES, "fused"):
            raise ValueError(f"StableRank: mode must be one of {_MODES} or 'fused' (hooks "
                             f"through a Regularizer), got {mode!r}")
        if int(power_iters) < 0 or int(block) < 1:
            raise ValueError(f"StableRank: mode='fast' needs power_iters >= 0 and block >= 1, "
                             f"got {power_iters}, {block}")
        self.power_iters, self.block, self.seed = int(power_iters), int(block), int(seed)
        self._tops: dict[str, TopEigen] = {}
        self._init_fused(fuse_min, "StableRank", extra=max(0, self.power_iters - 1))

    @property
    def stateful(self) -> bool:
        return self.mode != "exact"

    def state_dict(self) -> dict:
        """Fast mode: ``{"layers": {layer: {"top": block}}}`` (:class:`TopEigen` state);
        fused mode ``{"mode": "fused", "layers": {layer: {"v"} or {"top"}}}``."""
        layers = {k: {"top": t.state_dict()} for k, t in self._tops.items()}
        if self.mode != "fused":
            return {"layers": layers}
        layers.update(self._fused_state())
        return {"mode": "fused", "layers": layers}

    def _restored(self, state: dict) -> dict:
        saved = state.get("mode", "fast") if isinstance(state, dict) else None
        if (saved == "fused") != (self.mode == "fused"):
            raise ValueError(f"StableRank: the state is for mode {saved!r}, this penalty's "
                             f"mode is {self.mode!r}")
        layers = layer_states(state, "StableRank", ("top", "v"))
        tops = {key: restored_top_eigen(st["top"], "StableRank", key, block=self.block,
                                        power_iters=self.power_iters, seed=self.seed)
                for key, st in layers.items() if "top" in st or "v" not in st}
        return {"_tops": tops, "_fused": self._restored_fused(layers, "StableRank")}

    #: ``coef total / lambda`` does not depend on ``N`` (batched rows: no per-``N`` masks)
    _rank_one_uses_n = False

    def _rank_one_value(self, lam, total, n):
        """Fused mode: ``coef total / lambda``."""
        return self.coef * total / lam

    def _rank_one_coefs(self, lam, total, n):
        """``(2 dR/dlambda, 2 dR/dtotal) = (-2 coef total/lambda^2, 2 coef/lambda)``."""
        d = lam.reciprocal().mul(2.0 * self.coef)
        return torch.mul(d, total).div(lam).neg(), d

    def _one_vector(self, weight):
        return weight.dim() == 2 or self.conv == "flatten"

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """Fused mode on one-matrix rows: the hooks' value or the identical step (no host
        sync); otherwise autograd of the call."""
        if self.mode == "fused" and self._one_vector(weight) and grad.is_contiguous() \
                and grad.shape == weight.shape:
            return self._fused_grad(weight, grad, name, scale)
        return super().accumulate_grad(weight, grad, name=name, scale=scale)

    def weight_penalty(self, weight, name=None):
        if self.mode == "fused" and self._one_vector(weight):
            return self._fused_loss_value(weight, name)
        if self.mode != "exact":
            return self.coef * self._fast(weight, name)
        return self.coef * _stable_rank(esd(weight, conv=self.conv, name=name))

    def _fast(self, weight, name):
        """``||W||_F^2 / max_b |W_b v_b|^2`` over the slices ``W_b`` of the stack."""
        if self.conv == "pool" and weight.dim() > 2:
            mats = as_matrices(weight, conv=self.conv, name=name)
        else:
            mats = weight.reshape(1, weight.shape[0], -1)
        key = self._key(weight, name)
        top = self._tops.get(key)
        if top is None:
            top = self._tops[key] = TopEigen(self.block, self.power_iters, seed=self.seed)
        v = top(mats)[2]
        lam = (mats @ v.unsqueeze(-1)).square().sum((-2, -1)).amax()
        return weight.square().sum() / lam
