"""Layer 6: what ``compare`` writes and prints: summaries, the report folder, the table.

:func:`write_outputs` writes ``results.csv``, ``summary.csv``, ``config.json``,
``baselines.nc``, ``posterior_<prior>.nc``, the PNG plots and ``report.html``;
:func:`format_summary` is the table ``bayes-spectral compare`` prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

from .._io import atomic_path, write_atomic, write_text_atomic
from ..diagnostics.baselines import baseline_dataset
from ..diagnostics.netcdf import save_netcdf

if TYPE_CHECKING:
    from .compare import CompareConfig

__all__ = ["baselines_of", "config_json", "format_summary", "long_table", "summarize",
           "write_outputs"]

_NOTES = (
    "Every method minimises N * mean CE + R(W): R a penalty (baseline) or -log p(W) "
    "(MAP with a spectral prior). alpha: power-law exponent of each layer's ESD "
    "(KS-chosen xmin, WeightWatcher's rule); SVI rows use the posterior median weights. "
    "elpd_loo: importance-weighted PSIS-LOO on the training data (khat_max > 0.7: "
    "unreliable)."
)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per (kind, method) of every numeric column but ``seed``."""
    cols = [c for c in table.columns if c not in ("kind", "method", "seed", "seconds")]
    g = table.groupby(["kind", "method"], sort=False)[cols]
    mean, sd = g.mean(), g.std(ddof=1)
    out = mean.copy()
    for c in ("test_accuracy", "nll", "ece"):
        out[f"{c}_sd"] = sd[c]
    out["seeds"] = g.size()
    return out


def format_summary(table: pd.DataFrame) -> str:
    """The printed results table: accuracy (mean +- sd), NLL, ECE, alpha, stable rank."""
    s = summarize(table)
    cols = {"acc": s["test_accuracy"].map("{:.3f}".format) + " +- "
            + s["test_accuracy_sd"].fillna(0).map("{:.3f}".format),
            "nll": s["nll"].map("{:.3f}".format), "ece": s["ece"].map("{:.3f}".format)}
    if "elpd_loo" in s.columns:
        cols["elpd_loo"] = s["elpd_loo"].map(lambda v: "-" if np.isnan(v) else f"{v:.1f}")
        cols["khat"] = s["khat_max"].map(lambda v: "-" if np.isnan(v) else f"{v:.2f}")
    for c in s.columns:
        if c.startswith(("alpha_", "stable_rank_")):
            cols[c.replace("stable_rank_", "srank_")] = s[c].map("{:.2f}".format)
    return pd.DataFrame(cols).to_string()


def config_json(cfg: CompareConfig) -> str:
    """The settings as indented JSON (tuples as lists)."""
    return json.dumps(cfg.to_dict(), indent=2, default=lambda o: list(o))


def long_table(table: pd.DataFrame) -> pd.DataFrame:
    """The results table with one row per (run, layer): columns ``method`` (``kind:method``),
    ``seed``, ``layer``, ``alpha``, ``stable_rank``, ``test_accuracy``."""
    layers = [c[len("alpha_"):] for c in table.columns if c.startswith("alpha_")]
    parts = []
    for layer in layers:
        part = table[["kind", "method", "seed", "test_accuracy"]].copy()
        part["method"] = table["kind"] + ":" + table["method"]
        part["layer"] = layer
        part["alpha"] = table[f"alpha_{layer}"]
        part["stable_rank"] = table[f"stable_rank_{layer}"]
        parts.append(part.drop(columns="kind"))
    return pd.concat(parts, ignore_index=True)


def baselines_of(result: dict) -> xr.Dataset:
    """Spectral variables of every point fit (baselines and MAP), dims ``method, seed,
    layer[, sv_index]``; methods named ``baseline:<name>`` / ``map:<prior>``."""
    return baseline_dataset({(f"{kind}:{method}", seed): w
                             for (kind, method, seed), w in result["weights"].items()
                             if kind != "svi"})


def _esd_figure(result: dict, path: Path, layer: str) -> None:
    from ..diagnostics.plots import plot_esds
    from ..spectra.spectrum import esd

    seed = result["config"].seeds[0]
    spectra = {f"{layer}, {kind} {method}": esd(w[layer].double())
               for (kind, method, s), w in result["weights"].items() if s == seed}
    with atomic_path(path) as tmp:
        plot_esds(spectra, tmp)


