"""Layer 6: what ``compare`` writes and prints: summaries, the report folder, the table.

:func:`write_outputs` writes ``results.csv``, ``summary.csv``, ``config.json``,
``baselines.nc``, ``posterior_<prior>.nc``, the PNG plots and ``report.html``;
:func:`format_summary` is the table ``bayes-spectral compare`` prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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
    "(MAP with a spectral prior); SVI and the SG-MCMC samplers (sghmc, sgld) target the "
    "posterior of that same objective. alpha: power-law exponent of each layer's ESD "
    "(KS-chosen xmin, WeightWatcher's rule); SVI rows use the posterior median weights, "
    "sampler rows the posterior mean over draws of each statistic. lpd: held-out log "
    "predictive density per test point, mean_n log mean_s p(y_n | x_n, theta_s), with its "
    "standard error sd_n / sqrt(n) (the headline predictive figure). elpd_loo: PSIS-LOO on "
    "the training data, plain for sampler draws, importance weighted (p/q) for SVI; "
    "khat_good: share of points with Pareto k <= 0.7; an ELPD with k-hat > 0.7 is marked "
    "'!' / UNRELIABLE (SVI's almost always is)."
)
#: the marker of an ELPD whose Pareto k-hat exceeds 0.7, and its explanation
UNRELIABLE = "!"
UNRELIABLE_NOTE = ("! elpd_loo unreliable: Pareto k-hat > 0.7 (the PSIS estimate may be far "
                   "off; for SVI the guide is a poor proposal for the posterior)")
#: row kinds holding one point fit (the others are posteriors)
POINT_KINDS = ("baseline", "map")


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per (kind, method) of every numeric column but ``seed``;
    ``khat_max`` and ``elpd_unreliable``: the max over seeds; ``elpd_flag``: ``UNRELIABLE``
    where some seed's k-hat exceeds 0.7, ``ok`` where none does, empty without an ELPD."""
    cols = [c for c in table.columns if c not in ("kind", "method", "seed", "seconds")]
    g = table.groupby(["kind", "method"], sort=False)[cols]
    mean, sd, top = g.mean(), g.std(ddof=1), g.max()
    out = mean.copy()
    for c in ("test_accuracy", "nll", "ece", "lpd"):
        if c in sd.columns:
            out[f"{c}_sd"] = sd[c]
    for c in ("khat_max", "elpd_unreliable"):
        if c in out.columns:
            out[c] = top[c]
    if "elpd_unreliable" in out.columns:
        flag = out["elpd_unreliable"]
        out["elpd_flag"] = np.where(flag > 0, "UNRELIABLE", np.where(flag == 0, "ok", ""))
    out["seeds"] = g.size()
    return out


def _num(fmt: str) -> Callable[[float], str]:
    return lambda v: "-" if pd.isna(v) else fmt.format(v)


def format_summary(table: pd.DataFrame) -> str:
    """The printed results table: accuracy (mean +- sd), held-out lpd +- its SE, NLL, ECE,
    Brier, ELPD (``!``: k-hat > 0.7), k-hat, share of good k, ``p_loo``, the samplers'
    R-hat of ``lambda_max`` (``rhat``), alpha, stable rank."""
    s = summarize(table)
    cols = {"acc": s["test_accuracy"].map("{:.3f}".format) + " +- "
            + s["test_accuracy_sd"].fillna(0).map("{:.3f}".format)}
    if "lpd" in s.columns:
        cols["lpd +- se"] = s["lpd"].map("{:.3f}".format) + " +- " + s["lpd_se"].map(
            "{:.3f}".format)
    cols.update({"nll": s["nll"].map("{:.3f}".format), "ece": s["ece"].map("{:.3f}".format)})
    if "brier" in s.columns:
        cols["brier"] = s["brier"].map("{:.3f}".format)
    marked = False
    if "elpd_loo" in s.columns:
        bad = s["elpd_unreliable"] > 0 if "elpd_unreliable" in s.columns else \
            s["khat_max"] > 0.7
        marked = bool(bad.any())
        cols["elpd_loo"] = s["elpd_loo"].map(_num("{:.1f}")) + np.where(bad, UNRELIABLE, "")
        cols["khat"] = s["khat_max"].map(_num("{:.2f}"))
        if "khat_good" in s.columns:
            cols["k<=.7"] = s["khat_good"].map(_num("{:.0%}"))
    if "p_loo" in s.columns:
        cols["p_loo"] = s["p_loo"].map(_num("{:.1f}"))
    if "rhat_lambda_max" in s.columns:
        cols["rhat"] = s["rhat_lambda_max"].map(_num("{:.2f}"))
    for c in s.columns:
        if c.startswith(("alpha_", "stable_rank_")):
            cols[c.replace("stable_rank_", "srank_")] = s[c].map("{:.2f}".format)
    text = pd.DataFrame(cols).to_string()
    return text + ("\n" + UNRELIABLE_NOTE if marked else "")


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
                             if kind in POINT_KINDS})


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
    for kind, by_prior in _posteriors(result).items():
        for prior, idata in by_prior.items():
            key = f"posterior_{prior}" if kind == "svi" else f"posterior_{kind}_{prior}"
            paths[key] = save_netcdf(idata, out / f"{key}.nc")
    return paths, baselines


