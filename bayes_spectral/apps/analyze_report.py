"""Layer 6: the report folder of ``bayes-spectral analyze PATH --out DIR``.

Files (each written atomically): ``analysis.csv`` (the per-layer table), ``analysis.nc``
(the whole dataset, ESDs included, netCDF), ``esd.png`` (every layer's ESD, for up to
:data:`GRID_MAX` layers), ``alpha_by_depth.png`` (alpha against the row's position, one
marker per layer kind, WeightWatcher's 2 and 6 bounds dashed), ``esd_NNN_<layer>.png``
(log-log ESD with its fitted power law, for the chosen layers) and ``report.html`` (the
table and those plots embedded, :func:`bayes_spectral.apps.report.write_html_report`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import xarray as xr

from .._io import atomic_path, write_atomic
from ..diagnostics.plots import _pyplot, plot_esd, plot_esds
from .report import write_html_report

__all__ = ["GRID_MAX", "choose_esd_layers", "plot_alpha_by_depth", "write_analysis_report"]

#: most layers drawn in the one-figure ``esd.png`` grid
GRID_MAX = 12


def _spectrum(ds: xr.Dataset, name: str) -> torch.Tensor:
    row = ds["esd"].sel(layer=name).values
    return torch.as_tensor(row[~np.isnan(row)])


def choose_esd_layers(ds: xr.Dataset, pattern: str | None) -> list[str]:
    """Rows whose name matches ``pattern`` (``re.fullmatch``); by default the first, middle
    and last rows."""
    names = [str(n) for n in ds.layer.values]
    if pattern is None:
        return list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))
    rx = re.compile(pattern)
    return [n for n in names if rx.fullmatch(n)]


def plot_alpha_by_depth(ds: xr.Dataset, path: Path) -> Path:
    """alpha against row position (depth), one marker/colour per ``layer_type``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.12 * ds.sizes["layer"])), 4))
    depth = np.arange(ds.sizes["layer"])
    kinds = ds["layer_type"].values
    for i, kind in enumerate(dict.fromkeys(kinds)):
        sel = kinds == kind
        ax.plot(depth[sel], ds["alpha"].values[sel], "osD^v<>ph"[i % 9], ms=5, label=str(kind))
    for bound in (2.0, 6.0):
        ax.axhline(bound, color="grey", ls="--", lw=1)
    ax.set_xlabel("layer (position in the checkpoint)")
    ax.set_ylabel("alpha (power-law exponent)")
    ax.set_title("alpha by depth and layer kind (dashed: 2 and 6)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def _plot_one_esd(ds: xr.Dataset, name: str, path: Path) -> Path:
    """The ESD of row ``name`` with the power law analyze fitted (its alpha, xmin, tail)."""
    plt = _pyplot()
    row = ds.sel(layer=name)
    fit = SimpleNamespace(**{k: float(row[k]) for k in ("alpha", "xmin", "num_tail",
                                                         "ks_distance")})
    fig, ax = plt.subplots(figsize=(6, 4.2))
    plot_esd(_spectrum(ds, name), fit=fit, ax=ax, title=f"{name} ({str(row['shape'].values)})")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def write_analysis_report(ds: xr.Dataset, table: pd.DataFrame, out: Path, source: str,
                          esd_layers: str | None = None) -> list[Path]:
    """Write the report folder (see the module docstring); returns the files written."""
    written = [write_atomic(out / "analysis.csv", table.to_csv)]
    written.append(write_atomic(out / "analysis.nc", lambda tmp: ds.to_netcdf(tmp)))
    if ds.sizes["layer"] <= GRID_MAX:
        spectra = {str(n): _spectrum(ds, str(n)) for n in ds.layer.values}
        with atomic_path(out / "esd.png") as tmp:
            plot_esds(spectra, tmp)
        written.append(out / "esd.png")
    images = {"alpha by depth and layer kind": plot_alpha_by_depth(ds, out / "alpha_by_depth.png")}
    for i, name in enumerate(choose_esd_layers(ds, esd_layers)):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        images[f"ESD of {name}"] = _plot_one_esd(ds, name, out / f"esd_{i:03d}_{safe}.png")
    written += list(images.values())
    notes = _notes(ds, source)
    written.append(write_html_report(out / "report.html", f"Spectral analysis of {source}",
                                     {"source": source, **dict(ds.attrs)},
                                     {"per-layer metrics": table}, images, notes))
    return written


def _notes(ds: xr.Dataset, source: str) -> Sequence[str]:
    alpha = ds["alpha"].values
    notes = [f"{ds.sizes['layer']} matrices of {source}; alpha median {np.nanmedian(alpha):.3g}; "
             f"{int(np.sum(alpha < 2))} with alpha < 2 (over-trained by WeightWatcher's rule), "
             f"{int(np.sum(alpha > 6))} with alpha > 6 (under-trained)."]
    if ds.attrs.get("left_out"):
        notes.append("Left out: " + ds.attrs["left_out"])
    return notes
