"""Layer 5: posterior spectra as ArviZ ``InferenceData``, deterministic baselines alongside.

Array core on tensors first (weight draws -> singular values -> ``metrics.py``), thin
xarray / ArviZ wrapping last.

* :func:`weight_draws`: per prior layer, weight draws ``(chain, draw, *shape)`` of a fit
  (NUTS: its samples; SVI: ``S`` guide draws as ``chain=1, draw=S``; MAP: ``1 x 1``).
* :func:`spectral_draws`: per draw and layer ``alpha``, ``alpha_weighted``, ``lambda_max``,
  ``stable_rank``, ``effective_rank`` (dims ``chain, draw, layer``) and ``singular_values``
  (dims ``chain, draw, layer, sv_index``), conventions of ``metrics.py`` /
  ``spectrum.py``: ESD ``lambda_i = sigma_i^2``, no ``1/N``; conv kernels pooled over slices.
* :func:`to_inference_data`: ``posterior`` (spectral variables), pointwise ``log_likelihood``
  (var ``y``, dims ``chain, draw, obs_id``) and ``observed_data`` groups.
* :func:`baseline_dataset`: the same variables for deterministic networks with dims
  ``method, seed, layer[, sv_index]``, so ``posterior.sel(layer=l)`` and
  ``baselines.sel(layer=l, method=m)`` line up.
* :func:`importance_elpd`: PSIS-LOO of an SVI fit with importance weights ``p(theta, y) /
  q(theta)`` (formula in its docstring), with Pareto-k diagnostics.
* :func:`save_netcdf` / :func:`load_netcdf`: atomic netCDF (h5netcdf) round trip.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import arviz as az
import numpy as np
import torch
import xarray as xr
from pyro import poutine
from torch import nn

from .._io import atomic_path
from ..bnn.fit import FitResult
from ..bnn.network import BayesianNetwork
from ..spectra.metrics import metrics_from_esd
from ..spectra.spectrum import effective_rank, stable_rank
from .analyze import weight_layers

__all__ = [
    "SPECTRAL_VARS",
    "ImportanceELPD",
    "baseline_dataset",
    "importance_elpd",
    "load_netcdf",
    "pointwise_log_likelihood",
    "save_netcdf",
    "spectral_draws",
    "to_inference_data",
    "weight_draws",
]

SPECTRAL_VARS = ("alpha", "alpha_weighted", "lambda_max", "stable_rank", "effective_rank")


# --- array core ------------------------------------------------------------------------


def _descending_sv(w: torch.Tensor) -> torch.Tensor:
    """Singular values ``(B, r)`` (descending) of a batch of weights ``(B, *shape)``.

    2-D weights: ``svdvals``. Conv kernels ``(out, in, *k)``: the ``prod(k)`` slices
    ``W[:, :, i, j]`` are pooled into one sorted list (``esd(conv="pool")`` convention).
    """
    if w.dim() == 3:
        return torch.linalg.svdvals(w)
    b, out_ch, in_ch = w.shape[:3]
    slices = w.reshape(b, out_ch, in_ch, -1).permute(0, 3, 1, 2)
    sv = torch.linalg.svdvals(slices).reshape(b, -1)
    return torch.sort(sv, dim=-1, descending=True).values


def _check_draws(weights: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("spectral_draws() needs a non-empty mapping {layer: tensor (chain, draw, "
                        f"*weight_shape)}}, got {type(weights).__name__}")
    lead = None
    for name, w in weights.items():
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r}")
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"weights of layer {name!r} must be a floating torch.Tensor, got "
                            f"{type(w).__name__}")
        if w.dim() < 4 or w.dim() > 7:
            raise ValueError(f"weights of layer {name!r} have shape {tuple(w.shape)}: expected "
                             "(chain, draw, out, in[, *kernel])")
        if lead is None:
            lead = tuple(w.shape[:2])
        elif tuple(w.shape[:2]) != lead:
            raise ValueError(f"layer {name!r} has (chain, draw) = {tuple(w.shape[:2])}, other "
                             f"layers {lead}")
        if not bool(torch.isfinite(w).all()):
            n_nan = int(torch.isnan(w).sum())
            n_inf = int(torch.isinf(w).sum())
            raise ValueError(f"weights of layer {name!r} are not finite: {n_nan} NaN and "
                             f"{n_inf} Inf entries")
    return lead


def _layer_metrics(w: torch.Tensor, name: str) -> dict[str, np.ndarray]:
    """Spectral variables of one layer's draws ``(B, *shape)`` as float64 numpy arrays."""
    sv = _descending_sv(w.detach().to(torch.float64))
    evals = sv.square().flip(-1)  # ascending ESD, lambda = sigma^2
    with torch.no_grad():
        if evals.shape[-1] >= 2:
            m = metrics_from_esd(evals, name=name)
            out = {k: m[k] for k in SPECTRAL_VARS}
        else:  # one eigenvalue: no tail to fit
            warnings.warn(f"layer {name!r} has a single singular value: alpha and "
                          "alpha_weighted are NaN", stacklevel=3)
            nan = torch.full(evals.shape[:-1], float("nan"), dtype=evals.dtype)
            out = {"alpha": nan, "alpha_weighted": nan, "lambda_max": evals.amax(-1),
                   "stable_rank": stable_rank(evals), "effective_rank": effective_rank(evals)}
    res = {k: v.cpu().numpy() for k, v in out.items()}
    res["singular_values"] = sv.cpu().numpy()
    return res


