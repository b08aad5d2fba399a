"""Layer 2: the prior registry, ``PRIORS``: name -> factory ``weight_shape -> Distribution``.

A factory gets the shape of one weight (``torch.Size``, e.g. ``(out, in)``) and returns the
prior of that weight, ready for :func:`bayes_spectral.bayesian`. The built-in entries are
the spectral priors of ``bayes-spectral compare``, in the penalty measure (what MAP as
regularisation maximises). Users add their own; ``compare`` and the CLI's ``--priors`` /
``--prior`` then accept the name:

    >>> from bayes_spectral.distributions import PRIORS, GaussianSpectrum
    >>> @PRIORS.register("wide_gaussian")
    ... def wide_gaussian(shape):
    ...     return GaussianSpectrum(2.0, shape, measure="penalty")
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions import Distribution

from ..registry import Registry
from .frechet_top_eigenvalue import FrechetTopEigenvalue
from .gaussian_spectrum import GaussianSpectrum
from .powerlaw_spectrum import PowerLawSpectrum
from .spike_and_slab_spectrum import SpikeAndSlabSpectrum

__all__ = ["BUILTIN_PRIORS", "PRIORS", "PriorFactory"]

PriorFactory = Callable[[torch.Size], Distribution]

#: prior name -> factory ``weight_shape -> Distribution``
PRIORS: Registry[PriorFactory] = Registry("prior")


@PRIORS.register("gaussian")
def gaussian(shape: torch.Size) -> Distribution:
    """``GaussianSpectrum(scale=0.5)``, penalty measure (MAP = weight decay ``1/0.5^2``)."""
    return GaussianSpectrum(0.5, shape, measure="penalty")


@PRIORS.register("powerlaw")
def powerlaw(shape: torch.Size) -> Distribution:
    """``PowerLawSpectrum(alpha=2, tau=0.5)``."""
    return PowerLawSpectrum(2.0, 0.5, shape)


@PRIORS.register("frechet_top")
def frechet_top(shape: torch.Size) -> Distribution:
    """``FrechetTopEigenvalue(concentration=2, scale=1, tau=0.5)``."""
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


@PRIORS.register("spike_and_slab")
def spike_and_slab(shape: torch.Size) -> Distribution:
    """``SpikeAndSlabSpectrum(pi=0.5, spike_scale=0.01, slab_scale=1)``."""
    return SpikeAndSlabSpectrum(0.5, 0.01, 1.0, shape)


#: the names registered by the library itself (before any user's module could add one)
BUILTIN_PRIORS: tuple[str, ...] = tuple(PRIORS.names())
