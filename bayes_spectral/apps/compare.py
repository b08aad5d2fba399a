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
epochs, so differences come from ``R`` alone. The SG-MCMC rows (``methods``: ``sghmc`` /
``sgld`` of :func:`fit`) sample the posterior whose potential is that same MAP objective,
``num_chains`` chains started at the MAP fit, at ``temperature`` (1: the Bayes posterior),
with full-batch gradients by default (``sampler_batch_size=None``): SGHMC does not correct
mini-batch gradient noise, which widens the draws ``1 + r`` times (``r`` up to 28-46 at
batches of 256; :mod:`bayes_spectral.bnn.samplers`), so mini-batch rows would not be the
posterior their PSIS-LOO and spectra claim to show (``benchmarks/compare_sampler.py``).

Each finished run is saved atomically under ``<out>/runs/``: its table rows and point
weights (``.pt``) and, for SVI and each sampler, its ``InferenceData`` (``_svi.nc``,
``_sghmc.nc``, written first); ``resume=True`` skips runs already there, so an interrupted
comparison loses at most the run in progress. Saved runs are read back with
``weights_only=True`` (:func:`load_run`: a file holding anything but tensors and plain
data is refused by name, never unpickled), and
:func:`compare` holds the lock ``<out>/.compare.lock`` (``fcntl.flock``) while it runs: a
second comparison on the same folder raises :class:`~bayes_spectral._io.FolderLockedError`
at once instead of training the same runs. Each run stores the fingerprint of the settings
that shape it (:func:`run_fingerprint`); resuming with other settings is refused before
anything trains, naming each differing setting (:class:`SettingsMismatchError`; the command
line exits 2 and suggests ``--no-resume``). Seeds must be distinct integers in
``[0, 2**32 - 1]`` (:mod:`.settings`).

Baselines, priors and data sets are looked up by name in the registries
:data:`bayes_spectral.penalties.PENALTIES`, :data:`bayes_spectral.distributions.PRIORS` and
:data:`bayes_spectral.data.DATASETS`, so an entry a user registers works here too. The MLP
and the baselines' Adam loop are :mod:`.nets`; the report folder is :mod:`.outputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import penalties as P
from .._io import UnreadableFileError, folder_lock, load_tensors
from ..bnn.build import bayesian
from ..bnn.fit import fit, save_checkpoint
from ..bnn.guides import auto_normal, map_values
from ..bnn.metrics import log_predictive_density
from ..bnn.predict import evaluate
from ..data import DATASETS, Split
from ..diagnostics.analyze import analyze
from ..diagnostics.arviz_adapter import posterior_of
from ..diagnostics.draws import weights_from_latent
from ..diagnostics.inference_data import to_inference_data
from ..diagnostics.loo import GOOD_K, MIN_PSIS_DRAWS, importance_elpd, mcmc_loo
from ..diagnostics.netcdf import load_netcdf, save_netcdf
from ..distributions import BUILTIN_PRIORS, PRIORS
from ..models._common import torch_threads
from ..penalties import BUILTIN_PENALTIES, PENALTIES
from ..select import parameter_view
from .nets import make_mlp, train_adam
from .outputs import (  # noqa: F401 (public names of compare before apps.outputs existed)
    baselines_of,
    config_json,
    format_summary,
    long_table,
    summarize,
    write_outputs,
)
from .settings import PRIOR_METHODS, SAMPLERS, check_batch_size, check_device, check_seeds

__all__ = ["BASELINES", "PRIORS", "CompareConfig", "compare", "summarize"]

#: baseline name -> penalty factory ``coef -> Penalty | None`` (coefficient in the units of
#: ``R`` above): the penalty registry, :data:`bayes_spectral.penalties.PENALTIES`
BASELINES = PENALTIES
#: default coefficients of the baselines (``weight_decay``: the Gaussian prior's ``1/s^2``);
#: a penalty a user registered has coefficient ``DEFAULT_COEF`` unless ``coefs`` names it
BASELINE_COEFS = {"none": 0.0, "weight_decay": 4.0, "spectral_norm": 5.0,
                  "stable_rank": 5.0, "weighted_alpha": 20.0}
