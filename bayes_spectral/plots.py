"""Layer 5: matplotlib figures of spectra (Agg backend, saved as PNG).

``plot_esd``: the ESD on log-log axes as its empirical complementary CDF
``P(Lambda >= lambda_i) = (N - i)/N`` (readable even for a few dozen eigenvalues, unlike a
log-binned histogram), the fitted power law ``(n_tail/N) (lambda/xmin)^(1 - alpha)`` and
``xmin`` marked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .powerlaw import PowerLawFit, fit_powerlaw

__all__ = ["plot_esd", "plot_esds"]


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_esd(evals: torch.Tensor, fit: PowerLawFit | None = None, ax=None, title: str = ""):
    """Draw one ESD (log-log CCDF), its power-law fit and ``xmin`` on ``ax``.

    ``evals``: 1-D eigenvalues; ``fit`` defaults to ``fit_powerlaw(evals)``. Returns ``ax``.
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.8))
    ev = evals.detach().double().cpu()
    if fit is None:
        fit = fit_powerlaw(ev)
    x = np.sort(ev.numpy())
    n_all = len(x)
    ccdf = (n_all - np.arange(n_all)) / n_all
    keep = x > 0
    ax.loglog(x[keep], ccdf[keep], "o", ms=3, color="tab:blue", label=f"ESD ({n_all} eigenvalues)")
    alpha, xmin = float(fit.alpha), float(fit.xmin)
    frac = float(fit.num_tail) / n_all
    grid = np.logspace(math.log10(xmin), math.log10(x.max()), 50)
    ax.loglog(grid, frac * (grid / xmin) ** (1 - alpha), "-", color="tab:red", lw=2,
              label=f"power law alpha={alpha:.2f} (KS D={float(fit.ks_distance):.3f})")
    ax.axvline(xmin, color="tab:red", ls="--", lw=1, label=f"xmin={xmin:.3g}")
    ax.set_xlabel("eigenvalue lambda = sigma^2 of W^T W")
    ax.set_ylabel("P(Lambda >= lambda)")
    ax.set_title(title or "log-log ESD")
    ax.legend(fontsize=8, loc="lower left")
    return ax


def plot_esds(spectra: dict[str, torch.Tensor], path: str | Path | None = None, ncols: int = 3):
    """One panel per layer (``{name: evals}``); saves a PNG when ``path`` is given.

    Returns the figure.
    """
    plt = _pyplot()
    if not spectra:
        raise ValueError("plot_esds() needs at least one spectrum")
    n = len(spectra)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (name, ev) in zip(list(axes.flat)[:n], spectra.items(), strict=True):
        plot_esd(ev, ax=ax, title=f"layer {name}")
    for ax in list(axes.flat)[n:]:
        ax.remove()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
