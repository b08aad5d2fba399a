"""Layer 5: a fit's posterior spectra, log-likelihood and data as one ArviZ container.

:func:`to_inference_data`: ``posterior`` (spectral variables of
:func:`~bayes_spectral.diagnostics.draws.spectral_draws`), pointwise ``log_likelihood``
(var ``y``, dims ``chain, draw, obs_id``) and ``observed_data`` groups; the container
itself is built by :mod:`bayes_spectral.diagnostics.arviz_adapter`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
import xarray as xr

from ..bnn.batches import as_source, inputs_to, targets_to
from ..bnn.fit import FitResult
from ..bnn.free_state import installed_free
from .arviz_adapter import InferenceData, inference_data
from .draws import latent_draws, spectral_draws, weights_from_latent
from .loo import tied_tail_points
from .traces import as_data, check_result, pointwise_log_likelihood, trace_draw

__all__ = ["to_inference_data"]


def to_inference_data(result: FitResult, data, num_samples: int = 100, seed: int = 0,
                      include_latent: bool = False) -> InferenceData:
    """``InferenceData`` of a fit: ``posterior`` (spectral variables of
    :func:`spectral_draws`; with ``include_latent`` also the raw latent sites, dims
    ``<site>_dim_k``), ``log_likelihood`` (var ``y``, dims ``chain, draw, obs_id``:
    ``log p(y_i | x_i, theta)``, unscaled, evaluated in float64 from the network output so
    that confidently predicted points do not round to ties, see
    :func:`~bayes_spectral.diagnostics.traces.float64_log_likelihood`) and ``observed_data``
    (var ``y``). ``data``: any form :func:`~bayes_spectral.fit` takes (a pair, a ``Split``,
    a ``Dataset``, a ``DataLoader``), read whole in its order; token ids and other integer
    inputs kept.

    Draws as in :func:`weight_draws` (NUTS ``C x S``, SVI ``1 x num_samples``, MAP ``1 x 1``
    with a warning that it holds one draw). Runs with the result's own parameters in eval
    mode (:meth:`FitResult.active`).
    The log-likelihood is computed here rather than by ``az.from_pyro``: a ``FitResult``
    keeps only the stacked samples (the chains run as separate ``MCMC`` objects that are not
    kept), and ``from_pyro`` needs the ``MCMC`` object and a model it can vectorise over draws,
    which an ``nn.Module`` forward with one weight matrix is not; so we condition the model
    on each draw, trace it, and read ``log_prob`` of the ``obs`` site.
    """
    model = check_result(result)
    with result.active():  # its own parameters, eval mode (BatchNorm statistics untouched)
        x, y = as_data(model, _in_model_dtype(model, data))
        return _inference_data(result, model, x, y, num_samples, seed, include_latent)


def _in_model_dtype(model, data) -> tuple:
    """All rows of ``data`` with floating-point tensors on the model's device and in its
    dtype (a float64 result reads float32 data and the reverse), integer ones kept, before
    :func:`as_data` checks them by running the network."""
    x, y = as_source(data, "data").materialize()
    ref = next(iter(model.parameters()), torch.zeros(()))
    return inputs_to(x, ref.device, ref.dtype), targets_to(y, ref.device, ref.dtype)


def _inference_data(result: FitResult, model, x, y, num_samples: int, seed: int,
                    include_latent: bool) -> InferenceData:
    """:func:`to_inference_data` with the result's parameters installed."""
    latent = latent_draws(result, num_samples, seed, (x, y))
    free = result.free_draws if result.samples is not None else None
    posterior = spectral_draws(weights_from_latent(model, latent, free))
    if include_latent:
        _add_latent(posterior, latent)
    posterior.attrs.update(inference_method=result.method)
    loglik = _pointwise(model, latent, free, x, y).cpu().to(torch.float64).numpy()
    _warn_tied_tails(loglik)
    obs_id = np.arange(loglik.shape[-1])
    return inference_data(posterior=posterior,
                          log_likelihood=_log_likelihood_group(loglik, obs_id),
                          observed_data=_observed_group(y, obs_id))


def _warn_tied_tails(loglik: np.ndarray) -> None:
    """Warn when some points have the same log-likelihood in all draws of their PSIS tail
    (:func:`~bayes_spectral.diagnostics.loo.tied_tail_points`)."""
    tied = tied_tail_points(loglik)
    if tied.size:
        warnings.warn(
            f"{tied.size} points (obs_id {tied[:5].tolist()}{' ...' if tied.size > 5 else ''}) "
            "have the same log-likelihood in all draws of their PSIS tail (e.g. a ReLU net "
            "with every hidden unit off for them): PSIS-LOO gives them k = inf (ArviZ 0.2x, "
            "diagnostics.loo.mcmc_loo) and ArviZ 1.x's az.loo / az.compare raise 'All tail "
            "values are the same'", UserWarning, stacklevel=4)


def _pointwise(model, latent: Mapping[str, torch.Tensor],
               free: Mapping[str, torch.Tensor] | None, x, y) -> torch.Tensor:
    """``log p(y_i | x_i, theta_{c,d})`` ``(chain, draw, n)``; with a sampler's ``free``
    state each draw runs with its own (parameters without a prior, buffers)."""
    if not free:
        return pointwise_log_likelihood(model, latent, x, y)
    first = next(iter(latent.values()))
    c, d = first.shape[:2]
    flat = {k: v.reshape(c * d, *v.shape[2:]) for k, v in latent.items()}
    flat_free = {k: v.reshape(c * d, *v.shape[2:]) for k, v in free.items()}
    rows = []
    with torch.no_grad():
        for i in range(c * d):
            with installed_free(model, {k: v[i] for k, v in flat_free.items()}):
                rows.append(trace_draw(model, {k: v[i] for k, v in flat.items()}, x, y)[0])
    return torch.stack(rows).reshape(c, d, -1)


def _add_latent(posterior: xr.Dataset, latent: Mapping[str, torch.Tensor]) -> None:
    """Add each latent site ``(chain, draw, *event)`` as a float64 variable, dims
    ``chain, draw, <site>_dim_0, ...``."""
    for site, v in latent.items():
        arr = v.detach().cpu().to(torch.float64).numpy()
        dims = ("chain", "draw") + tuple(f"{site}_dim_{k}" for k in range(arr.ndim - 2))
        posterior[site] = (dims, arr)


def _log_likelihood_group(loglik: np.ndarray, obs_id: np.ndarray) -> xr.Dataset:
    """``y``: ``log p(y_i | x_i, theta)`` with dims ``chain, draw, obs_id``."""
    chains, draws = loglik.shape[:2]
    return xr.Dataset(
        {"y": (("chain", "draw", "obs_id"), loglik)},
        coords={"chain": np.arange(chains), "draw": np.arange(draws), "obs_id": obs_id})


def _observed_group(y: torch.Tensor, obs_id: np.ndarray) -> xr.Dataset:
    """``y``: the observed targets, dims ``obs_id, y_dim_0, ...``."""
    y_np = y.detach().cpu().numpy()
    y_dims = ("obs_id",) + tuple(f"y_dim_{k}" for k in range(y_np.ndim - 1))
    return xr.Dataset({"y": (y_dims, y_np)}, coords={"obs_id": obs_id})
