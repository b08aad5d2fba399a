"""bayes-spectral: priors on the spectrum of weight matrices, with Pyro and ArviZ."""

from . import distributions, penalties, tracking  # noqa: F401
from .diagnostics import analyze, weight_layers
from .metrics import METRIC_NAMES, metrics_from_esd, spectral_metrics
from .powerlaw import PowerLawFit, alpha_at_index, fit_powerlaw, hill_estimator
from .spectrum import (
    PowerIteration,
    as_matrices,
    effective_rank,
    esd,
    numerical_rank,
    schatten_norm,
    singular_values,
    stable_rank,
)

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "PowerIteration",
    "PowerLawFit",
    "alpha_at_index",
    "analyze",
    "as_matrices",
    "distributions",
    "effective_rank",
    "esd",
    "fit_powerlaw",
    "hill_estimator",
    "metrics_from_esd",
    "numerical_rank",
    "penalties",
    "schatten_norm",
    "singular_values",
    "spectral_metrics",
    "stable_rank",
    "tracking",
    "weight_layers",
]
