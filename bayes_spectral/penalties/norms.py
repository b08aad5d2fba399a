"""Norm penalties: weight decay, L1, nuclear / Schatten-p, stable rank."""

from __future__ import annotations

import math

import torch

from .._checks import check_positive
from ..spectra.spectrum import ConvMode, esd, singular_values
from ..spectra.spectrum import stable_rank as _stable_rank
from .base import Penalty

__all__ = ["WeightDecay", "L1", "SchattenNorm", "NuclearNorm", "StableRank"]


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


class StableRank(Penalty):
    """``coef * sum_i lambda_i / lambda_max = coef * ||W||_F^2 / ||W||_2^2`` (exact SVD)."""

    label = "stable rank"

    def __init__(self, coef: float = 1.0, conv: ConvMode = "pool") -> None:
        self.coef = check_positive(coef, "coef")
        self.conv = conv

    def weight_penalty(self, weight, name=None):
        return self.coef * _stable_rank(esd(weight, conv=self.conv, name=name))
