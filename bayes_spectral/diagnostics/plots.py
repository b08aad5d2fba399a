"""Layer 5: matplotlib figures of spectra (Agg backend, saved as PNG).

``plot_esd``: the ESD on log-log axes as its empirical complementary CDF
``P(Lambda >= lambda_i) = (N - i)/N`` (readable even for a few dozen eigenvalues, unlike a
log-binned histogram), the fitted power law ``(n_tail/N) (lambda/xmin)^(1 - alpha)`` and
``xmin`` marked.

Posterior spectra (datasets of :mod:`bayes_spectral.diagnostics.draws` and
:mod:`bayes_spectral.diagnostics.baselines`, or their ArviZ containers):

* ``plot_posterior_spectra``: per layer, the median and the ``hdi_prob`` HDI band of the
  sorted singular values ``sigma_i`` against ``i`` (log y), each baseline method's mean over
  seeds overlaid;
* ``plot_spectral_forest``: per variable, one row per (layer, source): posterior median,
  50% interval (thick) and ``hdi_prob`` HDI (thin); baselines as one dot per seed and a
  diamond at their mean;
* ``plot_alpha_vs_accuracy``: per layer, alpha against test accuracy, one colour per method.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .._io import write_atomic
from ..spectra.powerlaw import PowerLawFit, fit_powerlaw
from .arviz_adapter import has_groups, posterior_of

__all__ = [
    "plot_alpha_vs_accuracy",
    "plot_esd",
    "plot_esds",
    "plot_posterior_spectra",
    "plot_spectral_forest",
]

_DPI = 100


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
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
    return fig


# --- posterior spectra -------------------------------------------------------------------


def _grid(plt, n: int, ncols: int, width: float, height: float):
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _finish(plt, fig, path, rect=None):
    """Tight layout (inside ``rect`` when given), saved as PNG when ``path`` is given."""
    fig.tight_layout(rect=rect)
    if path is not None:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=_DPI))
        plt.close(fig)
    return fig


def _samples(da) -> np.ndarray:
    """``(S, ...)`` numpy draws of a DataArray with ``chain``/``draw`` dims."""
    return da.stack(__sample__=("chain", "draw")).transpose("__sample__", ...).values


def _hdi(x: np.ndarray, prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``x`` (``S`` draws), the shortest interval ``[s_i, s_{i+k}]`` of the
    sorted draws with ``k = floor(prob S)`` (ArviZ's ``hdi`` rule)."""
    s = np.sort(x, axis=0)
    n = s.shape[0]
    k = min(n - 1, int(math.floor(prob * n)))
    width = s[k:] - s[: n - k]
    i = np.argmin(np.where(np.isnan(width), np.inf, width), axis=0)
    cols = np.arange(s.shape[1])
    return s[i, cols], s[i + k, cols]


def _layer_names(ds) -> list[str]:
    return [str(v) for v in ds["layer"].values]


def _colors(plt) -> list:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_posterior_spectra(posterior, baselines=None, layers=None, hdi_prob: float = 0.9,
                           path: str | Path | None = None, ncols: int = 3):
    """Sorted singular values per layer: posterior median line and ``hdi_prob`` HDI band
    (shortest interval of the draws, per index ``i``), each baseline method's mean over
    seeds as a line with markers. Log y axis. ``posterior``: a Dataset with
    ``singular_values`` (chain, draw, layer, sv_index) or an ``InferenceData``;
    ``baselines``: the Dataset of :func:`bayes_spectral.baseline_dataset`. One axis per layer;
    returns the figure (saved as PNG at 100 dpi when ``path`` is given).
    """
    plt = _pyplot()
    post = posterior_of(posterior)
    names = _spectra_layers(post, layers, hdi_prob)
    fig, axes = _grid(plt, len(names), ncols, 5.0, 3.8)
    colors = _colors(plt)
    for ax, name in zip(axes, names, strict=True):
        sv = _samples(post["singular_values"].sel(layer=name))
        sv = sv[:, ~np.all(np.isnan(sv), axis=0)]  # NaN padding sits at the end
        _draw_spectrum_band(ax, sv, hdi_prob)
        if baselines is not None and name in set(_layer_names(baselines)):
            _draw_baseline_spectra(ax, baselines["singular_values"].sel(layer=name),
                                   sv.shape[1], colors)
        _label_spectrum_axis(ax, name)
    return _finish(plt, fig, path)


