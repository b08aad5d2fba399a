"""Layer 5: netCDF round trip of an ArviZ container: atomic write (h5netcdf), eager read."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import atomic_path
from .arviz_adapter import InferenceData, is_inference_data, read_netcdf, write_netcdf

__all__ = ["load_netcdf", "save_netcdf"]


def save_netcdf(idata: InferenceData, path: str | os.PathLike) -> Path:
    """Write ``idata`` to ``path`` (h5netcdf) atomically (:func:`bayes_spectral._io.atomic_path`:
    temporary file in the same folder, then ``os.replace``). Returns the path."""
    if not is_inference_data(idata):
        raise TypeError("save_netcdf() needs the ArviZ container (arviz.InferenceData under "
                        f"ArviZ 0.2x, xarray.DataTree under 1.x), got {type(idata).__name__}")
    path = Path(path)
    with atomic_path(path) as tmp:
        write_netcdf(idata, tmp)
    return path


def load_netcdf(path: str | os.PathLike) -> InferenceData:
    """Read an ``InferenceData`` written by :func:`save_netcdf`, fully into memory (the file
    is closed afterwards, so it can be replaced)."""
    return read_netcdf(path)
