"""Layer 2: spectral priors as Pyro distributions (one law per file)."""

from .frechet import Frechet
from .gaussian_spectrum import GaussianSpectrum

__all__: list[str] = ["Frechet", "GaussianSpectrum"]