def _spectra_layers(post, layers, hdi_prob: float) -> list[str]:
    """The layers to draw (all by default), after checking the dataset and ``hdi_prob``."""
    if "singular_values" not in post:
        raise ValueError("plot_posterior_spectra() needs a dataset with 'singular_values'")
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must be in (0, 1), got {hdi_prob!r}")
    names = _layer_names(post) if layers is None else list(layers)
    unknown = [n for n in names if n not in set(_layer_names(post))]
    if unknown or not names:
        raise ValueError(f"unknown layers {unknown}; the posterior has {_layer_names(post)}")
    return names


def _draw_spectrum_band(ax, sv: np.ndarray, hdi_prob: float) -> None:
    """The HDI band and the median of draws ``sv`` ``(S, r)`` against ``i = 1..r``."""
    idx = np.arange(1, sv.shape[1] + 1)
    lo, hi = _hdi(sv, hdi_prob)
    ax.fill_between(idx, lo, hi, color="0.6", alpha=0.45, lw=0,
                    label=f"posterior {int(round(100 * hdi_prob))}% HDI")
    ax.plot(idx, np.median(sv, axis=0), color="k", lw=2,
            label=f"posterior median ({sv.shape[0]} draws)")


def _draw_baseline_spectra(ax, base, width: int, colors: list) -> None:
    """Each method's mean over its given seeds of ``base`` (method, seed, sv_index),
    the first ``width`` singular values."""
    idx = np.arange(1, width + 1)
    for j, method in enumerate(map(str, base["method"].values)):
        vals = base.sel({"method": method}).values[:, :width]
        vals = vals[~np.all(np.isnan(vals), axis=1)]  # seeds not given are NaN
        if vals.shape[0] == 0:
            continue
        mean, n_seeds = vals.mean(axis=0), vals.shape[0]
        ax.plot(idx[: mean.shape[0]], mean, "o-", ms=2.5, lw=1,
                color=colors[j % len(colors)], label=f"{method} (mean of {n_seeds} seeds)")


