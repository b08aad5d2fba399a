"""Layer 2: spectral priors as Pyro distributions (one law per file).

``Frechet`` is a scalar law; the spectral priors have the weight shape as event shape and
offer a ``"penalty"`` and a ``"generative"`` measure (see ``_spectral.py``).
"""

from ._spectral import SpectralDistribution
from .frechet import Frechet
from .frechet_top_eigenvalue import FrechetTopEigenvalue
from .gaussian_spectrum import GaussianSpectrum
from .powerlaw_spectrum import PowerLawSpectrum
from .spike_and_slab_spectrum import SpikeAndSlabSpectrum

__all__ = [
    "Frechet",
    "FrechetTopEigenvalue",
    "GaussianSpectrum",
    "PowerLawSpectrum",
    "SpectralDistribution",
    "SpikeAndSlabSpectrum",
]
