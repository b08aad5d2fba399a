"""bayes-spectral: priors on the spectrum of weight matrices, with Pyro and ArviZ."""

from . import data, distributed, distributions, penalties  # noqa: F401
from .bnn.build import bayesian
from .bnn.fit import FitResult, NonFiniteError, fit
from .bnn.guides import (
    auto_delta,
    auto_lowrank,
    auto_normal,
    make_guide,
    map_values,
    spectral_guide,
)
from .bnn.network import BayesianNetwork
from .bnn.predict import (
    ClassificationMetrics,
    GaussianPredictive,
    RegressionMetrics,
    brier_score,
    evaluate,
    expected_calibration_error,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    predictive_probs,
)
from .bnn.site_priors import SingularValuePrior, TrackedSpectralPrior
from .diagnostics.analyze import analyze, weight_layers
from .diagnostics.baselines import baseline_dataset
from .diagnostics.draws import SPECTRAL_VARS, spectral_draws, weight_draws
from .diagnostics.inference_data import to_inference_data
from .diagnostics.loo import ImportanceELPD, importance_elpd
from .diagnostics.netcdf import load_netcdf, save_netcdf
from .spectra import tracking  # noqa: F401
from .spectra.metrics import METRIC_NAMES, metrics_from_esd, spectral_metrics
from .spectra.powerlaw import PowerLawFit, alpha_at_index, fit_powerlaw, hill_estimator
from .spectra.spectrum import (
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
    "BayesianNetwork",
    "ClassificationMetrics",
    "FitResult",
    "GaussianPredictive",
    "RegressionMetrics",
    "brier_score",
    "ImportanceELPD",
    "SPECTRAL_VARS",
    "baseline_dataset",
    "importance_elpd",
    "load_netcdf",
    "save_netcdf",
    "spectral_draws",
    "to_inference_data",
    "weight_draws",
    "NonFiniteError",
    "SingularValuePrior",
    "TrackedSpectralPrior",
    "auto_delta",
    "auto_lowrank",
    "auto_normal",
    "bayesian",
    "data",
    "distributed",
    "evaluate",
    "expected_calibration_error",
    "fit",
    "make_guide",
    "map_values",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "predictive_probs",
    "spectral_guide",
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