def _label_spectrum_axis(ax, name: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i (singular values sorted descending)")
    ax.set_ylabel("singular value sigma_i")
    ax.set_title(f"layer {name}: posterior spectrum")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", alpha=0.3)


# --- forest plot -------------------------------------------------------------------------


def _as_sources(posteriors) -> dict:
    """``{name: posterior Dataset}`` of one Dataset / container or a mapping of them."""
    if posteriors is None:
        return {}
    if isinstance(posteriors, dict) or (hasattr(posteriors, "items")
                                        and not hasattr(posteriors, "data_vars")
                                        and not has_groups(posteriors)):
        return {str(k): posterior_of(v) for k, v in posteriors.items()}
    return {"posterior": posterior_of(posteriors)}


_LOG_VARS = ("lambda_max",)


def plot_spectral_forest(posteriors, baselines=None,
                         var_names: tuple[str, ...] = ("alpha", "lambda_max", "stable_rank"),
                         hdi_prob: float = 0.9, path: str | Path | None = None):
    """Forest plot: one axis per variable, one row per (layer, source); figure size
    ``(4.2 n_vars, 1.4 + 0.32 n_rows)`` inches (+0.25 for a single variable, whose legend
    takes two lines).

    ``posteriors``: a Dataset / ``InferenceData`` or ``{name: Dataset}`` (e.g. one per
    prior); each row shows the median (dot), the central 50% interval (thick) and the
    ``hdi_prob`` HDI (thin line). ``baselines`` (:func:`bayes_spectral.baseline_dataset`):
    one small dot per seed and a diamond at the mean, one row per method. ``lambda_max`` is
    drawn on a log axis. Returns the figure (PNG at 100 dpi when ``path`` is given).
    """
    plt = _pyplot()
    sources = _as_sources(posteriors)
    if not sources and baselines is None:
        raise ValueError("plot_spectral_forest() needs posteriors or baselines")
    if not var_names:
        raise ValueError("var_names is empty")
    rows = _forest_rows(sources, baselines, var_names)
    colors, color_of = _colors(plt), {}
    for _, _, name, _ in rows:
        color_of.setdefault(name, colors[len(color_of) % len(colors)])
    height = 1.4 + 0.32 * len(rows) + (0.25 if len(var_names) == 1 else 0.0)
    fig, axes = plt.subplots(1, len(var_names), figsize=(4.2 * len(var_names), height),
                             squeeze=False, sharey=True)
    ypos = np.arange(len(rows))[::-1]
    for ax, var in zip(axes[0], var_names, strict=True):
        for y, (_, kind, name, layer) in zip(ypos, rows, strict=True):
            if kind == "posterior":
                _forest_interval(ax, sources[name][var].sel(layer=layer), y, color_of[name],
                                 hdi_prob)
            else:
                vals = baselines[var].sel({"layer": layer, "method": name}).values
                _forest_seeds(ax, vals, y, color_of[name])
        _label_forest_axis(ax, var, ypos)
    axes[0][0].set_yticks(ypos)
    axes[0][0].set_yticklabels([r[0] for r in rows], fontsize=8)
    axes[0][0].set_ylim(-0.7, len(rows) - 0.3)
    legend_h = _forest_legend(fig, bool(sources), baselines is not None, hdi_prob,
                              4.2 * len(var_names))
    return _finish(plt, fig, path, rect=(0, legend_h / height, 1, 1))


def _forest_rows(sources: dict, baselines, var_names) -> list[tuple[str, str, str, str]]:
    """Rows ``(label, kind, source name, layer)``: per layer (first-appearance order), one
    per posterior holding it, then one per baseline method; checks every dataset has
    ``var_names``."""
    layer_order: list[str] = []
    for ds in [*sources.values(), *([baselines] if baselines is not None else [])]:
        layer_order += [n for n in _layer_names(ds) if n not in layer_order]
        missing = [v for v in var_names if v not in ds]
        if missing:
            raise ValueError(f"variables {missing} are not in a dataset with {list(ds)}")
    rows = []
    for layer in layer_order:
        for name, ds in sources.items():
            if layer in set(_layer_names(ds)):
                rows.append((f"{layer} | {name}", "posterior", name, layer))
        if baselines is not None and layer in set(_layer_names(baselines)):
            for method in map(str, baselines["method"].values):
                rows.append((f"{layer} | {method}", "baseline", method, layer))
    return rows


def _forest_interval(ax, da, y: float, color, hdi_prob: float) -> None:
    """Posterior row: ``hdi_prob`` HDI (thin), 25-75% (thick), median (open dot)."""
    draws = _samples(da).ravel()
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return
    lo, hi = _hdi(draws[:, None], hdi_prob)
    q25, q50, q75 = np.percentile(draws, [25, 50, 75])
    ax.plot([lo[0], hi[0]], [y, y], color=color, lw=1.2)
    ax.plot([q25, q75], [y, y], color=color, lw=4, solid_capstyle="butt")
    ax.plot([q50], [y], "o", color="white", mec=color, ms=5)


def _forest_seeds(ax, vals: np.ndarray, y: float, color) -> None:
    """Baseline row: one dot per (finite) seed, a diamond at their mean."""
    vals = vals.ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return
    ax.plot(vals, np.full(vals.shape, y), "o", color=color, ms=3, alpha=0.6)
    ax.plot([vals.mean()], [y], "D", color=color, mec="k", ms=6)


def _label_forest_axis(ax, var: str, ypos: np.ndarray) -> None:
    if var in _LOG_VARS:
        ax.set_xscale("log")
    ax.set_title(var)
    ax.set_xlabel(_VAR_LABELS.get(var, var))
    ax.grid(True, axis="x", alpha=0.3)
    for y in ypos[:-1]:
        ax.axhline(y - 0.5, color="0.9", lw=0.5)


def _forest_legend(fig, posteriors: bool, baselines: bool, hdi_prob: float,
                   width: float) -> float:
    """The legend below the axes (one row when the figure is >= 8 inches wide); returns
    its height in inches."""
    from matplotlib.lines import Line2D

    handles = []
    if posteriors:
        handles.append(Line2D([], [], color="k", lw=4, label="posterior: median, 50% (thick), "
                              f"{int(round(100 * hdi_prob))}% HDI (thin)"))
    if baselines:
        handles.append(Line2D([], [], color="k", marker="D", ls="",
                              label="baseline: mean over seeds (dots: seeds)"))
    ncol = len(handles) if width >= 8 else 1
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return 0.25 * math.ceil(len(handles) / ncol) + 0.15


_VAR_LABELS = {
    "alpha": "alpha (power-law exponent of the ESD tail)",
    "alpha_weighted": "alpha * log10(lambda_max)",
    "lambda_max": "lambda_max = sigma_max^2 (log scale)",
    "stable_rank": "stable rank = sum(lambda) / lambda_max",
    "effective_rank": "effective rank exp H(sigma / sum sigma)",
}


def plot_alpha_vs_accuracy(table, path: str | Path | None = None, ncols: int = 3):
    """Alpha against test accuracy, one axis per layer, one colour per method (one point per
    row: e.g. per seed). ``table``: a ``pandas.DataFrame`` with columns ``method``, ``seed``,
    ``layer``, ``alpha``, ``test_accuracy``. Returns the figure (PNG when ``path`` given).
    """
    plt = _pyplot()
    need = {"method", "seed", "layer", "alpha", "test_accuracy"}
    cols = set(getattr(table, "columns", []))
    if not need <= cols:
        raise ValueError(f"plot_alpha_vs_accuracy() needs columns {sorted(need)}, missing "
                         f"{sorted(need - cols)}")
    if len(table) == 0:
        raise ValueError("plot_alpha_vs_accuracy(): the table is empty")
    layers = list(dict.fromkeys(map(str, table["layer"])))
    methods = list(dict.fromkeys(map(str, table["method"])))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(methods) > len(colors):  # one distinct colour per method, also past 10
        colors = [plt.get_cmap("tab20")(k % 20) for k in range(len(methods))]
    markers = "osD^v<>ph*"
    legend_cols = min(4, len(methods))
    legend_in = 0.35 + 0.2 * math.ceil(len(methods) / legend_cols)  # below the axes
    fig, axes = _grid(plt, len(layers), ncols, 5.0, 3.8)
    fig.set_figheight(fig.get_figheight() + legend_in)
    handles = {}
    for ax, layer in zip(axes, layers, strict=True):
        sub = table[table["layer"].astype(str) == layer]
        for j, method in enumerate(methods):
            part = sub[sub["method"].astype(str) == method]
            if len(part):
                handles[method] = ax.scatter(
                    part["alpha"], part["test_accuracy"], s=28, color=colors[j % len(colors)],
                    marker=markers[(j // 20) % 10], edgecolor="k", lw=0.4)
        ax.set_xlabel("alpha (power-law exponent of the ESD tail)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"layer {layer}")
        ax.grid(True, alpha=0.3)
    counts = table.groupby(table["method"].astype(str)).size() // len(layers)
    fig.legend(list(handles.values()), [f"{m} ({counts[m]} runs)" for m in handles],
               loc="lower center", ncol=legend_cols, fontsize=7, frameon=False)
    return _finish(plt, fig, path, rect=(0, legend_in / fig.get_figheight(), 1, 1))
