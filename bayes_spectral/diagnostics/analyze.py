"""Layer 5: spectral diagnosis of any ``torch.nn.Module`` as an ``xarray.Dataset``.

Array core first (``metrics.py`` on tensors), thin xarray layer here: one row per weight
layer along dim ``layer`` (coordinate values are the module names), with coordinates
``layer_type`` and ``shape``; ``.to_dataframe()`` gives a WeightWatcher-like table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import xarray as xr
from torch import nn

from ..select import weight_layers
from ..spectra.metrics import spectral_metrics
from ..spectra.spectrum import ConvMode, SpectrumMethod, esd

__all__ = ["analyze", "weight_layers"]


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
    found = weight_layers(model, include=include, layers=layers)
    kept, skipped = _split_by_size(found, conv, min_evals)
    # metrics first: a bad layer raises before the warning about small ones
    rows, spectra = _layer_metrics(kept, dtype, conv, schatten, method, return_esd, fit_kwargs)
    if skipped:
        warnings.warn(
            f"analyze(): left out layers with fewer than {min_evals} eigenvalues: {skipped}",
            stacklevel=2,
        )
    if not rows:
        raise ValueError("analyze(): the model has no weight layer with enough eigenvalues")
    ds = _dataset(rows, kept, skipped, conv)
    if return_esd:
        ds["esd"] = (("layer", "eval_index"), _nan_padded(spectra))
    return ds


def _num_evals(shape: torch.Size, conv: ConvMode) -> int:
    """Eigenvalues of one layer: ``min(out, prod(in, *k))`` for a matrix or a flattened
    conv, ``min(out, in) * prod(k)`` for pooled conv slices."""
    if conv == "flatten" or len(shape) == 2:
        return min(shape[0], math.prod(shape[1:]))
    return min(shape[:2]) * math.prod(shape[2:])


def _split_by_size(found: list[tuple[str, str, torch.Tensor]], conv: ConvMode,
                   min_evals: int) -> tuple[list[tuple[str, str, torch.Tensor]], list[str]]:
    """Layers with at least ``min_evals`` eigenvalues, and the names of the others."""
    kept, skipped = [], []
    for row in found:
        if _num_evals(row[2].shape, conv) < min_evals:
            skipped.append(row[0])
        else:
            kept.append(row)
    return kept, skipped


def _layer_metrics(kept: list[tuple[str, str, torch.Tensor]], dtype: torch.dtype,
                   conv: ConvMode, schatten: tuple[float, ...], method: SpectrumMethod,
                   return_esd: bool, fit_kwargs: dict
                   ) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    """Per layer, in order: its metrics as floats and (``return_esd``) its ESD, both of
    the weight cast to ``dtype``, without autograd."""
    rows: list[dict[str, float]] = []
    spectra: list[np.ndarray] = []
    for name, _, weight in kept:
        w = weight.detach().to(dtype)
        with torch.no_grad():
            m = spectral_metrics(w, conv=conv, schatten=schatten, name=name, method=method,
                                 **fit_kwargs)
            rows.append({k: float(v) for k, v in m.items()})
            if return_esd:
                spectra.append(esd(w, conv=conv, name=name, method=method).cpu().numpy())
    return rows, spectra


def _dataset(rows: list[dict[str, float]], kept: list[tuple[str, str, torch.Tensor]],
             skipped: list[str], conv: ConvMode) -> xr.Dataset:
    """One variable per metric along ``layer``; coords ``layer_type`` and ``shape``."""
    data_vars = {key: ("layer", np.array([r[key] for r in rows])) for key in rows[0]}
    coords = {
        "layer": [name for name, _, _ in kept],
        "layer_type": ("layer", [ltype for _, ltype, _ in kept]),
        "shape": ("layer", ["x".join(str(s) for s in w.shape) for _, _, w in kept]),
    }
    ds = xr.Dataset(
        data_vars, coords=coords,
        attrs={"skipped": ", ".join(skipped), "conv": conv, "esd_convention": "sigma^2, no 1/N"},
    )
    for key in ("num_tail", "num_evals", "numerical_rank"):
        ds[key] = ds[key].astype(np.int64)
    return ds


def _nan_padded(spectra: list[np.ndarray]) -> np.ndarray:
    """Ascending spectra of unequal length as rows of one array, NaN-padded on the right."""
    width = max(len(s) for s in spectra)
    padded = np.full((len(spectra), width), np.nan)
    for i, s in enumerate(spectra):
        padded[i, : len(s)] = s
    return padded
