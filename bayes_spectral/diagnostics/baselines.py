"""Layer 5: spectral variables of deterministic networks (baselines), laid out like a
posterior.

:func:`baseline_dataset`: the variables of
:func:`~bayes_spectral.diagnostics.draws.spectral_draws` with dims
``method, seed, layer[, sv_index]``, so ``posterior.sel(layer=l)`` and
``baselines.sel(layer=l, method=m)`` line up.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..bnn.network import BayesianNetwork
from ..select import parameter_view
from .draws import spectral_draws

__all__ = ["baseline_dataset"]

Key = tuple[str, int]


def baseline_dataset(models: Mapping[Key, nn.Module | Mapping[str, torch.Tensor]],
                     ) -> xr.Dataset:
    """Spectral variables of deterministic networks keyed by ``(method, seed)``.

    Values: an ``nn.Module`` or a state_dict (the rows of the one parameter view,
    :func:`bayes_spectral.select.parameter_view`: Linear, Conv, Embedding, attention
    ``in_proj_weight[q]``/``[k]``/``[v]`` and ``out_proj``, recurrent matrices; named as the
    posterior's layers of :func:`bayesian`), or ``{layer: weight}``. Returns the variables of
    :func:`spectral_draws` with dims ``(method, seed, layer[, sv_index])``: ``method`` in
    order of first appearance, ``seed`` sorted; combinations not given are NaN. Every model
    must have the same layers with the same shapes.

    :raises TypeError: keys that are not ``(str, int)`` pairs, values of the wrong type.
    :raises ValueError: empty input, differing layer sets or shapes, NaN/Inf weights.
    """
    keys = _checked_keys(models)
    weights = {key: _baseline_weights(key, models[key]) for key in keys}
    ref = _common_layers(weights, keys)
    stacked = {name: _stacked_layer(weights, keys, name) for name in ref}
    flat = spectral_draws(stacked).isel(chain=0, drop=True)  # draw = position in keys
    return _on_method_seed_grid(flat, keys)


def _checked_keys(models) -> list[Key]:
    """The keys of a non-empty mapping, each a ``(method: str, seed: int)`` pair."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("baseline_dataset() needs a non-empty mapping {(method, seed): model}")
    keys = list(models)
    for key in keys:
        ok = (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
              and isinstance(key[1], (int, np.integer)) and not isinstance(key[1], bool))
        if not ok:
            raise TypeError(f"baseline_dataset() keys must be (method: str, seed: int) pairs, "
                            f"got {key!r}")
    return keys


def _baseline_weights(key, model) -> dict[str, torch.Tensor]:
    """``{layer: weight}`` (detached) of a module, a state_dict or a ``{layer: weight}``."""
    if isinstance(model, BayesianNetwork):
        raise TypeError(f"baseline {key}: a BayesianNetwork is a posterior, not a baseline; "
                        "use weight_draws/to_inference_data for it")
    if isinstance(model, nn.Module) or (isinstance(model, Mapping) and any(
            str(k).endswith("weight") or ".weight_" in str(k) for k in model)):
        with warnings.catch_warnings():  # what a model leaves out is analyze()'s to report
            warnings.simplefilter("ignore")
            rows = parameter_view(model, what=f"baseline {key}").rows
        with torch.no_grad():
            return {row.name: row.read().detach() for row in rows}
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


def _common_layers(weights: dict[Key, dict[str, torch.Tensor]],
                   keys: list[Key]) -> dict[str, torch.Tensor]:
    """The first model's layers, after checking every model has them, in order and shape."""
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
    return ref


def _stacked_layer(weights: dict[Key, dict[str, torch.Tensor]], keys: list[Key],
                   name: str) -> torch.Tensor:
    """Layer ``name`` of every model as draws ``(chain=1, draw=len(keys), *shape)``, float64."""
    ws = [weights[k][name].to(torch.float64).cpu() for k in keys]
    for k, w in zip(keys, ws, strict=True):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"baseline {k}: weights of layer {name!r} contain NaN or Inf")
    return torch.stack(ws)[None]


def _on_method_seed_grid(flat: xr.Dataset, keys: list[Key]) -> xr.Dataset:
    """Replace dim ``draw`` (one per key) by ``method`` (first-appearance order) x ``seed``
    (sorted); combinations not given are NaN."""
    methods = list(dict.fromkeys(k[0] for k in keys))
    seeds = sorted({int(k[1]) for k in keys})
    out = {}
    for var in flat.data_vars:
        da = flat[var]
        grid = np.full((len(methods), len(seeds)) + da.shape[1:], np.nan)
        for i, (m, s) in enumerate(keys):
            grid[methods.index(m), seeds.index(int(s))] = da.values[i]
        out[var] = (("method", "seed") + da.dims[1:], grid)
    return xr.Dataset(out, coords={"method": np.array(methods, dtype=str),
                                   "seed": np.array(seeds, dtype=np.int64),
                                   "layer": flat["layer"].values,
                                   "sv_index": flat["sv_index"].values},
                      attrs=dict(flat.attrs))
