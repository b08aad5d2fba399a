"""Layer 5: draws of a fit's weights and the spectral variables of weight draws.

Array core on tensors first (weight draws -> singular values -> ``metrics.py``), thin
xarray wrapping last.

* :func:`weight_draws`: per prior layer, weight draws ``(chain, draw, *shape)`` of a fit
  (NUTS: its samples; SVI: ``S`` guide draws as ``chain=1, draw=S``; MAP: ``1 x 1``).
* :func:`spectral_draws`: per draw and layer ``alpha``, ``alpha_weighted``, ``lambda_max``,
  ``stable_rank``, ``effective_rank`` (dims ``chain, draw, layer``) and ``singular_values``
  (dims ``chain, draw, layer, sv_index``), conventions of ``metrics.py`` /
  ``spectrum.py``: ESD ``lambda_i = sigma_i^2``, no ``1/N``; conv kernels pooled over slices.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
import xarray as xr

from ..bnn.fit import FitResult
from ..bnn.free_state import installed_free
from ..bnn.network import BayesianNetwork
from ..spectra.metrics import metrics_from_esd
from ..spectra.spectrum import effective_rank, stable_rank
from .traces import check_result, guide_trace

__all__ = ["SPECTRAL_VARS", "latent_draws", "spectral_draws", "weight_draws",
           "weights_from_latent"]

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
    """``(chain, draw)`` shared by every layer's draws; raises naming the layer otherwise."""
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("spectral_draws() needs a non-empty mapping {layer: tensor (chain, draw, "
                        f"*weight_shape)}}, got {type(weights).__name__}")
    lead = None
    for name, w in weights.items():
        _check_layer_draws(name, w)
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


def _check_layer_draws(name, w) -> None:
    """Type and rank of one layer's draws ``(chain, draw, out, in[, *kernel])``."""
    if not isinstance(name, str):
        raise TypeError(f"layer names must be strings, got {name!r}")
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"weights of layer {name!r} must be a floating torch.Tensor, got "
                        f"{type(w).__name__}")
    if w.dim() < 4 or w.dim() > 7:
        raise ValueError(f"weights of layer {name!r} have shape {tuple(w.shape)}: expected "
                         "(chain, draw, out, in[, *kernel])")


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
    return _spectral_dataset(per_layer, chains, draws)


def _spectral_dataset(per_layer: dict[str, dict[str, np.ndarray]], chains: int,
                      draws: int) -> xr.Dataset:
    """The Dataset of :func:`spectral_draws` from per-layer arrays of ``chains * draws``
    rows; singular values NaN-padded to the widest layer."""
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


def latent_draws(result: FitResult, num_samples: int, seed: int,
                 args: tuple = ()) -> dict[str, torch.Tensor]:
    """Latent site draws ``{site: (chain, draw, *event)}`` (see :func:`weight_draws`)."""
    model = check_result(result)
    with result.active():
        return _latent_draws(result, model.latent_sites, num_samples, seed, args)


def _latent_draws(result: FitResult, sites, num_samples: int, seed: int,
                  args: tuple) -> dict[str, torch.Tensor]:
    """:func:`latent_draws` with the result's parameters installed (eval mode)."""
    if result.samples is not None:
        missing = [s for s in sites if s not in result.samples]
        if missing:
            raise ValueError(f"FitResult.samples lacks the latent sites {missing}")
        return {s: result.samples[s].detach() for s in sites}
    if result.guide is None:
        raise ValueError("the FitResult has neither NUTS samples nor a guide")
    if result.method == "map":
        warnings.warn(f"a MAP result holds one draw (its point): num_samples={num_samples} is "
                      "ignored and the posterior has chain=1, draw=1; LOO / az.compare need "
                      "posterior draws (fit with 'svi' or 'nuts')", UserWarning, stacklevel=4)
        with torch.no_grad():
            med = result.guide.median(*args)
        return {s: med[s].detach()[None, None] for s in sites}
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return _guide_draws(result, sites, int(num_samples), seed, args)


def _guide_draws(result: FitResult, sites, num_samples: int, seed: int,
                 args: tuple) -> dict[str, torch.Tensor]:
    """``num_samples`` guide draws as ``chain=1`` (seeded, global RNG state restored)."""
    draws: dict[str, list] = {s: [] for s in sites}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(num_samples):
            values, _ = guide_trace(result, args)
            for s in sites:
                draws[s].append(values[s])
    return {s: torch.stack(v)[None] for s, v in draws.items()}


def weights_from_latent(model: BayesianNetwork, latent: Mapping[str, torch.Tensor],
                        free: Mapping[str, torch.Tensor] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """Weights ``{layer: (chain, draw, *shape)}`` of latent draws; spectrally
    parameterised layers through ``model.weight_of`` (``U diag(s) V^T``), with each draw's
    ``U``, ``V`` from ``free`` (a sampler's ``free_draws`` ``{name: (chain, draw, ...)}``)
    when given, else the model's current ones."""
    out = {}
    with torch.no_grad():
        for name, site in model.prior_sites.items():
            v = latent[site]
            if name in model.spectral_layers:
                c, d = v.shape[:2]
                flat = v.reshape(c * d, *v.shape[2:])
                w = torch.stack([_spectral_weight(model, name, s, free, i)
                                 for i, s in enumerate(flat)])
                out[name] = w.reshape(c, d, *w.shape[1:]).detach()
            else:
                out[name] = v.detach()
    return out


def _spectral_weight(model: BayesianNetwork, name: str, s: torch.Tensor,
                     free: Mapping[str, torch.Tensor] | None, i: int) -> torch.Tensor:
    """``U diag(s) V^T`` of layer ``name`` with flat draw ``i``'s free state installed."""
    one = None if not free else \
        {k: v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])[i] for k, v in free.items()}
    with installed_free(model, one):
        return model.weight_of(name, s).clone()


def weight_draws(result: FitResult, num_samples: int = 100, seed: int = 0,
                 ) -> dict[str, torch.Tensor]:
    """Weight draws ``{layer: (chain, draw, *weight_shape)}`` of every prior layer.

    NUTS: all of ``result.samples`` (``num_samples`` is ignored); SVI: ``num_samples`` guide
    draws as ``chain=1, draw=num_samples`` (seeded with ``seed``, global RNG state restored);
    MAP (``AutoDelta``): the guide's point, ``chain=1, draw=1``. Spectrally parameterised
    layers are mapped to weights by ``model.weight_of`` (``U diag(s) V^T``).
    """
    model = check_result(result)
    latent = latent_draws(result, num_samples, seed)
    with result.active():
        return weights_from_latent(model, latent, result.free_draws)
