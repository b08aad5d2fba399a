"""Layer 3: the penalty registry, ``PENALTIES``: name -> factory ``coef -> Penalty | None``.

A factory gets the coefficient ``c`` (in the units of the penalty ``R``, see each class) and
returns the :class:`~bayes_spectral.penalties.Penalty` (``None``: no penalty). The built-in
entries are the deterministic baselines of ``bayes-spectral compare``; users add their own
and ``compare`` / the CLI's ``--baselines`` accept the name:

    >>> from bayes_spectral.penalties import PENALTIES, L1
    >>> PENALTIES.register("l1")(lambda c: L1(c))
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .base import Penalty
from .norms import StableRank, WeightDecay
from .spectral_norm import SpectralNorm
from .tail import WeightedAlpha

__all__ = ["BUILTIN_PENALTIES", "PENALTIES", "PenaltyFactory"]

PenaltyFactory = Callable[[float], Penalty | None]

#: penalty name -> factory ``coef -> Penalty | None``
PENALTIES: Registry[PenaltyFactory] = Registry("penalty")


@PENALTIES.register("none")
def none(coef: float) -> None:
    """No penalty, ``R = 0`` (``coef`` is ignored)."""
    return None


@PENALTIES.register("weight_decay")
def weight_decay(coef: float) -> Penalty:
    """:class:`WeightDecay`: ``R = c/2 sum ||W||_F^2``."""
    return WeightDecay(coef)


@PENALTIES.register("spectral_norm")
def spectral_norm(coef: float) -> Penalty:
    """:class:`SpectralNorm`: ``R = c/2 sum sigma_max(W)^2``."""
    return SpectralNorm(coef)


@PENALTIES.register("stable_rank")
def stable_rank(coef: float) -> Penalty:
    """:class:`StableRank`: ``R = c sum ||W||_F^2 / ||W||_2^2``."""
    return StableRank(coef)


@PENALTIES.register("weighted_alpha")
def weighted_alpha(coef: float) -> Penalty:
    """:class:`WeightedAlpha`: ``R = c sum alpha log10(lambda_max)``."""
    return WeightedAlpha(coef)


#: ``compare``'s default baselines: the names the library registers first (before any
#: user's module could add one; ``weighted_alpha_hill`` below is left out on purpose)
BUILTIN_PENALTIES: tuple[str, ...] = tuple(PENALTIES.names())

# Registered after ``BUILTIN_PENALTIES`` (``compare``'s default baselines): an option by
# name, not a default baseline, so the default ``compare`` run and its numbers are unchanged.
@PENALTIES.register("weighted_alpha_hill")
def weighted_alpha_hill(coef: float) -> Penalty:
    """:class:`WeightedAlpha` with Xiao et al.'s Hill estimator (``k = N/2``):
    ``R = c sum alpha_Hill log10(lambda_max)``."""
    return WeightedAlpha(coef, estimator="hill")

