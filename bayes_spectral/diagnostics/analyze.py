"""Layer 5: spectral diagnosis of any ``torch.nn.Module`` as an ``xarray.Dataset``.

Array core first (``metrics.py`` on tensors), thin xarray layer here: one row per weight
layer along dim ``layer`` (coordinate values are the module names), with coordinates
``layer_type`` and ``shape``; ``.to_dataframe()`` gives a WeightWatcher-like table.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..spectra.metrics import spectral_metrics
from ..spectra.spectrum import ConvMode, SpectrumMethod, esd

__all__ = ["analyze", "weight_layers"]

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


_STATE_DICT_TYPES = {2: "Matrix", 3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}


def _state_dict_layers(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    found = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        is_weight = key.endswith("weight") and value.is_floating_point()
        if is_weight and value.dim() in _STATE_DICT_TYPES:
            name = key[: -len(".weight")] if key.endswith(".weight") else key
            found.append((name, _STATE_DICT_TYPES[value.dim()], value))
    return found


def weight_layers(
    model: nn.Module | Mapping[str, torch.Tensor],
    include: Iterable[str] = (),
    layers: str | Iterable[str] | None = None,
) -> list[tuple[str, str, torch.Tensor]]:
    """``(name, type, weight)`` of every Linear/Conv layer plus opted-in 2-D parameters.

    ``model``: an ``nn.Module``, or a state_dict (its floating ``*weight`` tensors with
    2 to 5 dims are the layers). ``include``: names of extra 2-D parameters (e.g.
    ``"attn.in_proj_weight"``). ``layers``: a regular expression (or list of exact names).
    """
    if isinstance(model, Mapping):
        found = _state_dict_layers(model)
        return _select(found, layers)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"analyze() needs a torch.nn.Module or a state_dict, got {type(model).__name__}"
        )
    found: list[tuple[str, str, torch.Tensor]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = module.weight
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                found.append((name or "<root>", type(module).__name__, w))
    params = dict(model.named_parameters())
    for pname in include:
        if pname not in params:
            raise ValueError(f"include: model has no parameter named {pname!r}")
        if params[pname].dim() != 2:
            raise ValueError(
                f"include: parameter {pname!r} has shape {tuple(params[pname].shape)}, "
                "only 2-D parameters can be opted in"
            )
        found.append((pname, "Parameter", params[pname]))
    return _select(found, layers)


def _select(
    found: list[tuple[str, str, torch.Tensor]], layers: str | Iterable[str] | None
) -> list[tuple[str, str, torch.Tensor]]:
    if layers is not None:
        if isinstance(layers, str):
            pattern = re.compile(layers)
            found = [f for f in found if pattern.search(f[0])]
            if not found:
                raise ValueError(f"layer pattern {layers!r} matches no weight layer")
        else:
            wanted = list(layers)
            names = {f[0] for f in found}
            missing = [w for w in wanted if w not in names]
            if missing:
                raise ValueError(f"unknown layer names {missing}; known: {sorted(names)}")
            found = [f for f in found if f[0] in wanted]
    return found


def analyze(
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    layers: str | Iterable[str] | None = None,
    include: Iterable[str] = (),
    conv: ConvMode = "pool",
    min_evals: int = 8,
    return_esd: bool = False,
    dtype: torch.dtype = torch.float64,
    schatten: tuple[float, ...] = (1.0,),
    method: SpectrumMethod = "gram",
    **fit_kwargs,
) -> xr.Dataset:
    """Spectral metrics of every weight layer of ``model`` (see ``metrics.py``).

    ``model`` is an ``nn.Module`` or a state_dict (see :func:`weight_layers`).

    Layers with fewer than ``min_evals`` eigenvalues are left out (WeightWatcher's default
    is 8 too) and listed in ``ds.attrs["skipped"]``. Spectra are computed in ``dtype``
    (float64 by default) by ``method`` (``"gram"``: eigenvalues of the smaller Gram matrix,
    the fast default; ``"svd"``: singular values, accurate for tiny values).
    ``return_esd=True`` adds ``esd`` (dims ``layer, eval_index``,
    ascending, NaN-padded). Extra keyword arguments go to ``fit_powerlaw``.
    """
    rows: list[dict[str, float]] = []
    names, types, shapes, spectra, skipped = [], [], [], [], []
    for name, ltype, weight in weight_layers(model, include=include, layers=layers):
        w = weight.detach().to(dtype)
        n_evals = (
            min(w.shape[0], math.prod(w.shape[1:]))
            if conv == "flatten" or w.dim() == 2
            else min(w.shape[:2]) * math.prod(w.shape[2:])
        )
        if n_evals < min_evals:
            skipped.append(name)
            continue
        with torch.no_grad():
            m = spectral_metrics(w, conv=conv, schatten=schatten, name=name, method=method,
                                 **fit_kwargs)
            rows.append({k: float(v) for k, v in m.items()})
            if return_esd:
                spectra.append(esd(w, conv=conv, name=name, method=method).cpu().numpy())
        names.append(name)
        types.append(ltype)
        shapes.append("x".join(str(s) for s in weight.shape))
    if skipped:
        warnings.warn(
            f"analyze(): left out layers with fewer than {min_evals} eigenvalues: {skipped}",
            stacklevel=2,
        )
    if not rows:
        raise ValueError("analyze(): the model has no weight layer with enough eigenvalues")
    data_vars = {
        key: ("layer", np.array([r[key] for r in rows])) for key in rows[0]
    }
    ds = xr.Dataset(
        data_vars,
        coords={"layer": names, "layer_type": ("layer", types), "shape": ("layer", shapes)},
        attrs={"skipped": ", ".join(skipped), "conv": conv, "esd_convention": "sigma^2, no 1/N"},
    )
    for key in ("num_tail", "num_evals", "numerical_rank"):
        ds[key] = ds[key].astype(np.int64)
    if return_esd:
        width = max(len(s) for s in spectra)
        padded = np.full((len(spectra), width), np.nan)
        for i, s in enumerate(spectra):
            padded[i, : len(s)] = s
        ds["esd"] = (("layer", "eval_index"), padded)
    return ds