def spectral_draws(weights: Mapping[str, torch.Tensor]) -> xr.Dataset:
    """Spectral variables of weight draws ``{layer: (chain, draw, *weight_shape)}``.

    Returns a Dataset with ``SPECTRAL_VARS`` of dims ``(chain, draw, layer)`` and
    ``singular_values`` of dims ``(chain, draw, layer, sv_index)``; coordinates: ``layer`` =
    the layer names (in the given order), ``chain``/``draw``/``sv_index`` = ``0..n-1``.
    Singular values are sorted descending (``sv_index = 0`` is ``sigma_max``) and padded with
    NaN where a layer has fewer than the widest layer. Conv kernels pool their slices'
    singular values (``esd(conv="pool")``). Metrics are :func:`metrics_from_esd` of
    ``lambda = sigma^2`` in float64 (``alpha``: KS-chosen ``xmin``; ``alpha_weighted =
    alpha log10 lambda_max``; ``stable_rank = sum lambda / lambda_max``; ``effective_rank =
    exp H(sigma / sum sigma)``); a layer with a single singular value gets NaN alpha and a
    warning.

    :raises TypeError/ValueError: not a mapping of float tensors, wrong dims, mismatching
        ``(chain, draw)`` across layers, NaN/Inf weights (the message names the layer).
    """
    chains, draws = _check_draws(weights)
    per_layer = {}
    for name, w in weights.items():
        flat = w.reshape(chains * draws, *w.shape[2:])
        per_layer[name] = _layer_metrics(flat, name)
    names = list(per_layer)
    width = max(v["singular_values"].shape[-1] for v in per_layer.values())
    data = {}
    for key in SPECTRAL_VARS:
        arr = np.stack([per_layer[n][key].reshape(chains, draws) for n in names], axis=-1)
        data[key] = (("chain", "draw", "layer"), arr)
    sv = np.full((chains, draws, len(names), width), np.nan)
    for i, n in enumerate(names):
        vals = per_layer[n]["singular_values"]
        sv[:, :, i, : vals.shape[-1]] = vals.reshape(chains, draws, -1)
    data["singular_values"] = (("chain", "draw", "layer", "sv_index"), sv)
    return xr.Dataset(
        data,
        coords={"chain": np.arange(chains), "draw": np.arange(draws),
                "layer": np.array(names, dtype=str), "sv_index": np.arange(width)},
        attrs={"sv_convention": "descending, NaN-padded; conv kernels pool their slices",
               "esd_convention": "lambda = sigma^2, no 1/N"},
    )


# --- draws of a fit --------------------------------------------------------------------


def _check_result(result) -> BayesianNetwork:
    if not isinstance(result, FitResult):
        raise TypeError(f"expected a bayes_spectral.FitResult, got {type(result).__name__}")
    model = result.model
    if not model.prior_sites:
        raise ValueError("the FitResult's model has no prior layers: no posterior over "
                         "weights to describe (give bayesian() priors)")
    return model


def _model_like(model: BayesianNetwork) -> torch.Tensor:
    return next(iter(model.parameters()), torch.zeros(()))


