"""Layer 6: the main job, ``bayes-spectral compare``: every baseline penalty and spectral prior
on one MLP, over seeds, with one results table.

Every method minimises the same per-example objective, the MAP objective of a Pyro model
whose batch likelihood is scaled by ``N / B``, divided by ``N``:

    ``L(W) = mean_batch CE(f_W(x), y) + R(W) / N``

(minimised as ``N L(W)``, the scale of the Pyro loss), where ``R`` is a deterministic
penalty (baselines, :mod:`bayes_spectral.penalties`) or ``-log p(W)`` of a spectral prior
(MAP, :func:`bayes_spectral.bayesian` + :func:`fit` with ``AutoDelta``; the library checks
that the two coincide). SVI (``AutoNormal``) starts from the MAP fit of the same prior and
seed. All runs use Adam with the same learning rate, batch size, data order and number of
epochs, so differences come from ``R`` alone.

Each finished run is saved atomically under ``<out>/runs/``: its table rows and point
weights (``.pt``) and, for SVI, its ``InferenceData`` (``_svi.nc``, written first);
``resume=True`` skips runs already there, so an interrupted comparison loses at most the
run in progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from .. import penalties as P
from .._io import atomic_path, write_text_atomic
from ..bnn.fit import fit, save_checkpoint
from ..bnn.guides import auto_normal, map_values
from ..bnn.network import bayesian
from ..bnn.predict import evaluate
from ..data import Split, load_digits, load_mnist1d
from ..diagnostics.analyze import analyze
from ..diagnostics.posterior import (
    baseline_dataset,
    importance_elpd,
    load_netcdf,
    save_netcdf,
    to_inference_data,
)
from ..distributions import (
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpikeAndSlabSpectrum,
)
from ..models._common import torch_threads

__all__ = ["BASELINES", "PRIORS", "CompareConfig", "compare", "summarize"]

#: baseline name -> penalty factory (coefficient in the units of ``R`` above)
BASELINES: dict[str, Callable[[float], P.Penalty | None]] = {
    "none": lambda c: None,
    "weight_decay": lambda c: P.WeightDecay(c),
    "spectral_norm": lambda c: P.SpectralNorm(c),
    "stable_rank": lambda c: P.StableRank(c),
    "weighted_alpha": lambda c: P.WeightedAlpha(c),
}
#: default coefficients of the baselines (``weight_decay``: the Gaussian prior's ``1/s^2``)
BASELINE_COEFS = {"none": 0.0, "weight_decay": 4.0, "spectral_norm": 5.0,
                  "stable_rank": 5.0, "weighted_alpha": 20.0}

#: prior name -> factory ``weight_shape -> Distribution`` (penalty measure, as in MAP)
PRIORS: dict[str, Callable[[torch.Size], torch.distributions.Distribution]] = {
    "gaussian": lambda s: GaussianSpectrum(0.5, s, measure="penalty"),
    "powerlaw": lambda s: PowerLawSpectrum(2.0, 0.5, s),
    "frechet_top": lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s),
    "spike_and_slab": lambda s: SpikeAndSlabSpectrum(0.5, 0.01, 1.0, s),
}
DATASETS = ("digits", "mnist1d")
#: importance draws of the ELPD columns at least (PSIS tail of 13 draws; k-hat is inf at <= 20)
ELPD_DRAWS = 64


@dataclasses.dataclass
class CompareConfig:
    """Settings of :func:`compare`; the default takes a few minutes on 2 CPU cores."""

    dataset: str = "digits"
    hidden: tuple[int, ...] = (128, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30
    svi_epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    baselines: tuple[str, ...] = tuple(BASELINES)
    priors: tuple[str, ...] = tuple(PRIORS)
    svi: bool = True
    num_posterior_samples: int = 64
    coefs: dict[str, float] = dataclasses.field(default_factory=lambda: dict(BASELINE_COEFS))
    device: str = "cpu"
    #: torch intra-op threads during training (1 is fastest for these small MLPs on CPU)
    num_threads: int | None = 1

    @classmethod
    def quick(cls) -> CompareConfig:
        """Under a minute on 2 CPU cores: fewer epochs, 2 seeds, a smaller MLP."""
        return cls(hidden=(64,), seeds=(0, 1), epochs=10, svi_epochs=5,
                   num_posterior_samples=16)

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; available: {list(BASELINES)}")
        unknown = [p for p in self.priors if p not in PRIORS]
        if unknown:
            raise ValueError(f"unknown priors {unknown}; available: {list(PRIORS)}")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if not self.baselines and not self.priors:
            raise ValueError("nothing to compare: no baseline and no prior selected")
        for key in ("epochs", "svi_epochs", "batch_size", "num_posterior_samples"):
            val = getattr(self, key)
            if int(val) != val or val < 1:
                raise ValueError(f"{key} must be a positive integer, got {val!r}")
        if not self.hidden or any(int(h) != h or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive layer widths, got {self.hidden!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        for name in self.baselines:
            coef = self.coefs.get(name, BASELINE_COEFS[name])
            if name != "none" and not (math.isfinite(coef) and coef > 0):
                raise ValueError(f"coefficient of {name!r} must be a positive number, "
                                 f"got {coef!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_dataset(name: str, seed: int = 0) -> Split:
    """The embedded data set ``name`` (digits: 8x8 images; mnist1d: generated locally)."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "mnist1d":
        return load_mnist1d(seed=seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def make_mlp(num_inputs: int, hidden: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """ReLU MLP with layers named ``fc1 ... fcK`` (Kaiming-uniform init, seeded)."""
    torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    widths = (num_inputs, *hidden)
    for i in range(len(hidden)):
        layers[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
        layers[f"relu{i + 1}"] = nn.ReLU()
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(widths[-1], num_classes)
    return nn.Sequential(layers)


def _layer_metrics(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """``alpha_<layer>`` and ``stable_rank_<layer>`` of point weights (``analyze``)."""
    ds = analyze({f"{k}.weight": v.detach().cpu() for k, v in weights.items()})
    out = {}
    for name in ds.layer.values:
        out[f"alpha_{name}"] = float(ds.alpha.sel(layer=name))
        out[f"stable_rank_{name}"] = float(ds.stable_rank.sel(layer=name))
    return out


def _weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().cpu().clone() for n, m in module.named_modules()
            if isinstance(m, nn.Linear)}


def train_baseline(split: Split, cfg: CompareConfig, method: str, seed: int):
    """Plain PyTorch loop: Adam on ``N mean_batch CE + R(W)``; returns (module, test probs).

    ``N L(W)`` rather than ``L(W)``: Adam is invariant to the scale of the loss up to its
    ``eps``, and this is the scale of the Pyro loss, so a penalty and its prior's MAP fit
    follow the same trajectory (tested for weight decay vs the Gaussian prior).
    """
    device = torch.device(cfg.device)
    x, y = split.x_train.to(device), split.y_train.to(device)
    n = x.shape[0]
    net = make_mlp(x.shape[1], cfg.hidden, int(split.y_train.max()) + 1, seed).to(device)
    coef = cfg.coefs.get(method, BASELINE_COEFS[method])
    penalty = BASELINES[method](coef)
    reg = None if penalty is None else P.Regularizer(net, penalty, log=False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    torch.manual_seed(seed)  # the data order of fit(..., seed=seed): same permutations
    bs = min(cfg.batch_size, n)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n).to(device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            # N * (mean CE + R/N): the scale of the Pyro loss, so Adam's eps acts alike
            loss = n * nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if reg is not None:
                reg.accumulate_grad()  # += dR/dW in place (closed form where there is one)
            opt.step()
    with torch.no_grad():
        probs = torch.softmax(net(split.x_test.to(device)), -1).unsqueeze(0).cpu()
    return net, probs


def _prior_model(split: Split, cfg: CompareConfig, prior: str, seed: int):
    net = make_mlp(split.x_train.shape[1], cfg.hidden, int(split.y_train.max()) + 1, seed)
    return bayesian(net, {nn.Linear: PRIORS[prior]}, num_data=len(split.x_train))


def train_prior(split: Split, cfg: CompareConfig, prior: str, seed: int):
    """MAP (AutoDelta) and, if ``cfg.svi``, SVI (AutoNormal from the MAP values).

    Returns ``{"map": FitResult, "svi": FitResult | None, "seconds": {kind: float}}``.
    """
    kw = dict(batch_size=cfg.batch_size, lr=cfg.lr, device=cfg.device, seed=seed,
              progress=False)
    t0 = time.perf_counter()
    bn = _prior_model(split, cfg, prior, seed)
    res_map = fit(bn, split, "map", epochs=cfg.epochs, **kw)
    seconds = {"map": time.perf_counter() - t0}
    res_svi = None
    if cfg.svi:
        t0 = time.perf_counter()
        start = map_values(res_map.guide)
        bn2 = _prior_model(split, cfg, prior, seed)
        bn2.to(cfg.device)
        guide = auto_normal(bn2, init_scale=0.02, init_values=start)
        res_svi = fit(bn2, split, "svi", guide=guide, epochs=cfg.svi_epochs, **kw)
        seconds["svi"] = time.perf_counter() - t0
    return {"map": res_map, "svi": res_svi, "seconds": seconds}


def _point_weights(result) -> dict[str, torch.Tensor]:
    """Median weights of a MAP/SVI fit, per prior layer."""
    values = map_values(result.guide)
    bn = result.model
    return {layer: bn.weight_of(layer, values[site]).detach().cpu()
            for layer, site in bn.prior_sites.items()}


def _row(kind: str, method: str, seed: int, probs: torch.Tensor, y: torch.Tensor,
         weights: dict[str, torch.Tensor], seconds: float) -> dict:
    m = evaluate(probs, y)
    row = {"kind": kind, "method": method, "seed": seed, "test_accuracy": m.accuracy,
           "nll": m.nll, "ece": m.ece, "seconds": seconds}
    row.update(_layer_metrics(weights))
    return row


def compare(cfg: CompareConfig | None = None, out_dir: str | os.PathLike | None = None,
            resume: bool = True, progress: Callable[[str], None] | None = print) -> dict:
    """Run the comparison; returns a dict:

    * ``table``: one row per (kind, method, seed) with test accuracy, NLL, ECE, the per-layer
      ``alpha_<layer>`` / ``stable_rank_<layer>`` (SVI: of the posterior median weights) and,
      for SVI, the importance-weighted PSIS-LOO ``elpd_loo``, ``elpd_se``, ``khat_max`` on
      the training data (:func:`bayes_spectral.importance_elpd`);
    * ``weights[(kind, method, seed)]``: point weights per layer;
    * ``idata[prior]``: ``InferenceData`` of the SVI posteriors, seeds stacked as chains
      (``num_posterior_samples`` draws each; log-likelihood on the training data);
    * ``split``, ``config``.
    """
    cfg = cfg or CompareConfig()
    cfg.validate()
    with torch_threads(cfg.num_threads):
        return _compare(cfg, out_dir, resume, progress)


def _svi_outputs(res, split: Split, cfg: CompareConfig, seed: int):
    """InferenceData (training data) and the ELPD columns of one SVI fit."""
    train = (split.x_train, split.y_train)
    idata = to_inference_data(res, train, num_samples=cfg.num_posterior_samples, seed=seed)
    elpd = importance_elpd(res, train, num_samples=max(cfg.num_posterior_samples, ELPD_DRAWS),
                           seed=seed)
    return idata, {"elpd_loo": elpd.elpd, "elpd_se": elpd.se, "khat_max": elpd.khat_max}


def _compare(cfg: CompareConfig, out_dir, resume: bool, progress) -> dict:
    split = load_dataset(cfg.dataset)
    runs_dir = None if out_dir is None else Path(out_dir) / "runs"
    say = progress or (lambda s: None)
    rows, weights, idatas = [], {}, {}
    jobs = [("baseline", b, s) for b in cfg.baselines for s in cfg.seeds]
    jobs += [("prior", p, s) for p in cfg.priors for s in cfg.seeds]
    y_test = split.y_test
    for i, (what, method, seed) in enumerate(jobs):
        stem = f"{what}_{method}_seed{seed}"
        path = None if runs_dir is None else runs_dir / f"{stem}.pt"
        nc_path = None if runs_dir is None else runs_dir / f"{stem}_svi.nc"
        idata = None
        if resume and path is not None and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if nc_path.exists():
                idata = load_netcdf(nc_path)
            say(f"[{i + 1}/{len(jobs)}] {what} {method} seed {seed}: resumed from {path}")
        else:
            t0 = time.perf_counter()
            saved = {"rows": [], "weights": {}}
            if what == "baseline":
                net, probs = train_baseline(split, cfg, method, seed)
                w = _weights_of(net)
                saved["rows"].append(_row("baseline", method, seed, probs, y_test, w,
                                          time.perf_counter() - t0))
                saved["weights"]["baseline"] = w
            else:
                res = train_prior(split, cfg, method, seed)
                probs = res["map"].predict(split.x_test).cpu()
                w = _point_weights(res["map"])
                saved["rows"].append(_row("map", method, seed, probs, y_test, w,
                                          res["seconds"]["map"]))
                saved["weights"]["map"] = w
                if res["svi"] is not None:
                    probs = res["svi"].predict(split.x_test, cfg.num_posterior_samples).cpu()
                    w = _point_weights(res["svi"])
                    row = _row("svi", method, seed, probs, y_test, w, res["seconds"]["svi"])
                    idata, elpd = _svi_outputs(res["svi"], split, cfg, seed)
                    row.update(elpd)
                    saved["rows"].append(row)
                    saved["weights"]["svi"] = w
                    if nc_path is not None:  # before the .pt, which marks the run done
                        save_netcdf(idata, nc_path)
            if path is not None:
                save_checkpoint(str(path), saved)
            last = saved["rows"][-1]
            say(f"[{i + 1}/{len(jobs)}] {what} {method} seed {seed}: "
                f"test accuracy {last['test_accuracy']:.3f} ({time.perf_counter() - t0:.1f} s)")
        rows.extend(saved["rows"])
        for kind, w in saved["weights"].items():
            weights[(kind, method, seed)] = w
        if idata is not None:
            idatas.setdefault(method, []).append(idata)
    table = pd.DataFrame(rows)
    idata = {prior: _stack_chains(parts) for prior, parts in idatas.items()}
    return {"table": table, "weights": weights, "idata": idata, "split": split, "config": cfg}


def _stack_chains(parts: list):
    """One InferenceData per prior: the seeds' SVI posteriors as chains ``0..K-1``."""
    import arviz as az

    if len(parts) == 1:
        return parts[0]
    return az.concat(*parts, dim="chain", reset_dim=True)


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


def config_json(cfg: CompareConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=lambda o: list(o))



def _esd_figure(result: dict, path: Path, layer: str) -> None:
    from ..diagnostics.plots import plot_esds
    from ..spectra.spectrum import esd

    seed = result["config"].seeds[0]
    spectra = {f"{layer}, {kind} {method}": esd(w[layer].double())
               for (kind, method, s), w in result["weights"].items() if s == seed}
    plot_esds(spectra, path)


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


def write_outputs(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the report folder of :func:`compare`; returns ``{what: path}``.

    ``results.csv`` (one row per run), ``summary.csv`` (mean/sd over seeds),
    ``config.json``, ``baselines.nc`` (point fits, :func:`baselines_of`),
    ``posterior_<prior>.nc`` (SVI ``InferenceData``), the PNG plots and the self-contained
    ``report.html`` showing them.
    """
    from ..diagnostics.plots import (
        plot_alpha_vs_accuracy,
        plot_posterior_spectra,
        plot_spectral_forest,
    )
    from .report import write_html_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: CompareConfig = result["config"]
    table, summary = result["table"], summarize(result["table"])
    paths = {"results": out / "results.csv", "summary": out / "summary.csv",
             "config": out / "config.json"}
    table.to_csv(paths["results"], index=False)
    summary.to_csv(paths["summary"])
    write_text_atomic(paths["config"], config_json(cfg))
    baselines = baselines_of(result)
    paths["baselines"] = out / "baselines.nc"
    with atomic_path(paths["baselines"]) as tmp:
        baselines.to_netcdf(tmp, engine="h5netcdf")
    images = {}
    for prior, idata in result["idata"].items():
        paths[f"posterior_{prior}"] = save_netcdf(idata, out / f"posterior_{prior}.nc")
    first = "fc1"
    paths["esd"] = out / f"esd_{first}.png"
    _esd_figure(result, paths["esd"], first)
    images[f"ESD of layer {first} (seed {cfg.seeds[0]}), every method"] = paths["esd"]
    paths["alpha_vs_accuracy"] = out / "alpha_vs_accuracy.png"
    plot_alpha_vs_accuracy(long_table(table), path=paths["alpha_vs_accuracy"])
    images["alpha vs test accuracy, every run"] = paths["alpha_vs_accuracy"]
    if result["idata"]:
        paths["forest"] = out / "spectral_forest.png"
        keep = [m for m in baselines.method.values if str(m).startswith("baseline:")]
        penalties_only = baselines.sel({"method": keep}) if keep else None
        plot_spectral_forest({f"svi:{p}": d.posterior for p, d in result["idata"].items()},
                             penalties_only, path=paths["forest"])
        images["Posterior intervals (SVI) next to the penalty baselines"] = paths["forest"]
        for prior, idata in result["idata"].items():
            key = f"posterior_spectra_{prior}"
            paths[key] = out / f"{key}.png"
            plot_posterior_spectra(idata.posterior, penalties_only, path=paths[key])
            images[f"Sorted singular values: SVI posterior ({prior}) and baselines"] = paths[key]
    notes = [
        f"Data set {cfg.dataset}; MLP hidden widths {list(cfg.hidden)}; seeds {list(cfg.seeds)}; "
        f"{cfg.epochs} epochs of Adam (lr {cfg.lr}, batch {cfg.batch_size}); SVI: "
        f"{cfg.svi_epochs} epochs of AutoNormal started at the MAP fit, "
        f"{cfg.num_posterior_samples} posterior draws per seed.",
        "Every method minimises N * mean CE + R(W): R a penalty (baseline) or -log p(W) "
        "(MAP with a spectral prior). alpha: power-law exponent of each layer's ESD "
        "(KS-chosen xmin, WeightWatcher's rule); SVI rows use the posterior median weights. "
        "elpd_loo: importance-weighted PSIS-LOO on the training data (khat_max > 0.7: "
        "unreliable).",
    ]
    paths["report"] = write_html_report(
        out / "report.html", "bayes-spectral compare", cfg.to_dict(),
        {"Mean over seeds": summary, "Every run": table}, images, notes)
    return paths


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