def _posteriors(result: dict) -> dict[str, dict]:
    """``{kind: {prior: idata}}``: ``result["posteriors"]``, or the SVI ``idata`` of a
    result made before samplers existed."""
    return result.get("posteriors") or ({"svi": result["idata"]} if result["idata"] else {})


def plotted_posterior(result: dict) -> str | None:
    """The posterior kind the spectra plots show: the first sampler's draws when a sampler
    ran (MCMC), else SVI's; None without a posterior."""
    kinds = list(_posteriors(result))
    samplers = [k for k in kinds if k != "svi"]
    return (samplers or kinds or [None])[0]


def _write_posterior_plots(result: dict, out: Path, baselines: xr.Dataset,
                           paths: dict[str, Path], images: dict[str, Path]) -> None:
    """The forest plot and the sorted-singular-value plots of one posterior kind
    (:func:`plotted_posterior`: sampler draws when a sampler ran, else SVI)."""
    from ..diagnostics.arviz_adapter import posterior_of
    from ..diagnostics.plots import plot_posterior_spectra, plot_spectral_forest

    kind = plotted_posterior(result)
    by_prior = _posteriors(result)[kind]
    label = "SVI" if kind == "svi" else kind.upper()
    paths["forest"] = out / "spectral_forest.png"
    keep = [m for m in baselines.method.values if str(m).startswith("baseline:")]
    penalties_only = baselines.sel({"method": keep}) if keep else None
    with atomic_path(paths["forest"]) as tmp:
        plot_spectral_forest({f"{kind}:{p}": posterior_of(d) for p, d in by_prior.items()},
                             penalties_only, path=tmp)
    images[f"Posterior intervals ({label}) next to the penalty baselines"] = paths["forest"]
    for prior, idata in by_prior.items():
        key = f"posterior_spectra_{prior}"
        paths[key] = out / f"{key}.png"
        with atomic_path(paths[key]) as tmp:
            plot_posterior_spectra(posterior_of(idata), penalties_only, path=tmp)
        images[f"Sorted singular values: {label} posterior ({prior}) and baselines"] = paths[key]


def _sampler_note(cfg: CompareConfig) -> list[str]:
    """One sentence on the SG-MCMC settings when a sampler ran."""
    samplers = [m for m in getattr(cfg, "methods", ()) if m not in ("map", "svi")]
    if not samplers:
        return []
    cyc = "constant step size" if cfg.cycles is None else f"{cfg.cycles} cyclical cycles"
    full = getattr(cfg, "sampler_batch_size", None) in (None, "full")
    batch = ("full-batch gradients (one step per epoch: no mini-batch noise)" if full
             else f"batches of {cfg.sampler_batch_size} (mini-batch gradient noise widens the "
                  "draws: SGHMC does not correct it)")
    return [f"SG-MCMC ({', '.join(samplers)}): {cfg.num_chains} chains per seed started at the "
            f"MAP fit, {cfg.sampler_epochs} epochs of {batch} (lr {cfg.sampler_lr}, step "
            f"lr/N, friction {cfg.sampler_friction}, {cyc}), temperature {cfg.temperature}, "
            f"burn-in {cfg.sampler_burn_in()} epochs, every {cfg.thin}-th step kept. "
            "rhat_lambda_max: split R-hat of lambda_max over the chains (max over layers); "
            "above 1.05 the chains have not mixed and their rows are not yet the posterior."]


def write_outputs(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the report folder of :func:`~bayes_spectral.apps.compare.compare`; returns
    ``{what: path}``.

    ``results.csv`` (one row per run), ``summary.csv`` (mean/sd over seeds),
    ``config.json``, ``baselines.nc`` (point fits, :func:`baselines_of`),
    ``posterior_<prior>.nc`` (SVI ``InferenceData``), ``posterior_<sampler>_<prior>.nc``
    (SG-MCMC draws), the PNG plots (posterior spectra from the sampler's draws when one
    ran) and the self-contained ``report.html`` showing them. Every file goes through the
    atomic writer (:mod:`bayes_spectral._io`): a kill mid-write leaves the previous file
    intact.
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
    if plotted_posterior(result) is not None:
        _write_posterior_plots(result, out, baselines, paths, images)
    notes = [
        f"Data set {cfg.dataset}; MLP hidden widths {list(cfg.hidden)}; seeds {list(cfg.seeds)}; "
        f"{cfg.epochs} epochs of Adam (lr {cfg.lr}, batch {cfg.batch_size}); SVI: "
        f"{cfg.svi_epochs} epochs of AutoNormal started at the MAP fit, "
        f"{cfg.num_posterior_samples} posterior draws per seed.",
        *_sampler_note(cfg),
        _NOTES,
    ]
    if (result["table"].get("elpd_unreliable", pd.Series(dtype=float)) > 0).any():
        notes.append(UNRELIABLE_NOTE + "; see the elpd_flag column.")
    tables = {"Mean over seeds": summarize(result["table"]), "Every run": result["table"]}
    paths["report"] = write_html_report(out / "report.html", "bayes-spectral compare",
                                        cfg.to_dict(), tables, images, notes)
    return paths

