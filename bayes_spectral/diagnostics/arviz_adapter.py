"""Layer 5: the one adapter between the library and ArviZ's posterior container.

Every construction of the container, every read of one of its groups, the netCDF round
trip and Pareto-smoothed importance sampling go through here, so that supporting another
container (ArviZ 1.x keeps the groups in an xarray ``DataTree``) changes this module only.
Today: ArviZ 0.2x ``InferenceData``, groups ``posterior``, ``log_likelihood``,
``observed_data`` as ``xarray.Dataset``.
"""

from __future__ import annotations

import os

import arviz as az
import numpy as np
import xarray as xr

__all__ = [
    "InferenceData",
    "concat_chains",
    "has_groups",
    "inference_data",
    "is_inference_data",
    "posterior_of",
    "psislw",
    "read_netcdf",
    "write_netcdf",
]

#: the container type (ArviZ 0.2x)
InferenceData = az.InferenceData


def inference_data(**groups: xr.Dataset) -> InferenceData:
    """The container holding ``groups`` (``name=Dataset``, e.g. ``posterior=...``)."""
    return az.InferenceData(**groups)


def is_inference_data(obj) -> bool:
    """Whether ``obj`` is the container type itself."""
    return isinstance(obj, az.InferenceData)


def has_groups(obj) -> bool:
    """Whether ``obj`` looks like a container of groups (has a ``posterior`` group and is
    not itself a Dataset)."""
    return hasattr(obj, "posterior") and not hasattr(obj, "data_vars")


def posterior_of(obj):
    """A container -> its ``posterior`` group; anything else (a Dataset) is returned as is."""
    return obj.posterior if has_groups(obj) else obj


def concat_chains(parts: list[InferenceData]) -> InferenceData:
    """Containers with the same groups and draws joined along ``chain``, renumbered
    ``0..C-1`` (one part is returned as is)."""
    if len(parts) == 1:
        return parts[0]
    return az.concat(*parts, dim="chain", reset_dim=True)


def write_netcdf(idata: InferenceData, path: str | os.PathLike) -> None:
    """Write every group of ``idata`` to ``path`` (h5netcdf engine), not atomically."""
    idata.to_netcdf(path, engine="h5netcdf")


def read_netcdf(path: str | os.PathLike) -> InferenceData:
    """Read a container written by :func:`write_netcdf`, fully into memory (the file is
    closed afterwards)."""
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(os.fspath(path), engine="h5netcdf")


def psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed, normalised log weights along the last axis and the Pareto ``k`` of
    each row (ArviZ's ``psislw``)."""
    return az.psislw(log_weights)