def _write_tables(result: dict, out: Path) -> tuple[dict[str, Path], xr.Dataset]:
    """``results.csv``, ``summary.csv``, ``config.json``, ``baselines.nc``, the posteriors."""
    table = result["table"]
    paths = {"results": out / "results.csv", "summary": out / "summary.csv",
             "config": out / "config.json"}
    write_atomic(paths["results"], lambda tmp: table.to_csv(tmp, index=False))
    write_atomic(paths["summary"], summarize(table).to_csv)
    write_text_atomic(paths["config"], config_json(result["config"]))
    baselines = baselines_of(result)
    paths["baselines"] = out / "baselines.nc"
    write_atomic(paths["baselines"], lambda tmp: baselines.to_netcdf(tmp, engine="h5netcdf"))
    for prior, idata in result["idata"].items():
        paths[f"posterior_{prior}"] = save_netcdf(idata, out / f"posterior_{prior}.nc")
    return paths, baselines


def _write_posterior_plots(result: dict, out: Path, baselines: xr.Dataset,
                           paths: dict[str, Path], images: dict[str, Path]) -> None:
    """The forest plot and the sorted-singular-value plots of the SVI posteriors."""
    from ..diagnostics.arviz_adapter import posterior_of
    from ..diagnostics.plots import plot_posterior_spectra, plot_spectral_forest

    paths["forest"] = out / "spectral_forest.png"
    keep = [m for m in baselines.method.values if str(m).startswith("baseline:")]
    penalties_only = baselines.sel({"method": keep}) if keep else None
    with atomic_path(paths["forest"]) as tmp:
        plot_spectral_forest({f"svi:{p}": posterior_of(d) for p, d in result["idata"].items()},
                             penalties_only, path=tmp)
    images["Posterior intervals (SVI) next to the penalty baselines"] = paths["forest"]
    for prior, idata in result["idata"].items():
        key = f"posterior_spectra_{prior}"
        paths[key] = out / f"{key}.png"
        with atomic_path(paths[key]) as tmp:
            plot_posterior_spectra(posterior_of(idata), penalties_only, path=tmp)
        images[f"Sorted singular values: SVI posterior ({prior}) and baselines"] = paths[key]


def write_outputs(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the report folder of :func:`~bayes_spectral.apps.compare.compare`; returns
    ``{what: path}``.

    ``results.csv`` (one row per run), ``summary.csv`` (mean/sd over seeds),
    ``config.json``, ``baselines.nc`` (point fits, :func:`baselines_of`),
    ``posterior_<prior>.nc`` (SVI ``InferenceData``), the PNG plots and the self-contained
    ``report.html`` showing them. Every file goes through the atomic writer
    (:mod:`bayes_spectral._io`): a kill mid-write leaves the previous file intact.
    """
    from ..diagnostics.plots import plot_alpha_vs_accuracy
    from .report import write_html_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: CompareConfig = result["config"]
    paths, baselines = _write_tables(result, out)
    images = {}
    first = "fc1"
    paths["esd"] = out / f"esd_{first}.png"
    _esd_figure(result, paths["esd"], first)
    images[f"ESD of layer {first} (seed {cfg.seeds[0]}), every method"] = paths["esd"]
    paths["alpha_vs_accuracy"] = out / "alpha_vs_accuracy.png"
    with atomic_path(paths["alpha_vs_accuracy"]) as tmp:
        plot_alpha_vs_accuracy(long_table(result["table"]), path=tmp)
    images["alpha vs test accuracy, every run"] = paths["alpha_vs_accuracy"]
    if result["idata"]:
        _write_posterior_plots(result, out, baselines, paths, images)
    notes = [
        f"Data set {cfg.dataset}; MLP hidden widths {list(cfg.hidden)}; seeds {list(cfg.seeds)}; "
        f"{cfg.epochs} epochs of Adam (lr {cfg.lr}, batch {cfg.batch_size}); SVI: "
        f"{cfg.svi_epochs} epochs of AutoNormal started at the MAP fit, "
        f"{cfg.num_posterior_samples} posterior draws per seed.",
        _NOTES,
    ]
    tables = {"Mean over seeds": summarize(result["table"]), "Every run": result["table"]}
    paths["report"] = write_html_report(out / "report.html", "bayes-spectral compare",
                                        cfg.to_dict(), tables, images, notes)
    return paths