def _as_data(model: BayesianNetwork, data) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        x, y = data.x_train, data.y_train
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(f"data must be a pair (x, y) or a Split, got {type(data).__name__}")
    model.check_data(x, y, "data")
    ref = _model_like(model)
    x = x.to(device=ref.device, dtype=ref.dtype)
    y = y.to(device=ref.device, dtype=ref.dtype if model.likelihood == "gaussian" else y.dtype)
    return x, y


def _guide_trace(result: FitResult, args: tuple):
    """One guide draw: (values of the latent sites, ``log q`` of the draw)."""
    tr = poutine.trace(result.guide).get_trace(*args)
    values = {s: tr.nodes[s]["value"].detach() for s in result.model.latent_sites}
    log_q = sum(site["fn"].log_prob(site["value"]).sum() for site in tr.nodes.values()
                if site["type"] == "sample" and not site["is_observed"])
    return values, torch.as_tensor(log_q).detach()


def _latent_draws(result: FitResult, num_samples: int, seed: int,
                  args: tuple = ()) -> dict[str, torch.Tensor]:
    """Latent site draws ``{site: (chain, draw, *event)}`` (see :func:`weight_draws`)."""
    model = _check_result(result)
    sites = model.latent_sites
    if result.samples is not None:
        missing = [s for s in sites if s not in result.samples]
        if missing:
            raise ValueError(f"FitResult.samples lacks the latent sites {missing}")
        return {s: result.samples[s].detach() for s in sites}
    if result.guide is None:
        raise ValueError("the FitResult has neither NUTS samples nor a guide")
    if result.method == "map":
        with torch.no_grad():
            med = result.guide.median(*args)
        return {s: med[s].detach()[None, None] for s in sites}
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    draws: dict[str, list] = {s: [] for s in sites}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(int(num_samples)):
            values, _ = _guide_trace(result, args)
            for s in sites:
                draws[s].append(values[s])
    return {s: torch.stack(v)[None] for s, v in draws.items()}


def _weights_from_latent(model: BayesianNetwork, latent: Mapping[str, torch.Tensor]):
    out = {}
    with torch.no_grad():
        for name, site in model.prior_sites.items():
            v = latent[site]
            if name in model.spectral_layers:
                c, d = v.shape[:2]
                flat = v.reshape(c * d, *v.shape[2:])
                w = torch.stack([model.weight_of(name, s) for s in flat])
                out[name] = w.reshape(c, d, *w.shape[1:]).detach()
            else:
                out[name] = v.detach()
    return out


def weight_draws(result: FitResult, num_samples: int = 100, seed: int = 0,
                 ) -> dict[str, torch.Tensor]:
    """Weight draws ``{layer: (chain, draw, *weight_shape)}`` of every prior layer.

    NUTS: all of ``result.samples`` (``num_samples`` is ignored); SVI: ``num_samples`` guide
    draws as ``chain=1, draw=num_samples`` (seeded with ``seed``, global RNG state restored);
    MAP (``AutoDelta``): the guide's point, ``chain=1, draw=1``. Spectrally parameterised
    layers are mapped to weights by ``model.weight_of`` (``U diag(s) V^T``).
    """
    model = _check_result(result)
    return _weights_from_latent(model, _latent_draws(result, num_samples, seed))


def _trace_draw(model: BayesianNetwork, values: Mapping[str, torch.Tensor], x, y):
    """``(log p(y_i | theta) for each i, log p(theta))`` with the latent sites fixed."""
    with poutine.trace() as tr, poutine.condition(data=dict(values)):
        model(x, y)
    obs = tr.trace.nodes["obs"]
    loglik = obs["fn"].log_prob(obs["value"])  # unscaled by the data plate's N / B
    logprior = sum(tr.trace.nodes[s]["fn"].log_prob(tr.trace.nodes[s]["value"]).sum()
                   for s in model.latent_sites)
    return loglik.detach(), torch.as_tensor(logprior).detach()


