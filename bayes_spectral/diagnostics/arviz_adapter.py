"""Layer 5: the one adapter between the library and ArviZ's posterior container.

Every construction of the container, every read of one of its groups, the netCDF round
trip and Pareto-smoothed importance sampling go through here, for both ArviZ generations:

* ArviZ 0.2x (Python 3.11): ``arviz.InferenceData``, each group an ``xarray.Dataset``;
* ArviZ >= 1 (Python >= 3.12): an ``xarray.DataTree`` whose children are the groups
  (``posterior``, ``log_likelihood``, ``observed_data``, ...); ``az.summary`` / ``az.loo`` /
  ``az.compare`` (from ``arviz_stats``) accept it.

Either way :func:`group` returns a plain ``xarray.Dataset``.
"""

from __future__ import annotations

import os

import arviz as az
import numpy as np
import xarray as xr

__all__ = [
    "ARVIZ_GENERATION",
    "MIN_PSIS_DRAWS",
    "InferenceData",
    "concat_chains",
    "group",
    "group_names",
    "has_groups",
    "inference_data",
    "is_inference_data",
    "posterior_of",
    "psislw",
    "read_netcdf",
    "with_groups",
    "write_netcdf",
]

#: major version of the installed ArviZ: 0 (``InferenceData``) or >= 1 (``DataTree``)
ARVIZ_GENERATION: int = int(az.__version__.split(".")[0])
_TREE = ARVIZ_GENERATION >= 1
#: fewest draws for which :func:`psislw` returns a finite Pareto k: 0.2x fits the tail of
#: ceil(min(S / 5, 3 sqrt(S))) >= 5 draws from S = 21; arviz_stats 1.x from S = 26
MIN_PSIS_DRAWS: int = 26 if _TREE else 21

#: the container type: ``arviz.InferenceData`` (0.2x) or ``xarray.DataTree`` (>= 1)
InferenceData = xr.DataTree if _TREE else az.InferenceData


def inference_data(**groups: xr.Dataset) -> InferenceData:
    """The container holding ``groups`` (``name=Dataset``, e.g. ``posterior=...``)."""
    if _TREE:
        return xr.DataTree.from_dict(dict(groups))
    return az.InferenceData(**groups)


def is_inference_data(obj) -> bool:
    """Whether ``obj`` is the container type itself."""
    return isinstance(obj, InferenceData)


def group_names(obj: InferenceData) -> list[str]:
    """The names of the groups of a container (``posterior``, ``log_likelihood``, ...)."""
    return list(obj.children) if _TREE else list(obj.groups())


def group(obj: InferenceData, name: str) -> xr.Dataset:
    """Group ``name`` of a container as an ``xarray.Dataset``; ``KeyError`` if absent."""
    if name not in group_names(obj):
        raise KeyError(f"the ArviZ container has no group {name!r} "
                       f"(groups: {group_names(obj)})")
    return obj[name].to_dataset() if _TREE else getattr(obj, name)


def has_groups(obj) -> bool:
    """Whether ``obj`` looks like a container of groups with a ``posterior`` group (an
    ``InferenceData``/``DataTree``, not itself a Dataset)."""
    tree = getattr(xr, "DataTree", None)  # xarray >= 2024.10; ArviZ 0.2x may run without it
    if tree is not None and isinstance(obj, tree):
        return "posterior" in obj.children
    return hasattr(obj, "posterior") and not hasattr(obj, "data_vars")


def posterior_of(obj):
    """A container -> its ``posterior`` group (a Dataset); anything else is returned as is."""
    return group(obj, "posterior") if has_groups(obj) else obj


def concat_chains(parts: list[InferenceData]) -> InferenceData:
    """Containers with the same groups and draws joined along ``chain``, renumbered
    ``0..C-1`` (one part is returned as is). Groups without a ``chain`` dim (e.g.
    ``observed_data``) are taken from the first part."""
    if len(parts) == 1:
        return parts[0]
    if not _TREE:
        return az.concat(*parts, dim="chain", reset_dim=True)
    out = {}
    for name in group_names(parts[0]):
        first = group(parts[0], name)
        if "chain" not in first.dims:
            out[name] = first
            continue
        joined = xr.concat([group(p, name) for p in parts], dim="chain")
        out[name] = joined.assign_coords(chain=np.arange(joined.sizes["chain"]))
    return inference_data(**out)