DEFAULT_COEF = 1.0
#: the lock file :func:`compare` holds in ``out_dir`` (one comparison per folder at a time)
LOCK_NAME = ".compare.lock"
#: importance draws of the ELPD columns at least (PSIS tail of 13 draws; k-hat is inf at <= 20)
ELPD_DRAWS = 64


@dataclasses.dataclass
class CompareConfig:
    """Settings of :func:`compare`; the default takes a few minutes on 2 CPU cores.

    ``baselines`` / ``priors`` / ``dataset`` are names in the registries
    :data:`~bayes_spectral.penalties.PENALTIES`, :data:`~bayes_spectral.distributions.PRIORS`
    and :data:`~bayes_spectral.data.DATASETS` (the defaults: every built-in entry).
    """

    dataset: str = "digits"
    hidden: tuple[int, ...] = (128, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30
    svi_epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    baselines: tuple[str, ...] = BUILTIN_PENALTIES
    priors: tuple[str, ...] = BUILTIN_PRIORS
    svi: bool = True
    num_posterior_samples: int = 64
    coefs: dict[str, float] = dataclasses.field(default_factory=lambda: dict(BASELINE_COEFS))
    device: str = "cpu"
    #: torch intra-op threads during training (1 is fastest for these small MLPs on CPU)
    num_threads: int | None = 1
    #: inference per prior, in :data:`PRIOR_METHODS`: ``map`` (always run: SVI and the
    #: samplers start from its fit), ``svi`` (unless ``svi=False``), ``sgld`` / ``sghmc``
    methods: tuple[str, ...] = ("map", "svi", "sghmc")
    #: SG-MCMC (``bs.fit(method="sghmc" | "sgld")``): epochs per chain (full batches: one
    #: step each), ``lr`` (step size ``lr / N`` on the potential ``N L(W)``), chains,
    #: temperature (1: the Bayes posterior), epochs of burn-in, thinning (every ``thin``-th
    #: step kept), cycles (None: constant lr). Defaults measured on this net
    #: (``benchmarks/compare_sampler.py``): 4 x 1000 full-batch steps cost ~1.6x the old
    #: 4 x 40 epochs of batches of 64; lr 0.1 makes excursions; friction 0.02 settles
    #: ``lambda_max`` in ~500 steps (0.1: 1500+); still R-hat ~1.3 (gaussian prior)
    sampler_epochs: int = 1000
    sampler_lr: float = 0.05
    num_chains: int = 4
    temperature: float = 1.0
    #: burn-in epochs; None: half of ``sampler_epochs`` (0 with ``cycles``), ``fit``'s rule
    burn_in: int | None = None
    thin: int = 10
    cycles: int | None = None
    #: SG-MCMC mini-batch size; ``None`` / ``"full"``: every training point (then an epoch is
    #: one step). Mini-batches add gradient noise SGHMC does not correct: the spread of the
    #: draws grows ``1 + r`` times (:mod:`bayes_spectral.bnn.samplers`), ``p_loo`` with it
    sampler_batch_size: int | str | None = None
    #: SGHMC friction ``a`` in (0, 1] (momentum kept ``1 - a`` per step)
    sampler_friction: float = 0.02

    @classmethod
    def quick(cls) -> CompareConfig:
        """About a minute on 2 CPU cores: fewer epochs, 2 seeds, a smaller MLP, 2 SGHMC
        chains of 120 full-batch steps (28 draws per seed: enough for PSIS-LOO; a smoke
        run, far from a converged posterior)."""
        return cls(hidden=(64,), seeds=(0, 1), epochs=10, svi_epochs=5,
                   num_posterior_samples=16, sampler_epochs=120, num_chains=2, burn_in=8,
                   thin=8)

    def prior_methods(self) -> tuple[str, ...]:
        """The inference methods run for each prior, in order: ``map`` first, ``svi``
        (when in ``methods`` and ``svi``), then the samplers of ``methods``."""
        svi = ("svi",) if self.svi and "svi" in self.methods else ()
        return ("map", *svi, *(m for m in SAMPLERS if m in self.methods))

    def samplers(self) -> tuple[str, ...]:
        """The SG-MCMC methods of :meth:`prior_methods`."""
        return tuple(m for m in self.prior_methods() if m in SAMPLERS)

    def sampler_burn_in(self) -> int:
        """Burn-in epochs: ``burn_in``, or ``sampler_epochs // 2`` (0 with ``cycles``)."""
        if self.burn_in is not None:
            return int(self.burn_in)
        return 0 if self.cycles is not None else int(self.sampler_epochs) // 2

    def sampler_batch(self, num_data: int) -> int:
        """Rows per SG-MCMC step: ``sampler_batch_size``, or ``num_data`` when it is
        ``None`` / ``"full"`` (or larger than the data)."""
        b = check_batch_size(self.sampler_batch_size, "sampler_batch_size")
        return int(num_data) if b is None else min(b, int(num_data))

    def coef(self, baseline: str) -> float:
        """Coefficient of ``baseline``: ``coefs``, else ``BASELINE_COEFS``, else 1."""
        return self.coefs.get(baseline, BASELINE_COEFS.get(baseline, DEFAULT_COEF))

    def validate(self) -> None:
        """``ValueError`` naming the first impossible setting."""
        self._validate_names()
        for key in ("epochs", "svi_epochs", "batch_size", "num_posterior_samples",
                    "sampler_epochs", "num_chains", "thin"):
            val = getattr(self, key)
            if int(val) != val or val < 1:
                raise ValueError(f"{key} must be a positive integer, got {val!r}")
        if not self.hidden or any(int(h) != h or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive layer widths, got {self.hidden!r}")
        for key in ("lr", "sampler_lr", "temperature"):
            val = getattr(self, key)
            if not (math.isfinite(val) and val > 0):
                raise ValueError(f"{key} must be positive and finite, got {val!r}")
        self._validate_sampler()
        for name in self.baselines:
            coef = self.coef(name)
            if name != "none" and not (math.isfinite(coef) and coef > 0):
                raise ValueError(f"coefficient of {name!r} must be a positive number, "
                                 f"got {coef!r}")

    def _validate_sampler(self) -> None:
        """``methods`` known; burn-in shorter than the run; cycles a positive integer;
        ``sampler_batch_size`` a positive integer or full; friction in (0, 1]."""
        unknown = [m for m in self.methods if m not in PRIOR_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {list(PRIOR_METHODS)}")
        b = self.burn_in
        if b is not None and (isinstance(b, bool) or int(b) != b
                              or not 0 <= b < self.sampler_epochs):
            raise ValueError(f"burn_in must be an integer in [0, sampler_epochs = "
                             f"{self.sampler_epochs}) or None (half), got {b!r}")
        if self.cycles is not None and (int(self.cycles) != self.cycles or self.cycles < 1):
            raise ValueError(f"cycles must be None or a positive integer, got {self.cycles!r}")
        check_batch_size(self.sampler_batch_size, "sampler_batch_size")
        f = self.sampler_friction
        if isinstance(f, bool) or not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise ValueError(f"sampler_friction must be in (0, 1], got "
                             f"{self.sampler_friction!r}")

    def _validate_names(self) -> None:
        """Data set, baselines and priors are registered; something is selected."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {self.dataset!r}")
        unknown = [b for b in self.baselines if b not in PENALTIES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; available: {list(PENALTIES)}")
        unknown = [p for p in self.priors if p not in PRIORS]
        if unknown:
            raise ValueError(f"unknown priors {unknown}; available: {list(PRIORS)}")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        check_seeds(self.seeds)
        check_device(self.device)
        if not self.baselines and not self.priors:
            raise ValueError("nothing to compare: no baseline and no prior selected")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_dataset(name: str, seed: int = 0) -> Split:
    """The data set registered as ``name`` in :data:`bayes_spectral.data.DATASETS` (built in:
    digits, 8x8 images; mnist1d, generated locally), loaded with ``seed``."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS.get(name)(seed=seed)


def _layer_metrics(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """``alpha_<layer>`` and ``stable_rank_<layer>`` of point weights (``analyze``)."""
    ds = analyze({f"{k}.weight": v.detach().cpu() for k, v in weights.items()})
    out = {}
    for name in ds.layer.values:
        out[f"alpha_{name}"] = float(ds.alpha.sel(layer=name))
        out[f"stable_rank_{name}"] = float(ds.stable_rank.sel(layer=name))
    return out


def _weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the Linear weights, by module name (the root named ``""``)."""
    rows = parameter_view(module, types=(nn.Linear,), what="compare").rows
    return {r.module_name: r.read().detach().cpu().clone() for r in rows}


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
    penalty = PENALTIES.get(method)(cfg.coef(method))
    reg = None if penalty is None else P.Regularizer(net, penalty, log=False)
    # N * (mean CE + R/N): the scale of the Pyro loss, so Adam's eps acts alike; seed: the
    # data order of fit(..., seed=seed), same permutations
    train_adam(net, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               loss_scale=n, regularizer=reg, seed=seed)
    with torch.no_grad():
        probs = torch.softmax(net(split.x_test.to(device)), -1).unsqueeze(0).cpu()
    return net, probs


def _prior_model(split: Split, cfg: CompareConfig, prior: str, seed: int):
    net = make_mlp(split.x_train.shape[1], cfg.hidden, int(split.y_train.max()) + 1, seed)
    return bayesian(net, {nn.Linear: PRIORS.get(prior)}, num_data=len(split.x_train))


def train_prior(split: Split, cfg: CompareConfig, prior: str, seed: int):
    """MAP (AutoDelta), then, per :meth:`CompareConfig.prior_methods`, SVI (AutoNormal from
    the MAP values) and each SG-MCMC sampler (chains started at the MAP weights).

    Returns ``{"map": FitResult, "svi": FitResult | None, <sampler>: FitResult, "seconds":
    {kind: float}}``.
    """
    kw = dict(batch_size=cfg.batch_size, device=cfg.device, seed=seed, progress=False)
    t0 = time.perf_counter()
    bn = _prior_model(split, cfg, prior, seed)
    res_map = fit(bn, split, "map", epochs=cfg.epochs, lr=cfg.lr, **kw)
    out = {"map": res_map, "svi": None, "seconds": {"map": time.perf_counter() - t0}}
    for method in cfg.prior_methods()[1:]:
        t0 = time.perf_counter()
        if method == "svi":
            start = map_values(res_map)
            bn2 = _prior_model(split, cfg, prior, seed)
            bn2.to(cfg.device)
            guide = auto_normal(bn2, init_scale=0.02, init_values=start)
            out["svi"] = fit(bn2, split, "svi", guide=guide, epochs=cfg.svi_epochs, lr=cfg.lr,
                             **kw)
        else:
            out[method] = fit_sampler(split, cfg, prior, seed, method, res_map)
        out["seconds"][method] = time.perf_counter() - t0
    return out


def fit_sampler(split: Split, cfg: CompareConfig, prior: str, seed: int, method: str,
                res_map):
    """``bs.fit(method=<sampler>)`` of ``prior`` on ``split``, every chain starting at the
    MAP weights of ``res_map`` (chains c > 0 jittered by ``fit``'s ``init_jitter``)."""
    start = res_map.to_module()
    bn = bayesian(start, {nn.Linear: PRIORS.get(prior)}, num_data=len(split.x_train))
    return fit(bn, split, method, epochs=cfg.sampler_epochs,
               batch_size=cfg.sampler_batch(len(split.x_train)),
               lr=cfg.sampler_lr, num_chains=cfg.num_chains, temperature=cfg.temperature,
               burn_in=cfg.sampler_burn_in(), thin=cfg.thin, cycles=cfg.cycles,
               friction=cfg.sampler_friction, device=cfg.device,
               seed=seed, progress=False)


def _point_weights(result) -> dict[str, torch.Tensor]:
    """Median weights of a MAP/SVI fit, per prior layer, from the fit's own parameters
    (``map_values(result)``: a later fit of the same sites, e.g. a sampler's ``AutoDelta``,
    does not leak in)."""
    values = map_values(result)
    bn = result.model
    with result.active():
        return {layer: bn.weight_of(layer, values[site]).detach().cpu()
                for layer, site in bn.prior_sites.items()}


def _row(kind: str, method: str, seed: int, probs: torch.Tensor, y: torch.Tensor,
         weights: dict[str, torch.Tensor], seconds: float) -> dict:
    """Test metrics of ``probs`` ``(S, n, C)`` / ``(n, C)``: accuracy, NLL, ECE, Brier, the
    held-out ``lpd`` per point with its ``lpd_se``; spectral columns of ``weights``."""
    m = evaluate(probs, y)
    lpd = log_predictive_density(probs, y)
    row = {"kind": kind, "method": method, "seed": seed, "test_accuracy": m.accuracy,
           "nll": m.nll, "ece": m.ece, "seconds": seconds, "lpd": lpd.lpd,
           "lpd_se": lpd.se, "brier": m.brier,
           "draws": int(probs.shape[0]) if probs.dim() == 3 else 1}
    row.update(_layer_metrics(weights))
    return row


def _elpd_columns(elpd, khat_max: float, pareto_k) -> dict:
    """``elpd_loo``, ``elpd_se``, ``p_loo`` (``sum_i lppd_i - elpd``: the effective number
    of parameters, which grows with the spread of the draws), ``khat_max``, ``khat_good``
    (share of points with Pareto ``k <= 0.7``) and ``elpd_unreliable`` (1.0 when
    ``khat_max > 0.7``, else 0.0)."""
    k = np.asarray(pareto_k, dtype=np.float64)
    return {"elpd_loo": float(elpd.elpd), "elpd_se": float(elpd.se),
            "p_loo": float(elpd.p_loo), "khat_max": khat_max,
            "khat_good": float(np.mean(k <= GOOD_K)),
            "elpd_unreliable": float(not khat_max <= GOOD_K)}


def compare(cfg: CompareConfig | None = None, out_dir: str | os.PathLike | None = None,
            resume: bool = True, progress: Callable[[str], None] | None = print) -> dict:
    """Run the comparison; returns a dict:

    * ``table``: one row per (kind, method, seed): ``kind`` is ``baseline``, ``map``,
      ``svi`` or a sampler (``sghmc``, ``sgld``), ``method`` the penalty or prior; test
      accuracy, NLL, ECE, Brier, the held-out log predictive density per test point
      ``lpd = mean_n log mean_s p(y_n | x_n, theta_s)`` with its standard error ``lpd_se``
      (:func:`~bayes_spectral.bnn.metrics.log_predictive_density`), ``draws`` (``S``), the
      per-layer ``alpha_<layer>`` / ``stable_rank_<layer>`` (SVI: of the posterior median
      weights; samplers: posterior mean over draws) and, for SVI and the samplers, PSIS-LOO
      on the training data: ``elpd_loo``, ``elpd_se``, ``p_loo``, ``khat_max``,
      ``khat_good`` (share of points with Pareto k <= 0.7) and ``elpd_unreliable`` (1 when
      ``khat_max > 0.7``); sampler rows also ``rhat_lambda_max`` (split R-hat over chains).
      SVI's is importance weighted (:func:`bayes_spectral.importance_elpd`, flagged in
      practice); the samplers' is plain PSIS-LOO of their draws
      (:func:`~bayes_spectral.diagnostics.loo.mcmc_loo`);
    * ``weights[(kind, method, seed)]``: point weights per layer (samplers: the last draw
      of chain 0);
    * ``posteriors[kind][prior]``: ``InferenceData`` of each posterior (``svi`` and every
      sampler), seeds stacked as chains (log-likelihood on the training data);
      ``idata`` is ``posteriors["svi"]`` (its name before samplers existed);
    * ``split``, ``config``.
    """
    cfg = cfg or CompareConfig()
    cfg.validate()
    lock = (contextlib.nullcontext() if out_dir is None
            else folder_lock(out_dir, LOCK_NAME, what="compare"))
    with lock, torch_threads(cfg.num_threads):
        return _compare(cfg, out_dir, resume, progress)


class SettingsMismatchError(ValueError):
    """A saved run was made with other settings than the ones asked for now (the command
    line exits 2); the message names each differing setting."""


def run_fingerprint(cfg: CompareConfig, what: str, method: str) -> dict:
    """Every setting that shapes a run's result (not ``device`` / ``num_threads``): the data
    set, the MLP, the loop and, for a baseline its coefficient, for a prior the SVI part."""
    fp = {"dataset": cfg.dataset, "hidden": [int(h) for h in cfg.hidden],
          "epochs": int(cfg.epochs), "batch_size": int(cfg.batch_size), "lr": float(cfg.lr)}
    if what == "baseline":
        fp["coef"] = float(cfg.coef(method))
        return fp
    svi = "svi" in cfg.prior_methods()
    fp["svi"] = svi
    if svi:
        fp["svi_epochs"] = int(cfg.svi_epochs)
        fp["num_posterior_samples"] = int(cfg.num_posterior_samples)
    if cfg.samplers():  # absent without a sampler: runs saved before samplers still resume
        fp.update(samplers=list(cfg.samplers()), sampler_epochs=int(cfg.sampler_epochs),
                  sampler_lr=float(cfg.sampler_lr), num_chains=int(cfg.num_chains),
                  temperature=float(cfg.temperature), burn_in=cfg.sampler_burn_in(),
                  thin=int(cfg.thin), cycles=None if cfg.cycles is None else int(cfg.cycles),
                  sampler_batch_size=_batch_key(cfg.sampler_batch_size),
                  sampler_friction=float(cfg.sampler_friction))
    return fp


def _batch_key(value) -> int | str:
    """``sampler_batch_size`` as stored in a fingerprint: ``"full"`` or the integer."""
    b = check_batch_size(value, "sampler_batch_size")
    return "full" if b is None else b


def check_fingerprint(path: Path, saved: dict, expected: dict) -> None:
    """:class:`SettingsMismatchError` naming every setting where the run at ``path``
    differs from ``expected`` (a run saved without a fingerprint is refused too)."""
    stored = saved.get("fingerprint")
    if stored == expected:
        return
    hint = "; pass --no-resume to retrain, or use another --out"
    if not isinstance(stored, dict):
        raise SettingsMismatchError(f"{path}: saved without its settings (an older version)"
                                    + hint)
    diff = [f"{k} {stored.get(k)!r} (now {expected.get(k)!r})"
            for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    raise SettingsMismatchError(f"{path}: saved with other settings: {', '.join(diff)}" + hint)


def _saved_runs(jobs: list, runs_dir: Path | None, cfg: CompareConfig) -> dict:
    """``{job: (saved, {kind: idata})}`` of the runs already under ``runs_dir``, every one
    read and checked against the settings before anything trains."""
    found = {}
    for what, method, seed in jobs if runs_dir is not None else ():
        path = runs_dir / f"{what}_{method}_seed{seed}.pt"
        if path.exists():
            saved, idata = load_run(path, _nc_path(path, "svi"))
            check_fingerprint(path, saved, run_fingerprint(cfg, what, method))
            idatas = {} if idata is None else {"svi": idata}
            for kind in cfg.samplers() if what == "prior" else ():
                idatas[kind] = load_run(path, _nc_path(path, kind))[1]
            found[(what, method, seed)] = (saved, idatas)
    return found


def _nc_path(path: Path, kind: str) -> Path:
    """``<run>_<kind>.nc`` next to the run's ``.pt`` (``_svi.nc``, ``_sghmc.nc``)."""
    return path.with_name(f"{path.stem}_{kind}.nc")


def load_run(path: Path, nc_path: Path | None = None) -> tuple[dict, object]:
    """A saved run (``weights_only=True``: tensors and plain data, never code) and its SVI
    ``InferenceData`` when ``nc_path`` exists; :class:`~bayes_spectral._io.UnreadableFileError`
    naming the file for anything else."""
    saved = load_tensors(path)
    rows = saved.get("rows") if isinstance(saved, dict) else None
    if (not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows)
            or not isinstance(saved.get("weights"), dict)):
        raise UnreadableFileError(f"{path}: not a run saved by compare (expected a dict with "
                                  "'rows' and 'weights'); delete it or pass --no-resume")
    idata = None
    if nc_path is not None and nc_path.exists():
        try:
            idata = load_netcdf(nc_path)
        except Exception as err:  # netCDF/HDF5 readers raise many types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UnreadableFileError(f"{nc_path}: not a readable posterior file ({reason}); "
                                      "delete it or pass --no-resume") from err
    return saved, idata


def _svi_outputs(res, split: Split, cfg: CompareConfig, seed: int):
    """InferenceData (training data) and the ELPD columns of one SVI fit (importance
    weighted PSIS-LOO: kept, flagged ``elpd_unreliable`` when k-hat > 0.7)."""
    train = (split.x_train, split.y_train)
    idata = to_inference_data(res, train, num_samples=cfg.num_posterior_samples, seed=seed)
    elpd = importance_elpd(res, train, num_samples=max(cfg.num_posterior_samples, ELPD_DRAWS),
                           seed=seed)
    return idata, _elpd_columns(elpd, elpd.khat_max, elpd.pareto_k)


def split_rhat(draws) -> float:
    """Split R-hat (Gelman et al., BDA3 11.4) of ``draws`` ``(chains, n)``: each chain cut in
    halves (``m`` chains of ``h = floor(n / 2)``), ``B = h var_j(mean_j)``, ``W = mean_j
    var_j``, ``R = sqrt(((h - 1) / h W + B / h) / W)``; NaN with fewer than 4 draws per chain
    or a constant statistic."""
    x = np.asarray(draws, dtype=np.float64)
    h = x.shape[1] // 2
    if h < 2:
        return float("nan")
    halves = np.concatenate([x[:, :h], x[:, x.shape[1] - h:]], axis=0)
    within = halves.var(axis=1, ddof=1).mean()
    between = h * halves.mean(axis=1).var(ddof=1)
    if not within > 0:
        return float("nan")
    return float(np.sqrt(((h - 1) / h * within + between / h) / within))


def _sampler_outputs(res, split: Split):
    """InferenceData of every draw (training data), PSIS-LOO columns, ``rhat_lambda_max``
    (the largest :func:`split_rhat` of a layer's ``lambda_max`` over the chains: above
    about 1.05 the chains have not mixed and the row is not yet the posterior) and the
    posterior mean over draws of each layer's ``alpha`` / ``stable_rank``."""
    idata = to_inference_data(res, (split.x_train, split.y_train))
    post = posterior_of(idata)
    draws = post.sizes["chain"] * post.sizes["draw"]
    if draws >= MIN_PSIS_DRAWS:
        loo = mcmc_loo(idata)
        cols = _elpd_columns(loo, loo.khat_max, loo.pareto_k)
    else:  # PSIS cannot fit the tail: no ELPD rather than an infinite k-hat
        warnings.warn(f"compare: {res.method} kept {draws} draws (< {MIN_PSIS_DRAWS}): no "
                      "PSIS-LOO for this row; raise sampler_epochs or lower thin",
                      UserWarning, stacklevel=2)
        cols = {}
    rhats = [split_rhat(post["lambda_max"].sel(layer=name).values) for name in post.layer.values]
    cols["rhat_lambda_max"] = float(np.nanmax(rhats)) if np.isfinite(rhats).any() \
        else float("nan")
    for name in post.layer.values:
        for var in ("alpha", "stable_rank"):
            vals = post[var].sel(layer=name).values
            cols[f"{var}_{name}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() \
                else float("nan")
    return idata, cols


def _last_draw_weights(res) -> dict[str, torch.Tensor]:
    """Weights of the last draw of chain 0 of a sampler fit, per prior layer (the point
    fit's place in ``weights``: one typical posterior draw, not a mean), spectral layers
    with that draw's own ``U``, ``V`` (``res.free_draws``)."""
    def last(draws):
        return None if not draws else {k: v[:1, -1:] for k, v in draws.items()}

    with res.active():
        w = weights_from_latent(res.model, last(res.samples), last(res.free_draws))
    return {layer: v[0, 0].cpu() for layer, v in w.items()}


def _train_baseline_run(split: Split, cfg: CompareConfig, method: str, seed: int) -> dict:
    """One baseline run: ``{"rows": [row], "weights": {"baseline": w}}``."""
    t0 = time.perf_counter()
    net, probs = train_baseline(split, cfg, method, seed)
    w = _weights_of(net)
    row = _row("baseline", method, seed, probs, split.y_test, w, time.perf_counter() - t0)
    return {"rows": [row], "weights": {"baseline": w}}


def _train_prior_run(split: Split, cfg: CompareConfig, prior: str, seed: int,
                     nc_path: Callable[[str], Path] | None):
    """One prior run (MAP, then SVI and the samplers): ``(saved, {kind: idata})``; each
    posterior's ``InferenceData`` is written to ``nc_path(kind)`` (before the run's
    ``.pt``, which marks it done)."""
    res = train_prior(split, cfg, prior, seed)
    probs = res["map"].predict(split.x_test).cpu()
    w = _point_weights(res["map"])
    saved = {"rows": [_row("map", prior, seed, probs, split.y_test, w, res["seconds"]["map"])],
             "weights": {"map": w}}
    idatas = {}
    for kind in cfg.prior_methods()[1:]:
        fitted = res[kind]
        if kind == "svi":
            with torch.random.fork_rng():  # seeded: the row does not depend on what ran before
                torch.manual_seed(seed)
                probs = fitted.predict(split.x_test, cfg.num_posterior_samples).cpu()
            w = _point_weights(fitted)
            idata, extra = _svi_outputs(fitted, split, cfg, seed)
        else:
            probs = fitted.predict(split.x_test).cpu()
            w = _last_draw_weights(fitted)
            idata, extra = _sampler_outputs(fitted, split)
        row = _row(kind, prior, seed, probs, split.y_test, w, res["seconds"][kind])
        row.update(extra)  # samplers: alpha / stable rank as posterior means over draws
        saved["rows"].append(row)
        saved["weights"][kind] = w
        idatas[kind] = idata
        if nc_path is not None:
            save_netcdf(idata, nc_path(kind))
    return saved, idatas


def _compare(cfg: CompareConfig, out_dir, resume: bool, progress) -> dict:
    """Every baseline, then every prior, each over the seeds, in that order (one job
    each), resuming finished jobs from ``<out_dir>/runs/``."""
    split = load_dataset(cfg.dataset)
    runs_dir = None if out_dir is None else Path(out_dir) / "runs"
    say = progress or (lambda s: None)
    rows, weights, posts = [], {}, {}
    jobs = [("baseline", b, s) for b in cfg.baselines for s in cfg.seeds]
    jobs += [("prior", p, s) for p in cfg.priors for s in cfg.seeds]
    resumed = _saved_runs(jobs, runs_dir if resume else None, cfg)
    for i, (what, method, seed) in enumerate(jobs):
        path = None if runs_dir is None else runs_dir / f"{what}_{method}_seed{seed}.pt"
        head = f"[{i + 1}/{len(jobs)}] {what} {method} seed {seed}"
        idatas = {}
        if (what, method, seed) in resumed:
            saved, idatas = resumed[(what, method, seed)]
            say(f"{head}: resumed from {path}")
        else:
            t0 = time.perf_counter()
            if what == "baseline":
                saved = _train_baseline_run(split, cfg, method, seed)
            else:
                nc = None if path is None else (lambda kind, p=path: _nc_path(p, kind))
                saved, idatas = _train_prior_run(split, cfg, method, seed, nc)
            if path is not None:
                saved["fingerprint"] = run_fingerprint(cfg, what, method)
                save_checkpoint(str(path), saved)
            say(f"{head}: test accuracy {saved['rows'][-1]['test_accuracy']:.3f} "
                f"({time.perf_counter() - t0:.1f} s)")
        rows.extend(saved["rows"])
        for kind, w in saved["weights"].items():
            weights[(kind, method, seed)] = w
        for kind, idata in idatas.items():
            if idata is not None:
                posts.setdefault(kind, {}).setdefault(method, []).append(idata)
    table = pd.DataFrame(rows)
    posteriors = {kind: {prior: _stack_chains(parts) for prior, parts in by_prior.items()}
                  for kind, by_prior in posts.items()}
    return {"table": table, "weights": weights, "idata": posteriors.get("svi", {}),
            "posteriors": posteriors, "split": split, "config": cfg}


def _stack_chains(parts: list):
    """One InferenceData per prior: the seeds' posteriors joined along ``chain`` (SVI: one
    chain per seed; a sampler: its chains of every seed in turn)."""
    from ..diagnostics.arviz_adapter import concat_chains

    return concat_chains(parts)