def pointwise_log_likelihood(model: BayesianNetwork, latent: Mapping[str, torch.Tensor],
                             x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log p(y_i | x_i, theta_{c,d})`` of shape ``(chain, draw, n)`` for latent draws
    ``{site: (chain, draw, *event)}`` (one conditioned forward pass per draw)."""
    first = next(iter(latent.values()))
    c, d = first.shape[:2]
    rows = []
    with torch.no_grad():
        for i in range(c * d):
            vals = {s: v.reshape(c * d, *v.shape[2:])[i] for s, v in latent.items()}
            rows.append(_trace_draw(model, vals, x, y)[0])
    return torch.stack(rows).reshape(c, d, -1)


# --- ArviZ -----------------------------------------------------------------------------


def to_inference_data(result: FitResult, data, num_samples: int = 100, seed: int = 0,
                      include_latent: bool = False) -> az.InferenceData:
    """``InferenceData`` of a fit: ``posterior`` (spectral variables of
    :func:`spectral_draws`; with ``include_latent`` also the raw latent sites, dims
    ``<site>_dim_k``), ``log_likelihood`` (var ``y``, dims ``chain, draw, obs_id``:
    ``log p(y_i | x_i, theta)``, unscaled) and ``observed_data`` (var ``y``).

    Draws as in :func:`weight_draws` (NUTS ``C x S``, SVI ``1 x num_samples``, MAP ``1 x 1``).
    The log-likelihood is computed here rather than by ``az.from_pyro``: a ``FitResult``
    keeps only the stacked samples (the chains run as separate ``MCMC`` objects that are not
    kept), and ``from_pyro`` needs the ``MCMC`` object and a model it can vectorise over draws,
    which an ``nn.Module`` forward with one weight matrix is not; so we condition the model
    on each draw, trace it, and read ``log_prob`` of the ``obs`` site.
    """
    model = _check_result(result)
    x, y = _as_data(model, data)
    latent = _latent_draws(result, num_samples, seed, (x, y))
    posterior = spectral_draws(_weights_from_latent(model, latent))
    chains, draws = posterior.sizes["chain"], posterior.sizes["draw"]
    if include_latent:
        for site, v in latent.items():
            arr = v.detach().cpu().to(torch.float64).numpy()
            dims = ("chain", "draw") + tuple(f"{site}_dim_{k}" for k in range(arr.ndim - 2))
            posterior[site] = (dims, arr)
    posterior.attrs.update(inference_method=result.method)
    loglik = pointwise_log_likelihood(model, latent, x, y).cpu().to(torch.float64).numpy()
    obs_id = np.arange(loglik.shape[-1])
    log_likelihood = xr.Dataset(
        {"y": (("chain", "draw", "obs_id"), loglik)},
        coords={"chain": np.arange(chains), "draw": np.arange(draws), "obs_id": obs_id})
    y_np = y.detach().cpu().numpy()
    y_dims = ("obs_id",) + tuple(f"y_dim_{k}" for k in range(y_np.ndim - 1))
    observed = xr.Dataset({"y": (y_dims, y_np)}, coords={"obs_id": obs_id})
    return az.InferenceData(posterior=posterior, log_likelihood=log_likelihood,
                            observed_data=observed)


# --- baselines -------------------------------------------------------------------------


def _baseline_weights(key, model) -> dict[str, torch.Tensor]:
    if isinstance(model, BayesianNetwork):
        raise TypeError(f"baseline {key}: a BayesianNetwork is a posterior, not a baseline; "
                        "use weight_draws/to_inference_data for it")
    if isinstance(model, nn.Module) or (
            isinstance(model, Mapping) and any(str(k).endswith("weight") for k in model)):
        found = weight_layers(model)
        return {name: w.detach() for name, _, w in found}
    if isinstance(model, Mapping):
        out = {}
        for name, w in model.items():
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"baseline {key}: layer {name!r} is a {type(w).__name__}, not a "
                                "tensor")
            out[str(name)] = w.detach()
        return out
    raise TypeError(f"baseline {key}: expected an nn.Module, a state_dict or {{layer: weight}}, "
                    f"got {type(model).__name__}")


def baseline_dataset(models: Mapping[tuple[str, int], nn.Module | Mapping[str, torch.Tensor]],
                     ) -> xr.Dataset:
    """Spectral variables of deterministic networks keyed by ``(method, seed)``.

    Values: an ``nn.Module`` (its Linear/Conv layers, names as in ``named_modules``), a
    state_dict (its ``*.weight`` tensors) or ``{layer: weight}``. Returns the variables of
    :func:`spectral_draws` with dims ``(method, seed, layer[, sv_index])``: ``method`` in
    order of first appearance, ``seed`` sorted; combinations not given are NaN. Every model
    must have the same layers with the same shapes.

    :raises TypeError: keys that are not ``(str, int)`` pairs, values of the wrong type.
    :raises ValueError: empty input, differing layer sets or shapes, NaN/Inf weights.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("baseline_dataset() needs a non-empty mapping {(method, seed): model}")
    keys = list(models)
    for key in keys:
        ok = (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
              and isinstance(key[1], (int, np.integer)) and not isinstance(key[1], bool))
        if not ok:
            raise TypeError(f"baseline_dataset() keys must be (method: str, seed: int) pairs, "
                            f"got {key!r}")
    weights = {key: _baseline_weights(key, models[key]) for key in keys}
    ref_key = keys[0]
    ref = weights[ref_key]
    if not ref:
        raise ValueError(f"baseline {ref_key}: no weight layer found")
    for key in keys[1:]:
        if list(weights[key]) != list(ref):
            raise ValueError(f"baseline {key} has layers {list(weights[key])} but {ref_key} has "
                             f"{list(ref)}")
        for name, w in weights[key].items():
            if tuple(w.shape) != tuple(ref[name].shape):
                raise ValueError(f"baseline {key}: layer {name!r} has shape {tuple(w.shape)}, "
                                 f"{ref_key} has {tuple(ref[name].shape)}")
    stacked = {}
    for name in ref:
        ws = [weights[k][name].to(torch.float64).cpu() for k in keys]
        for k, w in zip(keys, ws, strict=True):
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"baseline {k}: weights of layer {name!r} contain NaN or Inf")
        stacked[name] = torch.stack(ws)[None]
    flat = spectral_draws(stacked).isel(chain=0, drop=True)
    methods = list(dict.fromkeys(k[0] for k in keys))
    seeds = sorted({int(k[1]) for k in keys})
    out = {}
    for var in flat.data_vars:
        da = flat[var]
        shape = (len(methods), len(seeds)) + da.shape[1:]
        grid = np.full(shape, np.nan)
        for i, (m, s) in enumerate(keys):
            grid[methods.index(m), seeds.index(int(s))] = da.values[i]
        out[var] = (("method", "seed") + da.dims[1:], grid)
    return xr.Dataset(out, coords={"method": np.array(methods, dtype=str),
                                   "seed": np.array(seeds, dtype=np.int64),
                                   "layer": flat["layer"].values,
                                   "sv_index": flat["sv_index"].values},
                      attrs=dict(flat.attrs))


