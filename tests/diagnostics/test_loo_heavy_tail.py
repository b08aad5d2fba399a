"""PSIS-LOO of heavy-tailed and numerically flat ratios is finite, with its Pareto k kept
(issue 19: ``compare``'s ``sghmc``/``powerlaw`` ``elpd_loo`` was NaN for every seed).

Two kinds of point, as in those rows (S = 120 pooled draws, 4 chains x 30):

* heavy tail: ``log p(y_i | theta_s) = -exp(1.5 z)``, ``z ~ N(0, 1)``: Pareto ``k`` 2-9,
  smoothed by ArviZ and kept (flagged: ``k > 0.7``);
* a confidently fitted point: ``log p = -exp(-L)``, ``L ~ N(45, 5)`` (``|log p|`` of
  1e-22..1e-14). Its ratios ``x_s = -log p_s - max`` differ by < 1e-16 in the tail, so
  ArviZ 0.23's tail ``exp(x) - exp(x_cut)`` rounds to 0, its GPD fit divides by 0 and
  returns ``sigma = nan`` (``k = 0.147``, a "good" k): every smoothed weight of the point,
  and ``elpd``, is NaN. ArviZ 1.3 reports ``k = nan`` there and keeps raw weights.

Reference: ``az.loo(..., pointwise=True)`` of the installed ArviZ (0.23 in the venv; 1.3 in
the ``.ci/run`` ArviZ 1.x step) on the same matrix with one chain (``r_eff = 1``, as
``mcmc_loo``). Where ArviZ smooths (finite ``elpd_i`` and ``k``): the same ``elpd_i`` to
``rtol 1e-10`` and the same ``k``. Where it cannot: ``k = inf`` and the unsmoothed
estimate ``elpd_i = log S - log sum_s exp(-log p_s)`` (scipy) to ``1e-12``.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pytest
import xarray as xr
from scipy.special import logsumexp

from bayes_spectral.diagnostics.arviz_adapter import inference_data, psislw
from bayes_spectral.diagnostics.loo import GOOD_K, mcmc_loo

CHAINS, DRAWS, HEAVY, FLAT = 4, 30, 20, 20


def _log_lik(seed: int, draws: int = CHAINS * DRAWS) -> np.ndarray:
    """``(S, n)``: ``HEAVY`` heavy-tailed points, then ``FLAT`` confidently fitted ones."""
    rng = np.random.default_rng(seed)
    heavy = -np.exp(1.5 * rng.standard_normal((draws, HEAVY)))
    flat = -np.exp(-rng.normal(45.0, 5.0, size=(draws, FLAT)))
    return np.concatenate([heavy, flat], axis=1)


def _az_loo(ll: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ArviZ's pointwise ``elpd_i``, ``k`` and total ``elpd`` of ``ll`` ``(S, n)``, one chain."""
    idata = inference_data(
        posterior=xr.Dataset({"w": (("chain", "draw"), np.zeros((1, ll.shape[0])))}),
        log_likelihood=xr.Dataset({"y": (("chain", "draw", "obs_id"), ll[None])}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = az.loo(idata, pointwise=True)
    elpd_i = getattr(ref, "loo_i", None)  # ArviZ 0.2x: loo_i / elpd_loo; 1.x: elpd_i / elpd
    elpd_i = ref.elpd_i if elpd_i is None else elpd_i
    total = getattr(ref, "elpd_loo", None)
    total = ref.elpd if total is None else total
    return (np.asarray(elpd_i, dtype=float), np.asarray(ref["pareto_k"], dtype=float),
            float(total))


def _unsmoothed_elpd(ll: np.ndarray) -> np.ndarray:
    """``log sum_s w_s p_s`` with raw weights ``w_s ∝ 1 / p_s``: ``log S - logsumexp(-ll)``."""
    return math.log(ll.shape[0]) - logsumexp(-ll, axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcmc_loo_finite_and_matches_arviz(seed):
    ll = _log_lik(seed)
    loo = mcmc_loo(ll.reshape(CHAINS, DRAWS, -1))
    ref_i, ref_k, ref_total = _az_loo(ll)
    assert np.isfinite(loo.elpd) and np.isfinite(loo.se) and np.isfinite(loo.elpd_i).all()
    smoothed = np.isfinite(ref_i) & np.isfinite(ref_k)
    assert smoothed[:HEAVY].all() and (~smoothed).sum() >= FLAT // 2  # both cases present
    np.testing.assert_allclose(loo.elpd_i[smoothed], ref_i[smoothed], rtol=1e-10)
    np.testing.assert_allclose(loo.pareto_k[smoothed], ref_k[smoothed], rtol=1e-10)
    assert np.isinf(loo.pareto_k[~smoothed]).all()
    np.testing.assert_allclose(loo.elpd_i[~smoothed], _unsmoothed_elpd(ll)[~smoothed],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(loo.elpd, loo.elpd_i.sum(), rtol=1e-12)
    if np.isfinite(ref_total):  # ArviZ 1.x keeps raw weights where it cannot smooth
        np.testing.assert_allclose(loo.elpd, ref_total, rtol=1e-10)


def test_heavy_tail_k_kept_and_flagged():
    """k-hat of 2-9 is reported as fitted (not replaced) and flagged unreliable; most flat
    points cannot be smoothed (k = inf). Whether a flat point's tail differs by more than
    rounding depends on the last ulp of ``exp`` (numpy 2.4 smooths one of them, k = 0.62):
    ``frac_good`` is the share of ``k <= 0.7`` whatever it is."""
    loo = mcmc_loo(_log_lik(0))
    heavy_k = loo.pareto_k[:HEAVY]
    assert np.isfinite(heavy_k).all() and heavy_k.min() > 2.0 and heavy_k.max() > 5.0
    assert (heavy_k > GOOD_K).all() and np.isinf(loo.pareto_k[HEAVY:]).sum() >= FLAT // 2
    assert loo.frac_good == np.mean(loo.pareto_k <= GOOD_K) <= 2 / (HEAVY + FLAT)
    assert loo.khat_max == math.inf


@pytest.mark.parametrize("draws", [120, 400, 700])
def test_psislw_falls_back_to_normalised_raw_weights(draws):
    """Rows ArviZ cannot smooth keep ``x_s - logsumexp(x)`` and ``k = inf``; the rest are
    normalised and finite."""
    ratios = -_log_lik(3, draws).T  # (n, S)
    lw, k = psislw(ratios)
    assert np.isfinite(lw).all()
    np.testing.assert_allclose(logsumexp(lw, axis=-1), 0.0, atol=1e-12)
    failed = np.isinf(k)
    assert failed[HEAVY:].sum() >= FLAT // 2 and not failed[:HEAVY].any()
    raw = ratios[failed] - logsumexp(ratios[failed], axis=-1, keepdims=True)
    np.testing.assert_allclose(lw[failed], raw, rtol=0, atol=1e-12)


def test_psislw_rejects_nan():
    ratios = -_log_lik(0).T
    ratios[3, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        psislw(ratios)