def write_netcdf(idata: InferenceData, path: str | os.PathLike) -> None:
    """Write every group of ``idata`` to ``path`` (h5netcdf engine), not atomically."""
    idata.to_netcdf(os.fspath(path), engine="h5netcdf")


def read_netcdf(path: str | os.PathLike) -> InferenceData:
    """Read a container written by :func:`write_netcdf`, fully into memory (the file is
    closed afterwards)."""
    if _TREE:
        with xr.open_datatree(os.fspath(path), engine="h5netcdf") as tree:
            return tree.load().copy()
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(os.fspath(path), engine="h5netcdf")


def psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed, normalised log weights along the last axis and the Pareto ``k`` of
    each row (ArviZ 0.2x ``az.psislw``). Under ArviZ >= 1 the same tail of
    ``M = ceil(min(S/5, 3 sqrt(S)))`` draws is smoothed by ``arviz_stats``' Pareto-tail fit,
    so both generations agree for ``M >= 6`` (``S >= 26``); where no Pareto fit exists
    (``M < 5`` in 0.2x; ``M < 6`` or a constant tail in >= 1) the row keeps its unsmoothed
    normalised weights and ``k = inf``. So does a row whose smoothing fails: ArviZ 0.2x's
    GPD fit of the tail ``exp(x_s) - exp(x_cut)`` divides by a tail value that rounds to 0
    when the tail's log weights agree to ~1e-16 (a confidently fitted point, ``|log p|``
    below ~1e-12 in the tail draws), returning ``sigma = nan``, NaN weights and a bogus
    ``k``; such rows get ``lw_s = x_s - log sum_t exp(x_t)``, ``k = inf`` (ArviZ 1.x keeps
    the same raw weights with ``k = nan``). ``ValueError`` on NaN or ``+inf`` log weights."""
    lw = np.asarray(log_weights, dtype=float)
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise ValueError(f"psislw(): log weights of shape {lw.shape} contain NaN or +inf")
    if not _TREE:
        return _unsmoothed_where_failed(lw, *_az_psislw(lw))
    rows = lw.reshape(-1, lw.shape[-1])
    out, k = np.empty_like(rows), np.empty(rows.shape[0])
    for i, row in enumerate(rows):
        out[i], k[i] = _psis_row(row)
    return out.reshape(lw.shape), k.reshape(lw.shape[:-1])


def _az_psislw(lw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ArviZ 0.2x ``az.psislw`` without the warnings of a failed GPD fit (handled after)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out, k = az.psislw(lw)
    return np.asarray(out, dtype=float), np.asarray(k, dtype=float)


def _unsmoothed_where_failed(lw: np.ndarray, out: np.ndarray, k: np.ndarray,
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``out`` with a NaN or ``+inf`` weight -> ``lw - logsumexp(lw)``, ``k = inf``."""
    failed = np.any(np.isnan(out) | np.isposinf(out), axis=-1)
    if failed.any():
        out, k = out.copy(), k.copy()
        raw = lw[failed]
        out[failed] = raw - np.logaddexp.reduce(raw, axis=-1, keepdims=True)
        k[failed] = np.inf
    return out, k


def psis_tail_length(num_draws: int) -> int:
    """The draws PSIS fits its Pareto tail to: ``M = ceil(min(S/5, 3 sqrt(S)))``."""
    return int(np.ceil(min(num_draws / 5, 3 * np.sqrt(num_draws))))


def _psis_row(lw: np.ndarray) -> tuple[np.ndarray, float]:
    """One row of :func:`psislw` under ArviZ >= 1 (``arviz_stats`` ``_ps_tail``)."""
    from arviz_stats.base import array_stats

    n = lw.size
    m = psis_tail_length(n)
    try:
        if m < 5:
            raise ValueError("tail shorter than 5 draws")
        smoothed, k = array_stats._ps_tail(lw, n, m, smooth_draws=True, tail="right",
                                           log_weights=True)
        if not np.isfinite(k):  # arviz_stats' GPD fit gives nan below 6 tail draws
            raise ValueError("no Pareto fit")
        return smoothed, float(k)
    except ValueError:  # too short or constant tail: no Pareto fit, as ArviZ 0.2x
        return lw - np.logaddexp.reduce(lw), float("inf")


def with_groups(idata: InferenceData, **groups: xr.Dataset) -> InferenceData:
    """A new container: the groups of ``idata`` plus ``groups`` (``name=Dataset``)."""
    current = {name: group(idata, name) for name in group_names(idata)}
    return inference_data(**{**current, **groups})