# --- importance-weighted ELPD for SVI --------------------------------------------------


@dataclass
class ImportanceELPD:
    """PSIS-LOO of a variational fit (see :func:`importance_elpd`).

    ``elpd`` (sum over points), ``se``, ``p_loo``, ``elpd_i`` and ``pareto_k`` (per point),
    ``khat_max``, ``khat_q`` (Pareto k of the weights ``p/q`` themselves: how good ``q`` is
    as a proposal, Yao et al. 2018), ``good_k`` (the threshold), ``warning`` (some k above
    it), ``num_samples``, and the raw ``log_weights`` ``(S,)``.
    """

    elpd: float
    se: float
    p_loo: float
    elpd_i: np.ndarray
    pareto_k: np.ndarray
    khat_max: float
    khat_q: float
    good_k: float
    warning: bool
    num_samples: int
    log_weights: np.ndarray


MIN_PSIS_DRAWS = 21  # smallest S whose PSIS tail, ceil(min(S / 5, 3 sqrt(S))), has 5 draws


def importance_elpd(result: FitResult, data, num_samples: int = 200,
                    seed: int = 0) -> ImportanceELPD:
    """Importance-weighted PSIS-LOO ELPD of an SVI fit on ``data`` (its training data).

    Draws ``theta_s ~ q`` (``s = 1..S``); per draw the log weight
    ``log w_s = log p(theta_s) + sum_i log p(y_i | theta_s) - log q(theta_s)`` (model and
    guide traced with ``poutine.trace``, unscaled; this is what
    ``pyro.infer.predictive.WeighedPredictive`` returns as ``log_weights`` when ``data`` has
    ``num_data`` rows, computed here so the pointwise terms come from the same trace).
    Leave-one-out ratios ``r_is = log w_s - log p(y_i | theta_s)`` (``q`` as proposal for
    ``p(theta | y_{-i})``) are Pareto-smoothed by ``az.psislw`` into normalised ``lw_is``:

        elpd_i = log sum_s exp(lw_is + log p(y_i | theta_s)),   elpd = sum_i elpd_i,
        se = sqrt(n var_i(elpd_i)),   p_loo = sum_i lppd_i - elpd

    with ``lppd_i`` from the smoothed full-posterior weights ``psislw(log w)``
    (Magnusson et al. 2019; Vehtari et al. 2024). ``warning`` when some
    ``k_i > min(1 - 1/log10 S, 0.7)``.
    """
    model = _check_result(result)
    if result.samples is not None or result.guide is None or result.method != "svi":
        raise ValueError(f"importance_elpd() needs an SVI fit (method 'svi' with a guide), got "
                         f"method {result.method!r}; for NUTS use az.loo(to_inference_data(...))")
    if model.enumerated_layers:
        raise ValueError("importance_elpd() does not support enumerated rank indicators "
                         f"(layers {model.enumerated_layers})")
    if int(num_samples) != num_samples or num_samples < MIN_PSIS_DRAWS:
        raise ValueError(
            f"num_samples must be an integer >= {MIN_PSIS_DRAWS}, got {num_samples!r}: PSIS "
            f"fits the Pareto tail to ceil(min(S / 5, 3 sqrt(S))) draws and needs at least 5 "
            f"of them (az.psislw returns k = inf for S <= 20)")
    x, y = _as_data(model, data)
    logliks, logw = [], []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(int(num_samples)):
            values, log_q = _guide_trace(result, (x, y))
            loglik, logprior = _trace_draw(model, values, x, y)
            logliks.append(loglik.to(torch.float64).cpu())
            logw.append(float(logprior + loglik.sum() - log_q))
    ll = torch.stack(logliks).numpy().T  # (n, S)
    log_w = np.asarray(logw, dtype=np.float64)
    if not np.all(np.isfinite(log_w)) or not np.all(np.isfinite(ll)):
        raise ValueError("importance_elpd(): non-finite log weights or log-likelihoods (is the "
                         "guide's support inside the prior's?)")
    lw_loo, pareto_k = az.psislw(log_w[None, :] - ll)
    elpd_i = _logsumexp(lw_loo + ll, axis=-1)
    lw_full, khat_q = az.psislw(log_w[None, :])
    lppd_i = _logsumexp(lw_full + ll, axis=-1)
    n = elpd_i.shape[0]
    s = int(num_samples)
    good_k = min(1.0 - 1.0 / math.log10(s), 0.7)
    pareto_k = np.asarray(pareto_k, dtype=np.float64)
    return ImportanceELPD(
        elpd=float(elpd_i.sum()), se=float(math.sqrt(n * np.var(elpd_i, ddof=0))),
        p_loo=float(lppd_i.sum() - elpd_i.sum()), elpd_i=elpd_i, pareto_k=pareto_k,
        khat_max=float(pareto_k.max()), khat_q=float(np.asarray(khat_q).max()),
        good_k=good_k, warning=bool((pareto_k > good_k).any()), num_samples=s,
        log_weights=log_w)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


# --- netCDF ----------------------------------------------------------------------------


def save_netcdf(idata: az.InferenceData, path: str | os.PathLike) -> Path:
    """Write ``idata`` to ``path`` (h5netcdf) atomically (:func:`bayes_spectral._io.atomic_path`:
    temporary file in the same folder, then ``os.replace``). Returns the path."""
    if not isinstance(idata, az.InferenceData):
        raise TypeError(f"save_netcdf() needs an arviz.InferenceData, got {type(idata).__name__}")
    path = Path(path)
    with atomic_path(path) as tmp:
        idata.to_netcdf(tmp, engine="h5netcdf")
    return path


def load_netcdf(path: str | os.PathLike) -> az.InferenceData:
    """Read an ``InferenceData`` written by :func:`save_netcdf`, fully into memory (the file
    is closed afterwards, so it can be replaced)."""
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(os.fspath(path), engine="h5netcdf")
