"""Layer 5: PSIS-LOO of a variational fit and of MCMC draws.

:func:`importance_elpd`: leave-one-out ELPD of an SVI fit with importance weights
``p(theta, y) / q(theta)`` (formula in its docstring), with Pareto-k diagnostics.
:func:`mcmc_loo`: plain PSIS-LOO of posterior draws (NUTS, SG-MCMC) from their pointwise
log-likelihood ``(chain, draw, n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..bnn.fit import FitResult
from ..bnn.network import BayesianNetwork
from .arviz_adapter import MIN_PSIS_DRAWS, psis_tail_length, psislw
from .traces import as_data, check_result, guide_trace, trace_draw

__all__ = ["GOOD_K", "MIN_PSIS_DRAWS", "ImportanceELPD", "PsisLoo", "importance_elpd",
           "mcmc_loo", "tied_tail_points"]

#: Pareto k above which a PSIS estimate is unreliable (Vehtari et al. 2024)
GOOD_K = 0.7


@dataclass
class ImportanceELPD:
    """PSIS-LOO of a variational fit (see :func:`importance_elpd`).

    ``elpd`` (sum over points), ``se``, ``p_loo``, ``elpd_i`` and ``pareto_k`` (per point),
    ``khat_max``, ``khat_q`` (Pareto k of the weights ``p/q`` themselves: how good ``q`` is
    as a proposal, Yao et al. 2018), ``good_k`` (the threshold), ``warning`` (some k above
    it), ``num_samples``, and the raw ``log_weights`` ``(S,)``.
    """

    elpd: float
    se: float
    p_loo: float
    elpd_i: np.ndarray
    pareto_k: np.ndarray
    khat_max: float
    khat_q: float
    good_k: float
    warning: bool
    num_samples: int
    log_weights: np.ndarray




@dataclass
class PsisLoo:
    """PSIS-LOO of posterior draws (see :func:`mcmc_loo`): ``elpd`` (sum over points),
    ``se``, ``p_loo``, ``elpd_i`` and ``pareto_k`` per point, ``khat_max``, ``frac_good``
    (share of points with ``k <= GOOD_K = 0.7``), ``good_k`` (ArviZ's sample-size
    dependent threshold ``min(1 - 1/log10 S, 0.7)``), ``num_samples``."""

    elpd: float
    se: float
    p_loo: float
    elpd_i: np.ndarray
    pareto_k: np.ndarray
    khat_max: float
    frac_good: float
    good_k: float
    num_samples: int


def mcmc_loo(log_lik) -> PsisLoo:
    """PSIS-LOO of posterior draws: ``log_lik`` ``(chain, draw, n)`` (or ``(S, n)``, or an
    ArviZ container with a ``log_likelihood`` group holding ``y``), draws pooled.

    Ratios ``r_is = -log p(y_i | theta_s)`` smoothed by ``arviz_adapter.psislw``
    (``r_eff = 1``) into normalised ``lw_is``; ``elpd_i = log sum_s exp(lw_is + ll_is)``,
    ``elpd = sum_i elpd_i``, ``se = sqrt(n var_i elpd_i)``, ``p_loo = sum_i lppd_i - elpd``
    with ``lppd_i = log mean_s exp(ll_is)``. A point whose largest ratios all tie (the same
    likelihood in those draws, e.g. a ReLU net with every hidden unit off for it) has no
    Pareto fit: ``k = inf`` and unsmoothed weights, under either ArviZ (as ArviZ 0.2x's
    ``psislw`` and R's ``loo``; ArviZ 1.x's ``az.loo`` raises "All tail values are the same").
    So does a point whose tail ratios agree to ~1e-16 (a confidently fitted point, ``|log p|``
    below ~1e-12 in most tail draws: ArviZ 0.2x's GPD fit fails, its ``az.loo`` gives NaN):
    raw weights give ``elpd_i = log S - log sum_s exp(-ll_is)``. Heavy tails (``k`` up to
    ~10 and beyond) are smoothed and their ``k`` kept; ``k > 0.7`` marks them unreliable.
    """
    ll = _pooled_log_lik(log_lik)  # (n, S)
    s = ll.shape[1]
    if s < MIN_PSIS_DRAWS:
        raise ValueError(f"mcmc_loo() needs >= {MIN_PSIS_DRAWS} draws under the installed "
                         f"ArviZ (PSIS cannot fit the Pareto tail below), got {s}")
    lw, pareto_k = psislw(-ll)
    elpd_i = _logsumexp(lw + ll, axis=-1)
    lppd_i = _logsumexp(ll, axis=-1) - math.log(s)
    pareto_k = np.asarray(pareto_k, dtype=np.float64)
    good_k = min(1.0 - 1.0 / math.log10(s), GOOD_K)
    n = elpd_i.shape[0]
    return PsisLoo(elpd=float(elpd_i.sum()), se=float(math.sqrt(n * np.var(elpd_i))),
                   p_loo=float(lppd_i.sum() - elpd_i.sum()), elpd_i=elpd_i,
                   pareto_k=pareto_k, khat_max=float(pareto_k.max()),
                   frac_good=float(np.mean(pareto_k <= GOOD_K)), good_k=good_k,
                   num_samples=s)


def tied_tail_points(log_lik) -> np.ndarray:
    """Indices of the points whose PSIS tail is all ties: the ``M``
    (:func:`~bayes_spectral.diagnostics.arviz_adapter.psis_tail_length`) largest ratios
    ``-log p(y_i | theta_s)`` (its ``M`` lowest log-likelihoods) are equal. ``log_lik`` as
    for :func:`mcmc_loo`; none below ``MIN_PSIS_DRAWS`` draws."""
    ll = _pooled_log_lik(log_lik)  # (n, S)
    s = ll.shape[1]
    if s < MIN_PSIS_DRAWS:
        return np.zeros(0, dtype=np.int64)
    low = np.sort(ll, axis=1)[:, :psis_tail_length(s)]
    return np.flatnonzero(low[:, -1] == low[:, 0])


def _pooled_log_lik(log_lik) -> np.ndarray:
    """``(n, S)`` float64 from ``(chain, draw, n)``, ``(S, n)`` or a container."""
    from .arviz_adapter import group, has_groups

    if has_groups(log_lik):
        log_lik = group(log_lik, "log_likelihood")["y"].transpose("chain", "draw", ...).values
    ll = np.asarray(log_lik, dtype=np.float64)
    if ll.ndim == 3:
        ll = ll.reshape(-1, ll.shape[-1])
    if ll.ndim != 2 or not np.all(np.isfinite(ll)):
        raise ValueError("mcmc_loo(): log_lik must be finite with shape (chain, draw, n) or "
                         f"(S, n), got shape {ll.shape}")
    return ll.T


def importance_elpd(result: FitResult, data, num_samples: int = 200,
                    seed: int = 0) -> ImportanceELPD:
    """Importance-weighted PSIS-LOO ELPD of an SVI fit on ``data`` (its training data).

    Draws ``theta_s ~ q`` (``s = 1..S``); per draw the log weight
    ``log w_s = log p(theta_s) + sum_i log p(y_i | theta_s) - log q(theta_s)`` (model and
    guide traced with ``poutine.trace``, unscaled; this is what
    ``pyro.infer.predictive.WeighedPredictive`` returns as ``log_weights`` when ``data`` has
    ``num_data`` rows, computed here so the pointwise terms come from the same trace).
    Leave-one-out ratios ``r_is = log w_s - log p(y_i | theta_s)`` (``q`` as proposal for
    ``p(theta | y_{-i})``) are Pareto-smoothed by ``arviz_adapter.psislw`` (ArviZ 0.2x or
    1.x) into normalised ``lw_is``:

        elpd_i = log sum_s exp(lw_is + log p(y_i | theta_s)),   elpd = sum_i elpd_i,
        se = sqrt(n var_i(elpd_i)),   p_loo = sum_i lppd_i - elpd

    with ``lppd_i`` from the smoothed full-posterior weights ``psislw(log w)``
    (Magnusson et al. 2019; Vehtari et al. 2024). ``warning`` when some
    ``k_i > min(1 - 1/log10 S, 0.7)``.
    """
    model = _check_svi_fit(result, num_samples)
    with result.active():  # its own parameters, eval mode
        x, y = as_data(model, data)
        ll, log_w = _importance_draws(result, model, x, y, int(num_samples), seed)
    return _psis_loo(ll, log_w)


def _check_svi_fit(result: FitResult, num_samples: int) -> BayesianNetwork:
    """The model of an SVI fit with a guide, no enumerated layers and enough draws."""
    model = check_result(result)
    if result.samples is not None or result.guide is None or result.method != "svi":
        raise ValueError(f"importance_elpd() needs an SVI fit (method 'svi' with a guide), got "
                         f"method {result.method!r}; for NUTS use az.loo(to_inference_data(...))")
    if model.enumerated_layers:
        raise ValueError("importance_elpd() does not support enumerated rank indicators "
                         f"(layers {model.enumerated_layers})")
    if int(num_samples) != num_samples or num_samples < MIN_PSIS_DRAWS:
        raise ValueError(
            f"num_samples must be an integer >= {MIN_PSIS_DRAWS}, got {num_samples!r}: with "
            f"fewer draws PSIS cannot fit the Pareto tail (k = inf) under the installed ArviZ")
    return model


def _importance_draws(result: FitResult, model: BayesianNetwork, x: torch.Tensor,
                      y: torch.Tensor, num_samples: int, seed: int,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``S`` seeded guide draws (global RNG state restored): pointwise log-likelihoods
    ``(n, S)`` and log weights ``log p(theta_s) + sum_i log p(y_i | theta_s) - log q``."""
    logliks, logw = [], []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(num_samples):
            values, log_q = guide_trace(result, (x, y))
            loglik, logprior = trace_draw(model, values, x, y)
            logliks.append(loglik.to(torch.float64).cpu())
            logw.append(float(logprior + loglik.sum() - log_q))
    ll = torch.stack(logliks).numpy().T  # (n, S)
    log_w = np.asarray(logw, dtype=np.float64)
    if not np.all(np.isfinite(log_w)) or not np.all(np.isfinite(ll)):
        raise ValueError("importance_elpd(): non-finite log weights or log-likelihoods (is the "
                         "guide's support inside the prior's?)")
    return ll, log_w


def _psis_loo(ll: np.ndarray, log_w: np.ndarray) -> ImportanceELPD:
    """The PSIS-LOO summary of :func:`importance_elpd` from ``ll`` ``(n, S)`` and ``log w``."""
    lw_loo, pareto_k = psislw(log_w[None, :] - ll)
    elpd_i = _logsumexp(lw_loo + ll, axis=-1)
    lw_full, khat_q = psislw(log_w[None, :])
    lppd_i = _logsumexp(lw_full + ll, axis=-1)
    n = elpd_i.shape[0]
    s = log_w.shape[0]
    good_k = min(1.0 - 1.0 / math.log10(s), 0.7)
    pareto_k = np.asarray(pareto_k, dtype=np.float64)
    return ImportanceELPD(
        elpd=float(elpd_i.sum()), se=float(math.sqrt(n * np.var(elpd_i, ddof=0))),
        p_loo=float(lppd_i.sum() - elpd_i.sum()), elpd_i=elpd_i, pareto_k=pareto_k,
        khat_max=float(pareto_k.max()), khat_q=float(np.asarray(khat_q).max()),
        good_k=good_k, warning=bool((pareto_k > good_k).any()), num_samples=s,
        log_weights=log_w)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """``log sum exp a`` along ``axis``, shifted by the max for stability."""
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)
