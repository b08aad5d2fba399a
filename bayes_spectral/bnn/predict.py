"""Layer 4: posterior predictive of a fitted network and its metrics, per likelihood.

:func:`predictive_probs` runs the model under the posterior (a guide's draws or NUTS
samples) and returns the likelihood's predictive
(:meth:`~bayes_spectral.bnn.likelihoods.Likelihood.predictive`): class probabilities
``(S, n, C)`` for ``categorical`` and ``bernoulli`` (``C = 2``), a
:class:`~bayes_spectral.bnn.metrics.GaussianPredictive` ``(loc, scale)`` of shape
``(S, n, ...)`` for ``gaussian`` (``scale``: the fixed noise or the draws of the latent
``noise``) and ``heteroskedastic``. :func:`evaluate` scores it: classification accuracy,
NLL, ECE, entropy, mutual information and Brier score; regression Gaussian-mixture NLL,
RMSE and the coverage of the central 50% / 90% intervals. The formulas are in
:mod:`~bayes_spectral.bnn.metrics` (whose functions are re-exported here).

Sampler draws come with their free state (``free=``, :mod:`~.free_state`: the parameters
without a prior and the buffers of that draw's chain at that step): the model is then run one
draw at a time with that draw's free state installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pyro.infer import Predictive

from .batches import num_rows, take_rows
from .free_state import installed_free
from .likelihoods import LIKELIHOODS, Likelihood
from .metrics import (
    ClassificationMetrics,
    GaussianPredictive,
    RegressionMetrics,
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    gaussian_nll,
    interval_coverage,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    regression_metrics,
    rmse,
)

__all__ = [
    "ClassificationMetrics",
    "GaussianPredictive",
    "PredictiveMetrics",
    "RegressionMetrics",
    "accuracy",
    "brier_score",
    "evaluate",
    "expected_calibration_error",
    "gaussian_nll",
    "interval_coverage",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "predictive_probs",
    "rmse",
]

#: the classification metrics (the name ``evaluate`` returned before regression existed)
PredictiveMetrics = ClassificationMetrics


def evaluate(pred, y, likelihood: str | Likelihood | None = None,
             ) -> ClassificationMetrics | RegressionMetrics:
    """Metrics of a predictive ``pred`` against targets ``y``.

    ``likelihood`` (a name of ``LIKELIHOODS`` or a :class:`Likelihood`) picks the metrics;
    ``None``: by the type of ``pred``, a :class:`GaussianPredictive` -> regression metrics
    (:func:`~bayes_spectral.bnn.metrics.regression_metrics`), class probabilities ``(S, n,
    C)`` or ``(n, C)`` -> classification metrics (entropy and MI averaged over points).
    """
    if likelihood is None:
        if isinstance(pred, GaussianPredictive):
            return regression_metrics(pred, y)
        return classification_metrics(pred, y)
    law = LIKELIHOODS.get(likelihood) if isinstance(likelihood, str) else likelihood
    return law.metrics(pred, y)


def predictive_probs(model, x, *, guide=None, samples: Mapping[str, torch.Tensor] | None = None,
                     num_samples: int = 32, batch_size: int = 4096,
                     free: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The likelihood's predictive under the posterior (module docstring): class
    probabilities ``(S, n, C)`` or a ``GaussianPredictive`` ``(S, n, ...)``; a user
    likelihood without :meth:`~Likelihood.predictive`: the outputs ``(S, n, ...)``.

    ``guide``: ``num_samples`` guide draws, taken once and shared by every batch of
    ``batch_size`` rows (so a point's prediction does not depend on its batch); ``samples``:
    posterior draws ``{site: (..., *event)}`` (e.g. NUTS ``(chains, draws, ...)``);
    ``free``: with ``samples``, each draw's free state ``{name: (..., *shape)}`` (the same
    leading draw dims, e.g. a sampler's ``res.free_draws``), installed draw by draw.
    """
    if (guide is None) == (samples is None):
        raise ValueError("give exactly one of guide= or samples=")
    if free and samples is None:
        raise ValueError("free= (a sampler's free state per draw) needs samples=")
    draws = _guide_draws(model, guide, x, num_samples) if guide is not None else \
        _flat_samples(model, samples)
    if not free:
        return _predictive(model, x, draws, batch_size)
    flat = _flat_free(model, samples, free)
    parts = []
    for i in range(next(iter(draws.values())).shape[0]):
        with installed_free(model, {k: v[i] for k, v in flat.items()}):
            parts.append(_predictive(model, x, {k: v[i:i + 1] for k, v in draws.items()},
                                     batch_size))
    return _concat(parts, dim=0)


def _predictive(model, x, draws: dict[str, torch.Tensor], batch_size: int) -> Any:
    """The likelihood's predictive of the latent ``draws`` ``(S, *event)``, ``batch_size``
    rows of ``x`` at a time."""
    law: Likelihood = model.observation
    sites = ["_RETURN", *law.parameter_sites(model)]
    pred = Predictive(model, posterior_samples=draws, return_sites=sites)
    parts = []
    with torch.no_grad():
        for i in range(0, num_rows(x), batch_size):
            out = pred(take_rows(x, slice(i, i + batch_size)))
            parts.append(law.predictive(model, out.pop("_RETURN"), out))
    return _concat(parts)


def _flat_free(model, samples: Mapping[str, torch.Tensor],
               free: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``free`` with its leading draw dims (those of ``samples``) flattened into one."""
    site = next(k for k in samples if k in model.latent_sites)
    init = model._initial.get(site)
    lead = samples[site].dim() - (0 if init is None else init.dim())
    n = samples[site].shape[:lead].numel()
    return {k: v.detach().reshape(n, *v.shape[lead:]) for k, v in free.items()}


def _guide_draws(model, guide, x, num_samples: int) -> dict[str, torch.Tensor]:
    """``num_samples`` joint draws of the latent sites from ``guide`` (one row of ``x``)."""
    latent = Predictive(model, guide=guide, num_samples=num_samples,
                        return_sites=list(model.latent_sites))
    with torch.no_grad():  # Predictive pads the draws with the plate dims: flatten them
        return _flat_samples(model, latent(take_rows(x, slice(0, 1))), num_samples)


def _flat_samples(model, samples: Mapping[str, torch.Tensor],
                  num: int = -1) -> dict[str, torch.Tensor]:
    """The latent sites of ``samples``, shape ``(num, *event)`` (the leading draw dims
    flattened into one), detached."""
    out = {}
    for k, v in samples.items():
        if k in model.latent_sites:
            init = model._initial.get(k)
            out[k] = v.detach().reshape(num, *(() if init is None else init.shape))
    return out


def _concat(parts: list, dim: int = 1) -> Any:
    """Predictives joined along ``dim`` (1: batches of points; 0: draws)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=dim)
    return type(first)(*(torch.cat(fields, dim=dim) for fields in zip(*parts, strict=True)))
