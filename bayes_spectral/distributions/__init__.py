"""Layer 2: spectral priors as Pyro distributions (one law per file).

``Frechet`` is a scalar law; the spectral priors have the weight shape as event shape and
offer a ``"penalty"`` and a ``"generative"`` measure (see ``_spectral.py``). ``PRIORS``
(``registry.py``) names prior factories ``weight_shape -> Distribution``; users register theirs.
"""

from ._spectral import SpectralDistribution
from .frechet import Frechet
from .frechet_top_eigenvalue import FrechetTopEigenvalue
from .gaussian_spectrum import GaussianSpectrum
from .powerlaw_spectrum import PowerLawSpectrum
from .registry import BUILTIN_PRIORS, PRIORS
from .spike_and_slab_spectrum import SpikeAndSlabSpectrum

__all__ = [
    "BUILTIN_PRIORS",
    "Frechet",
    "FrechetTopEigenvalue",
    "GaussianSpectrum",
    "PRIORS",
    "PowerLawSpectrum",
    "SpectralDistribution",
    "SpikeAndSlabSpectrum",
]
